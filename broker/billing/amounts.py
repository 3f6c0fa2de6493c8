"""Billing arithmetic: exact from metered milliseconds to the invoice line.

Usage is metered in integer accelerator-milliseconds and prices are locked in
integer micro-dollars per accelerator-hour, so a charge is
``usage_ms x price / 3,600,000`` micro-dollars: a rational number that is not
always a finite decimal (3,600,000 has the factor 9). Charges are therefore
carried as ``Fraction`` of a micro-dollar, with no rounding at all, until an
invoice line turns one into cents: **once per line, half to even** (banker's
rounding, so that rounding errors do not drift one way over many lines).

The broker's fee is a rate in parts per million (100,000 ppm = 10 %), locked on
each allocation when it is matched. An invoice's fee line is the fee on the
exact (unrounded) sum of its usage lines, rounded once in the same way.
"""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

MS_PER_HOUR = 3_600_000
PPM = 1_000_000
MICROS_PER_CENT = 10_000


def usage_charge(usage_ms: int, price_per_hour_micros: int) -> Fraction:
    """What ``usage_ms`` accelerator-milliseconds cost at a locked hourly price, in
    micro-dollars, exactly."""
    return Fraction(usage_ms * price_per_hour_micros, MS_PER_HOUR)


def fee_on(amount: Fraction, fee_ppm: int) -> Fraction:
    """The broker's fee on an exact amount, exactly."""
    return amount * fee_ppm / PPM


def with_fee(amount: Fraction, fee_ppm: int) -> Fraction:
    return amount + fee_on(amount, fee_ppm)


def to_cents(micros: Fraction) -> int:
    """Round an exact micro-dollar amount to whole cents, half to even: the one
    rounding step between metering and an invoice."""
    return round(micros / MICROS_PER_CENT)  # Fraction.__round__ rounds half to even


def to_micros(micros: Fraction) -> int:
    """Round to whole micro-dollars, half to even: for showing a running amount (a
    job's cost so far), never for billing it."""
    return round(micros)


def cents_to_usd(cents: int) -> Decimal:
    return (Decimal(cents) / 100).quantize(Decimal("0.01"))


def usage_within(budget_micros: Fraction, price_per_hour_micros: int, fee_ppm: int) -> int:
    """The most whole accelerator-milliseconds whose charge, fee included, stays within
    ``budget_micros`` at this price."""
    if budget_micros <= 0:
        return 0
    per_ms = with_fee(usage_charge(1, price_per_hour_micros), fee_ppm)
    if per_ms == 0:
        return 2**62  # free capacity: the budget never binds
    return int(budget_micros / per_ms)


def percent_to_ppm(percent: Decimal) -> int:
    """``Decimal("7.5")`` -> 75,000; raises ValueError for more than 4 decimals."""
    ppm = percent * 10_000
    if ppm != ppm.to_integral_value():
        raise ValueError("at most 4 decimal places")
    return int(ppm)


def ppm_to_percent(ppm: int) -> Decimal:
    text = format((Decimal(ppm) / 10_000).normalize(), "f")
    return Decimal(text)
