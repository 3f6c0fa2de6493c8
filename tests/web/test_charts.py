"""Chart geometry: what the SVG draws matches the numbers."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from broker.market.schemas import Book, PriceLevel, PricePoint
from web.charts import depth_chart, nice_step, price_chart


def _book(bids: list[tuple[str, int]], asks: list[tuple[str, int]]) -> Book:
    def levels(items: list[tuple[str, int]]) -> list[PriceLevel]:
        return [PriceLevel(price_per_hour=Decimal(p), quantity=q, orders=1) for p, q in items]

    return Book(
        accelerator="h100-sxm",
        name=None,
        vendors=["nvidia"],
        platforms=["cuda"],
        memory_gib=80,
        asks=levels(asks),
        bids=levels(bids),
        best_ask=Decimal(asks[0][0]) if asks else None,
        best_bid=Decimal(bids[0][0]) if bids else None,
        spread=None,
    )


def test_depth_is_cumulative_from_the_best_price_outwards() -> None:
    chart = depth_chart(_book(bids=[("3.00", 2), ("2.00", 3)], asks=[("3.50", 4), ("4.00", 6)]))
    bottom = chart.plot[3]

    def heights(path: str) -> list[float]:
        return [float(v) for v in re.findall(r"V([\d.]+)", path)]

    y_of = {float(t.label.replace(",", "")): t.at for t in chart.y_ticks}
    # Bids: 2 accelerators at 3.00 or more, 5 at 2.00 or more; asks: 4, then 10.
    bid_heights, ask_heights = heights(chart.paths["bids"]), heights(chart.paths["asks"])
    assert bid_heights[1] < bid_heights[0] < bottom
    assert ask_heights[0] > ask_heights[1] == y_of[10]
    assert chart.paths["bids_area"].endswith("Z")
    assert chart.summary == "5 accelerators bid, best at $3.00; 10 asked, best at $3.50."
    assert chart.y_ticks[0].label == "0"
    assert not chart.empty
    assert depth_chart(_book([], [])).empty


def test_price_history_draws_one_marker_per_round() -> None:
    points = [
        PricePoint(
            round_id=f"rnd_{i}",
            at=datetime(2025, 1, 1, 12, i, tzinfo=UTC),
            accelerators=2,
            low=Decimal(low),
            high=Decimal(high),
            average=Decimal(avg),
        )
        for i, (low, high, avg) in enumerate([("2.00", "2.50", "2.25"), ("2.40", "2.40", "2.40")])
    ]
    chart = price_chart("h100-sxm", points)
    assert len(chart.markers) == 2
    first, second = chart.markers
    assert first.x < second.x
    assert second.y < first.y  # a higher price is drawn higher up
    assert first.y_high < first.y < first.y_low
    assert "$2.25 average" in first.label
    assert chart.summary.startswith("2 rounds matched h100-sxm; the latest cleared at $2.40")
    assert price_chart("l4", []).empty
    # The legend speaks of bars only when some round has one to draw.
    assert chart.ranges
    assert not price_chart("h100-sxm", points[1:]).ranges


def test_ticks_are_round_numbers() -> None:
    assert nice_step(10, 4, integer=True) == 5
    assert nice_step(3, 4, integer=True) == 1
    assert nice_step(0.5, 4) == pytest.approx(0.2)
