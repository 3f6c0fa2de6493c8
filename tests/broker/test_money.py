from __future__ import annotations

from decimal import Decimal

import pytest
from pydantic import TypeAdapter, ValidationError

from broker.money import Usd, format_usd, micros_to_usd, usd_to_micros

usd = TypeAdapter(Usd)


@pytest.mark.parametrize(
    ("given", "expected"),
    [("2.50", "2.5"), (0.1, "0.1"), (3, "3"), ("0.000001", "0.000001"), (" 4.2 ", "4.2")],
)
def test_parses_exact_dollars(given: object, expected: str) -> None:
    assert usd.validate_python(given) == Decimal(expected)


@pytest.mark.parametrize(
    "given",
    [
        "0.0000001",
        "-1",
        "NaN",
        "Infinity",
        "abc",
        True,
        None,
        [],
        "1000000.01",
        1e-9,
        "1e-999999999999",  # would underflow to zero
        "1_000",
        "\u0663.5",  # an Arabic-Indic digit
        "2.5e1",
    ],
)
def test_refuses_what_is_not_an_exact_amount(given: object) -> None:
    with pytest.raises(ValidationError):
        usd.validate_python(given)


def test_micros_round_trip_exactly() -> None:
    for text in ("0.1", "0.2", "0.3", "2.49", "999999.999999"):
        amount = Decimal(text)
        assert micros_to_usd(usd_to_micros(amount)) == amount
    assert usd_to_micros(Decimal("0.1")) + usd_to_micros(Decimal("0.2")) == usd_to_micros(
        Decimal("0.3")
    )


def test_serialises_as_decimal_text() -> None:
    assert format_usd(Decimal("2.5")) == "2.50"
    assert format_usd(Decimal("2.500000")) == "2.50"
    assert format_usd(Decimal("0.123456")) == "0.123456"
    assert format_usd(Decimal("1000")) == "1000.00"
    assert usd.dump_json(Decimal("2.5")) == b'"2.50"'
