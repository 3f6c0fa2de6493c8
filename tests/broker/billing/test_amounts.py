from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.billing.amounts import (
    percent_to_ppm,
    ppm_to_percent,
    to_cents,
    usage_charge,
    usage_within,
    with_fee,
)


@pytest.mark.parametrize(
    ("micros", "cents"),
    [
        (Fraction(0), 0),
        (Fraction(4_999), 0),  # 0.4999 cent
        (Fraction(5_000), 0),  # half a cent: to the even 0
        (Fraction(15_000), 2),  # 1.5 cents: to the even 2
        (Fraction(25_000), 2),  # 2.5 cents: to the even 2
        (Fraction(25_001), 3),
        (Fraction(10_000, 3), 0),  # a third of a cent
        (Fraction(20_000, 3), 1),  # two thirds
        (Fraction(3_600_000), 360),
    ],
)
def test_cents_round_half_to_even(micros: Fraction, cents: int) -> None:
    assert to_cents(micros) == cents


def test_a_usage_charge_is_exact_where_decimals_are_not() -> None:
    # One millisecond at $1/h is 1/3600 of a micro-dollar: no finite decimal.
    charge = usage_charge(1, 1_000_000)
    assert charge == Fraction(1_000_000, 3_600_000)
    assert usage_charge(3_600_000, 2_400_000) == 2_400_000  # an hour at $2.40
    assert sum([usage_charge(1, 1_000_000)] * 3_600_000) == 1_000_000


@given(
    budget=st.integers(min_value=0, max_value=10**12),
    price=st.integers(min_value=1, max_value=10**12),
    fee=st.integers(min_value=0, max_value=1_000_000),
)
def test_usage_within_a_budget_is_the_most_it_buys(budget: int, price: int, fee: int) -> None:
    ms = usage_within(Fraction(budget), price, fee)
    assert with_fee(usage_charge(ms, price), fee) <= budget
    assert with_fee(usage_charge(ms + 1, price), fee) > budget


def test_fee_percent_round_trips_through_ppm() -> None:
    assert percent_to_ppm(Decimal("7.5")) == 75_000
    assert percent_to_ppm(Decimal("0.0001")) == 1
    assert ppm_to_percent(75_000) == Decimal("7.5")
    assert ppm_to_percent(100_000) == Decimal("10")
    with pytest.raises(ValueError, match="4 decimal places"):
        percent_to_ppm(Decimal("0.00001"))
