"""From HTML forms to the API's own request schemas, so the browser is checked by the
same rules as the API; and service calls that leave nothing behind when refused."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from enum import StrEnum
from typing import Any, TypeVar

from sqlalchemy.orm import Session
from starlette.datastructures import FormData

from broker.errors import InvalidInput

T = TypeVar("T")
E = TypeVar("E", bound=StrEnum)


def choice(kind: type[E], value: str, name: str) -> E | None:
    """A filter from a query string: one of ``kind``'s values, or None for all."""
    if not value:
        return None
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(member.value for member in kind)
        raise InvalidInput(f"{name} must be one of {allowed}", field=name) from None


def text(form: FormData, name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


def values(form: FormData) -> dict[str, str]:
    """What was typed, to fill the form again when it is refused (never the CSRF token)."""
    return {k: v for k, v in form.items() if isinstance(v, str) and k != "csrf_token"}


def given(form: FormData, names: Iterable[str]) -> dict[str, Any]:
    """The named fields that were filled in; blank ones are left out (schema defaults)."""
    return {name: value for name in names if (value := text(form, name))}


def listed(form: FormData, name: str) -> list[str]:
    """A list from checkboxes of one name, or from one comma-separated text field."""
    items: list[str] = []
    for value in form.getlist(name):
        if isinstance(value, str):
            items.extend(part.strip() for part in value.split(","))
    return [item for item in items if item]


def attempt(session: Session, call: Callable[[], T]) -> T:
    """Run a service call in a savepoint: when it is refused (a BrokerError), whatever
    it wrote is undone, and the page can show the form again with the reason."""
    with session.begin_nested():
        return call()
