from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from broker.money import Usd
from broker.types import ModelKey


class PriceLevel(BaseModel):
    price_per_hour: Usd
    quantity: int = Field(description="Accelerators at this price")
    orders: int = Field(description="Offers (asks) or jobs (bids) at this price")


class Book(BaseModel):
    accelerator: str
    name: str | None = Field(description="Full model name, when the catalog knows it")
    vendors: list[str]
    platforms: list[str]
    memory_gib: float
    asks: list[PriceLevel] = Field(description="Offers, cheapest first")
    bids: list[PriceLevel] = Field(description="Open jobs that accept this model, highest first")
    best_ask: Usd | None
    best_bid: Usd | None
    spread: Usd | None = Field(description="best_ask - best_bid when the book is not crossed")


class OrderBook(BaseModel):
    books: list[Book]
    generated_at: datetime


class BookQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    accelerator: ModelKey | None = Field(default=None, description="Only this model's book")
    depth: int = Field(default=50, ge=1, le=1000, description="Price levels per side")


class CatalogEntry(BaseModel):
    key: str
    name: str
    vendor: str
    platform: str
    form_factor: str
    memory_gib: float
    tflops_bf16: float
    tflops_fp32: float
    mem_bw_gbps: float
    tdp_w: float | None
    aliases: list[str]
    source: str
