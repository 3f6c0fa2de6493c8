"""List pages: ``limit`` and ``offset`` in, ``items`` and ``total`` out."""

from __future__ import annotations

from typing import Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")

MAX_LIMIT = 200


class PageQuery(BaseModel):
    """Query parameters of every list endpoint; unknown parameters are refused."""

    model_config = ConfigDict(extra="forbid")

    limit: int = Field(default=50, ge=1, le=MAX_LIMIT, description="Items per page")
    offset: int = Field(default=0, ge=0, le=10_000_000, description="Items to skip")


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int

    @classmethod
    def of(cls, items: list[T], total: int, query: PageQuery) -> Page[T]:
        return cls(items=items, total=total, limit=query.limit, offset=query.offset)
