"""How numbers read on the dashboard: money, hours, memory, times. Jinja filters."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from broker.billing.amounts import cents_to_usd, ppm_to_percent
from broker.money import format_usd, micros_to_usd

DASH = "\u2014"  # an em dash: no value


def usd(amount: Decimal | None) -> str:
    """``$1,234.50``; sub-cent amounts keep their digits (``$0.000417``)."""
    if amount is None:
        return DASH
    text = format_usd(amount)
    whole, _, fraction = text.partition(".")
    sign = "-" if whole.startswith("-") else ""
    return f"{sign}${int(whole.lstrip('-')):,}.{fraction}"


def per_hour(amount: Decimal | None) -> str:
    return DASH if amount is None else f"{usd(amount)}/h"


def _trim(value: float, digits: int) -> str:
    text = f"{value:,.{digits}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def micros(value: int | None) -> Decimal | None:
    """Stored micro-dollars as dollars, for the other money filters."""
    return None if value is None else micros_to_usd(value)


def cents(value: int | None) -> str:
    """Invoice amounts, kept in cents: ``$1,234.50``."""
    return DASH if value is None else usd(cents_to_usd(value))


def fee(ppm: int | None) -> str:
    """A fee locked in parts per million: ``5 %``, ``7.5 %``."""
    return DASH if ppm is None else f"{ppm_to_percent(ppm)} %"


def usage(ms: int | None) -> str:
    """Metered accelerator-milliseconds as accelerator-hours."""
    return DASH if ms is None else accelerator_hours(ms / 1000)


def hours(value: float | None) -> str:
    """``3 h``, ``1.5 h``, ``45 min``, ``20 s``."""
    if value is None:
        return DASH
    if value < 1 / 60:
        return f"{_trim(value * 3600, 1)} s"
    if value < 1:
        return f"{_trim(value * 60, 1)} min"
    return f"{_trim(value, 2)} h"


def accelerator_hours(seconds: float | None) -> str:
    """Metered usage, given in accelerator-seconds, as accelerator-hours."""
    return DASH if seconds is None else f"{_trim(seconds / 3600, 4)} accelerator-h"


def kwh(value: float | None) -> str:
    """Energy: ``0.42 kWh``, ``12 kWh``, ``1,200 kWh``."""
    if value is None:
        return DASH
    return f"{value:,.0f} kWh" if value >= 100 else f"{_trim(value, 2 if value >= 1 else 3)} kWh"


def co2(grams: float | None) -> str:
    """Emissions: ``850 g CO2e``, ``1.2 kg CO2e``, ``3.4 t CO2e``."""
    if grams is None:
        return DASH
    if grams >= 1e6:
        return f"{_trim(grams / 1e6, 2)} t CO2e"
    if grams >= 1000:
        return f"{_trim(grams / 1000, 1)} kg CO2e"
    return f"{grams:,.0f} g CO2e"


def gib(value: float | None) -> str:
    if value is None:
        return DASH
    return f"{_trim(value, 0 if value >= 10 else 1)} GiB"


def seconds(value: float | None) -> str:
    """Solve times: ``12 ms``, ``1.25 s``."""
    if value is None:
        return DASH
    return f"{value * 1000:.0f} ms" if value < 1 else f"{_trim(value, 2)} s"


def percent(fraction: float | None) -> str:
    """A fraction as a percentage with two significant digits when small: ``0.072 %``."""
    if fraction is None:
        return DASH
    value = fraction * 100
    if value == 0:
        return "0 %"
    exponent = int(f"{abs(value):e}".split("e")[1])
    digits = 2 if exponent >= 0 else 1 - exponent
    return f"{_trim(value, min(digits, 6))} %"


def number(value: float | int | None) -> str:
    if value is None:
        return DASH
    return f"{value:,.0f}" if abs(value) >= 100 else _trim(float(value), 2)


def when(moment: datetime | None) -> str:
    """``2025-03-01 14:02:09 UTC``."""
    if moment is None:
        return DASH
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def ago(moment: datetime | None, now: datetime | None = None) -> str:
    """``5 s ago``, ``3 min ago``, ``2 h ago``, ``4 d ago``."""
    if moment is None:
        return DASH
    delta = ((now or datetime.now(UTC)) - moment).total_seconds()
    if delta < 0:
        return "just now"
    for size, unit in ((86_400, "d"), (3600, "h"), (60, "min")):
        if delta >= size:
            return f"{int(delta // size)} {unit} ago"
    return f"{int(delta)} s ago"


def amount(value: Decimal | None) -> str:
    """Dollars as a form field holds them: ``2.49``, no sign or separators."""
    return "" if value is None else format_usd(value)


FILTERS = {
    "amount": amount,
    "usd": usd,
    "cents": cents,
    "micros": micros,
    "fee": fee,
    "usage": usage,
    "per_hour": per_hour,
    "hours": hours,
    "accelerator_hours": accelerator_hours,
    "gib": gib,
    "kwh": kwh,
    "co2": co2,
    "seconds": seconds,
    "percent": percent,
    "number": number,
    "when": when,
    "ago": ago,
}
