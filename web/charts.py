"""Chart geometry for server-drawn SVG: numbers in, coordinates and labels out.

Templates (``_charts.html``) turn these into markup, so every label is escaped
by Jinja and no chart library or script is needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal

from broker.market.carbon import Footprint
from broker.market.schemas import Book, PricePoint
from web.format import usd, when

WIDTH, HEIGHT = 760, 280
LEFT, RIGHT, TOP, BOTTOM = 70, 18, 14, 38


@dataclass(frozen=True)
class Tick:
    at: float
    label: str


@dataclass(frozen=True)
class Marker:
    x: float
    y: float
    y_low: float
    y_high: float
    label: str


@dataclass
class Chart:
    """One plot area: paths, markers, axis ticks and a sentence for screen readers."""

    title: str
    summary: str
    width: int = WIDTH
    height: int = HEIGHT
    paths: dict[str, str] = field(default_factory=dict)
    markers: list[Marker] = field(default_factory=list)
    x_ticks: list[Tick] = field(default_factory=list)
    y_ticks: list[Tick] = field(default_factory=list)
    x_label: str = ""
    y_label: str = ""

    @property
    def empty(self) -> bool:
        return not self.paths and not self.markers

    @property
    def ranges(self) -> bool:
        """Whether any marker's bar has a length (a round matched at several asks)."""
        return any(m.y_low != m.y_high for m in self.markers)

    @property
    def plot(self) -> tuple[float, float, float, float]:
        """The plot area: left, top, right, bottom."""
        return LEFT, TOP, self.width - RIGHT, self.height - BOTTOM


def nice_step(span: float, count: int, integer: bool = False) -> float:
    """A round step (1, 2, 2.5 or 5 times a power of ten; whole numbers for counts)
    giving about ``count`` steps over ``span``."""
    raw = max(span / max(count, 1), 1.0 if integer else 1e-9)
    power = 10 ** math.floor(math.log10(raw))
    multiples = (1, 2, 5, 10) if integer else (1, 2, 2.5, 5, 10)
    return float(next(m * power for m in multiples if m * power >= raw * 0.999))


class _Scale:
    """Data values to SVG coordinates, over a domain widened to round tick values."""

    def __init__(
        self,
        low: float,
        high: float,
        start: float,
        end: float,
        count: int = 4,
        integer: bool = False,
    ) -> None:
        if high <= low:
            pad = abs(low) * 0.1 or 1.0
            low, high = max(0.0, low - pad), high + pad
        self.step = nice_step(high - low, count, integer)
        self.low = math.floor(low / self.step + 1e-9) * self.step
        self.high = math.ceil(high / self.step - 1e-9) * self.step
        self.start, self.end = start, end

    def __call__(self, value: float) -> float:
        span = (value - self.low) / (self.high - self.low)
        return round(self.start + span * (self.end - self.start), 2)

    def ticks(self) -> list[float]:
        count = round((self.high - self.low) / self.step)
        return [self.low + i * self.step for i in range(count + 1)]


def depth_chart(book: Book) -> Chart:
    """Cumulative accelerators bid at or above each price (left, from the best bid
    down) and asked at or below it (right, from the best ask up)."""
    bids = sorted(book.bids, key=lambda level: level.price_per_hour, reverse=True)
    asks = sorted(book.asks, key=lambda level: level.price_per_hour)
    chart = Chart(
        title=f"Depth of the {book.accelerator} book",
        summary=_depth_summary(book),
        x_label="USD per accelerator-hour",
        y_label="accelerators",
    )
    if not bids and not asks:
        return chart
    prices = [float(level.price_per_hour) for level in (*bids, *asks)]
    bid_total = sum(level.quantity for level in bids)
    ask_total = sum(level.quantity for level in asks)
    low, high = min(prices), max(prices)
    pad = (high - low) * 0.08 or max(high * 0.1, 0.01)
    left, top, right, bottom = chart.plot
    x = _Scale(max(0.0, low - pad), high + pad, left, right, count=5)
    y = _Scale(0, max(bid_total, ask_total, 1), bottom, top, integer=True)
    if bids:
        chart.paths["bids"], chart.paths["bids_area"] = _steps(
            [(float(b.price_per_hour), b.quantity) for b in bids], x, y, x(x.low)
        )
    if asks:
        chart.paths["asks"], chart.paths["asks_area"] = _steps(
            [(float(a.price_per_hour), a.quantity) for a in asks], x, y, x(x.high)
        )
    chart.x_ticks = [Tick(x(v), _price(v)) for v in x.ticks()]
    chart.y_ticks = [Tick(y(v), f"{v:,.0f}") for v in y.ticks()]
    return chart


def _steps(levels: list[tuple[float, int]], x: _Scale, y: _Scale, edge: float) -> tuple[str, str]:
    """A step line through cumulative quantities, from the best price outwards to
    ``edge``, and the same closed down to the axis as an area."""
    start = x(levels[0][0])
    parts = [f"M{start},{y(0)}"]
    total = 0
    for i, (_, quantity) in enumerate(levels):
        total += quantity
        parts.append(f"V{y(total)}")
        following = x(levels[i + 1][0]) if i + 1 < len(levels) else edge
        parts.append(f"H{following}")
    line = " ".join(parts)
    return line, f"{line} V{y(0)} Z"


def _price(value: float) -> str:
    """A tick label: dollars to the cent, or finer for prices below a cent."""
    return usd(
        Decimal(f"{value:.6f}").quantize(Decimal("0.01") if value >= 0.01 else Decimal("0.000001"))
    )


def _depth_summary(book: Book) -> str:
    bid = sum(level.quantity for level in book.bids)
    ask = sum(level.quantity for level in book.asks)
    return (
        f"{bid} accelerators bid, best at {usd(book.best_bid)}; "
        f"{ask} asked, best at {usd(book.best_ask)}."
    )


def price_chart(model: str, points: Sequence[PricePoint]) -> Chart:
    """Each round's average clearing price (a line), with its lowest and highest
    locked ask (a bar), oldest round on the left."""
    chart = Chart(
        title=f"Clearing price of {model} per round",
        summary=_price_summary(model, points),
        x_label="clearing rounds",
        y_label="USD per accelerator-hour",
    )
    if not points:
        return chart
    left, top, right, bottom = chart.plot
    low = min(float(p.low) for p in points)
    high = max(float(p.high) for p in points)
    pad = (high - low) * 0.1 or max(high * 0.1, 0.01)
    y = _Scale(max(0.0, low - pad), high + pad, bottom, top)
    inset = 18
    x = _Scale(0, max(len(points) - 1, 1), left + inset, right - inset)
    for i, point in enumerate(points):
        label = (
            f"{when(point.at)}: {usd(point.average)} average, {usd(point.low)} to "
            f"{usd(point.high)}, {point.accelerators} accelerators"
        )
        chart.markers.append(
            Marker(x(i), y(float(point.average)), y(float(point.low)), y(float(point.high)), label)
        )
    chart.paths["average"] = "M" + " L".join(f"{m.x},{m.y}" for m in chart.markers)
    chart.x_ticks = [Tick(chart.markers[0].x, when(points[0].at)[5:16])]
    if len(points) > 1:
        chart.x_ticks.append(Tick(chart.markers[-1].x, when(points[-1].at)[5:16]))
    chart.y_ticks = [Tick(y(v), _price(v)) for v in y.ticks()]
    return chart


def carbon_chart(offers: Sequence[Footprint]) -> Chart:
    """Each offer's ask against the carbon of one of its accelerators for an hour: the
    cheap-and-clean corner is the bottom left."""
    chart = Chart(
        title="Price against carbon of the offers",
        summary=_carbon_summary(offers),
        x_label="g CO2e per accelerator-hour",
        y_label="USD per accelerator-hour",
    )
    if not offers:
        return chart
    left, top, right, bottom = chart.plot
    x = _Scale(0.0, max(o.gco2_per_hour for o in offers), left + 8, right - 8)
    y = _Scale(0.0, max(o.price_per_hour for o in offers), bottom, top)
    for o in offers:
        label = (
            f"{o.accelerator} in {o.region}: {_price(o.price_per_hour)}/h, "
            f"{o.gco2_per_hour:,.0f} g CO2e per accelerator-hour"
        )
        at = y(o.price_per_hour)
        chart.markers.append(Marker(x(o.gco2_per_hour), at, at, at, label))
    chart.x_ticks = [Tick(x(v), f"{v:,.0f}") for v in x.ticks()]
    chart.y_ticks = [Tick(y(v), _price(v)) for v in y.ticks()]
    return chart


def _carbon_summary(offers: Sequence[Footprint]) -> str:
    if not offers:
        return "No offer has free accelerators."
    cleanest = min(offers, key=lambda o: (o.gco2_per_hour, o.price_per_hour))
    cheapest = min(offers, key=lambda o: (o.price_per_hour, o.gco2_per_hour))
    return (
        f"{len(offers)} offers. Cheapest: {cheapest.accelerator} in {cheapest.region} at "
        f"{_price(cheapest.price_per_hour)}/h, {cheapest.gco2_per_hour:,.0f} g CO2e an hour; "
        f"cleanest: {cleanest.accelerator} in {cleanest.region} at "
        f"{_price(cleanest.price_per_hour)}/h, {cleanest.gco2_per_hour:,.0f} g CO2e an hour."
    )


def _price_summary(model: str, points: Sequence[PricePoint]) -> str:
    if not points:
        return f"No round has matched {model} yet."
    last = points[-1]
    return (
        f"{len(points)} rounds matched {model}; the latest cleared at {usd(last.average)} "
        f"on average ({usd(last.low)} to {usd(last.high)})."
    )
