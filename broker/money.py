"""The one money type: US dollars, exact to the micro-dollar.

The database stores integer micro-dollars; the API carries dollars as decimal
strings (``"2.50"``) and accepts strings or JSON numbers with at most six
decimal places. Floats never hold money.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

MICROS_PER_USD = 1_000_000
MAX_USD = Decimal("1000000")  # a per-hour price or a budget above this is a typo
_MICRO = Decimal("0.000001")


def usd_to_micros(amount: Decimal) -> int:
    """Exact conversion; raises ValueError if ``amount`` has sub-micro-dollar digits."""
    micros = amount * MICROS_PER_USD
    if micros != micros.to_integral_value():
        raise ValueError("at most 6 decimal places (micro-dollars)")
    return int(micros)


def micros_to_usd(micros: int) -> Decimal:
    return (Decimal(micros) / MICROS_PER_USD).quantize(_MICRO)


def format_usd(amount: Decimal) -> str:
    """Plain decimal text with at least two decimals: 2.5 -> '2.50', 0.123 -> '0.123'."""
    text = format(amount.normalize(), "f")
    whole, _, frac = text.partition(".")
    return f"{whole}.{frac.ljust(2, '0')}"


_PLAIN_DECIMAL = re.compile(r"(-?)([0-9]+)(?:\.([0-9]+))?")
_NOT_A_NUMBER = 'must be a decimal number of US dollars, e.g. "2.50"'


def _parse_usd(value: Any) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, str | int | float | Decimal):
        raise ValueError(_NOT_A_NUMBER)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must be a finite amount")
    # A JSON number such as 0.1 means the decimal 0.1 (its shortest repr), not the
    # float's binary value. Only plain ASCII decimals are money: no exponents in
    # text, no underscores, no other scripts' digits.
    text = format(Decimal(repr(value)), "f") if isinstance(value, float) else str(value).strip()
    match = _PLAIN_DECIMAL.fullmatch(text)
    if match is None:
        raise ValueError(_NOT_A_NUMBER)
    sign, _, fraction = match.groups()
    if fraction and len(fraction.rstrip("0")) > 6:
        raise ValueError("at most 6 decimal places (micro-dollars)")
    amount = Decimal(text)
    if sign and amount != 0:
        raise ValueError("must not be negative")
    if amount > MAX_USD:
        raise ValueError(f"must be at most {MAX_USD}")
    return abs(amount).quantize(_MICRO)


Usd = Annotated[
    Decimal,
    BeforeValidator(_parse_usd),
    PlainSerializer(format_usd, return_type=str, when_used="json"),
    WithJsonSchema(
        {
            "anyOf": [
                {
                    "type": "string",
                    "pattern": r"^(?:[0-9]{1,6}(?:\.[0-9]{1,6})?|1000000(?:\.0{1,6})?)$",
                },
                {"type": "number", "minimum": 0, "maximum": 1000000},
            ],
            "description": "US dollars, at most 1000000 and exact to 6 decimal places (a "
            "number with more is refused); sent back as a string",
            "examples": ["2.50"],
        },
        mode="validation",
    ),
    WithJsonSchema(
        {"type": "string", "pattern": r"^\d+\.\d{2,6}$", "examples": ["2.50"]},
        mode="serialization",
    ),
]
"""Dollars in the API: validated on the way in, a decimal string on the way out."""
