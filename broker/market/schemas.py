from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from broker.money import Usd
from broker.types import ModelKey


class PriceLevel(BaseModel):
    price_per_hour: Usd
    quantity: int = Field(description="Accelerators at this price")
    orders: int = Field(description="Offers (asks) or jobs (bids) at this price")
    gco2_per_hour_min: float | None = Field(
        default=None,
        description="Asks: the lowest g CO2e one accelerator-hour of an offer at this price "
        "emits (power x PUE x grid intensity, as clearing counts it); null for bids",
    )
    gco2_per_hour_max: float | None = Field(
        default=None, description="Asks: the highest, among the offers at this price"
    )


class SliceLevel(BaseModel):
    """Parts of one accelerator at one price (fractions): MIG instances or AMD
    partitions of one profile, shares of shared offers, or bids for a part."""

    part: str = Field(
        description='What one order is: "3g.40gb" (an isolated instance of that profile), '
        '"1/4 shared" (a share of a shared accelerator); for bids "0.25" (a quarter of one) '
        "or a profile"
    )
    isolated: bool = Field(
        description="Asks: hardware-isolated (MIG, partitions). Bids: the job asks for "
        "isolation (it does not accept shared capacity)"
    )
    price_per_hour: Usd = Field(description="Per accelerator-hour; a part costs its share of it")
    quantity: int = Field(description="Parts at this price (free instances or shares; jobs)")
    orders: int = Field(description="Offers (asks) or jobs (bids)")


class Book(BaseModel):
    accelerator: str
    name: str | None = Field(description="Full model name, when the catalog knows it")
    vendors: list[str]
    platforms: list[str]
    memory_gib: float
    asks: list[PriceLevel] = Field(description="Offers, cheapest first")
    bids: list[PriceLevel] = Field(description="Open jobs that accept this model, highest first")
    unfillable: list[PriceLevel] = Field(
        default_factory=list,
        description="Open jobs that accept this model but need more accelerators than its "
        "largest offer lists (a job runs on one offer): no offer here could fill them, so "
        "they are kept out of bids, best_bid and spread; highest first",
    )
    largest_offer: int | None = Field(
        default=None, description="Accelerators the largest active offer of this model lists"
    )
    best_ask: Usd | None
    best_bid: Usd | None
    spread: Usd | None = Field(description="best_ask - best_bid when the book is not crossed")
    slice_asks: list[SliceLevel] = Field(
        default_factory=list,
        description="Fractions: free MIG instances, partitions and shares, cheapest first "
        "(a shared accelerator no share of is held is also in asks, for whole jobs)",
    )
    slice_bids: list[SliceLevel] = Field(
        default_factory=list,
        description="Fractions: open jobs for part of one accelerator, highest first (kept "
        "out of bids)",
    )


class OrderBook(BaseModel):
    books: list[Book]
    generated_at: datetime


class BookQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    accelerator: ModelKey | None = Field(default=None, description="Only this model's book")
    depth: int = Field(default=50, ge=1, le=1000, description="Price levels per side")


class CatalogEntry(BaseModel):
    model_config = ConfigDict(from_attributes=True)

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


class EstimateBand(BaseModel):
    """How runtime estimates on one accelerator model held: metered over estimated
    runtime for its latest runs, and the correction later estimates get."""

    model: str
    runs: int
    median: float = Field(description="Median of metered / estimated runtime")
    low: float = Field(description="10th percentile of metered / estimated runtime")
    high: float = Field(description="90th percentile of metered / estimated runtime")
    correction: float = Field(
        description="What the work part of estimates on this model is multiplied by: "
        "the median over long runs, once there are enough, within a floor and a ceiling"
    )
    startup_s: float = Field(
        description="Seconds of start-up added to every program's estimate on this model"
    )


class CarbonMonth(BaseModel):
    """A month of a developer's runs: their energy and emissions."""

    period: str = Field(description="YYYY-MM, by when the runs started (UTC)")
    runs: int
    energy_kwh: float
    gco2: float
    basis: str = Field(
        description="measured: every run's energy from its agent's power readings; estimated: "
        "from the matches' estimates; mixed: some of each"
    )


class RoundOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    trigger: str
    status: str
    started_at: datetime
    finished_at: datetime | None
    jobs_considered: int
    offers_considered: int
    matched: int
    stale: int = Field(description="Matches skipped because the book changed during the solve")
    objective: float | None
    bound: float | None
    gap: float | None
    solve_seconds: float | None
    error: str | None


class PricePoint(BaseModel):
    """One model's clearing price in one round: the asks its matches locked."""

    round_id: str
    at: datetime = Field(description="When the round started")
    accelerators: int = Field(description="Accelerators of this model the round matched")
    low: Usd
    high: Usd
    average: Usd = Field(description="Weighted by accelerators")
