"""Numbers as the pages show them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from web import format as fmt


def test_money_is_exact_and_grouped() -> None:
    assert fmt.usd(Decimal("1234.5")) == "$1,234.50"
    assert fmt.usd(Decimal("0.000417")) == "$0.000417"  # sub-cent digits are kept
    assert fmt.usd(Decimal("0")) == "$0.00"
    assert fmt.usd(None) == fmt.DASH
    assert fmt.per_hour(Decimal("2.49")) == "$2.49/h"
    assert fmt.amount(Decimal("2.490000")) == "2.49"


def test_hours_memory_times_and_ratios() -> None:
    assert [fmt.hours(h) for h in (3, 1.5, 0.75, 0.001)] == ["3 h", "1.5 h", "45 min", "3.6 s"]
    assert fmt.accelerator_hours(5400) == "1.5 accelerator-h"
    assert (fmt.gib(80), fmt.gib(0.5)) == ("80 GiB", "0.5 GiB")
    assert (fmt.seconds(0.0123), fmt.seconds(1.254)) == ("12 ms", "1.25 s")
    assert (fmt.percent(0.000717), fmt.percent(0.05), fmt.percent(0)) == ("0.072 %", "5 %", "0 %")
    assert fmt.number(13944340.2) == "13,944,340"
    moment = datetime(2025, 3, 1, 14, 2, 9, tzinfo=UTC)
    assert fmt.when(moment) == "2025-03-01 14:02:09 UTC"
    assert fmt.ago(moment, moment + timedelta(seconds=5)) == "5 s ago"
    assert fmt.ago(moment, moment + timedelta(hours=3, minutes=5)) == "3 h ago"
