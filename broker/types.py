"""Column and field types shared by several domains."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import Path
from pydantic import AfterValidator, AwareDatetime, BeforeValidator, Field
from sqlalchemy import JSON
from sqlalchemy.dialects.postgresql import JSONB

from broker import platforms

# Lists of short strings (platforms, vendors, countries). JSONB on PostgreSQL so
# that they compare and group; plain JSON text on SQLite. Always stored sorted.
StrList = JSON().with_variant(JSONB(), "postgresql")

Platform = platforms.Platform
Dtype = Literal["bf16", "fp32"]

VendorName = Annotated[
    str,
    Field(
        pattern=r"^[a-z][a-z0-9-]{0,31}$",
        examples=["nvidia"],
        description="Lower-case vendor: nvidia, amd, google, edge, cpu, ...",
    ),
]
ModelKey = Annotated[
    str,
    Field(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]*$",
        examples=["h100-sxm"],
        description="Catalog model key, alias or name",
    ),
]
CountryCode = Annotated[
    str,
    Field(pattern=r"^[A-Z]{2}$", examples=["NL"], description="ISO 3166-1 alpha-2, upper case"),
]
RegionName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._:/-]*$",
        examples=["europe-west4"],
    ),
]


def _not_bool(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError("must be a number, not true or false")
    return value


# Numbers in requests: pydantic would read true as 1; the API refuses it. (Numeric
# strings stay accepted, which the web forms rely on.)
NotBool = BeforeValidator(_not_bool)
Int = Annotated[int, NotBool]
Float = Annotated[float, NotBool]

Latitude = Annotated[float, NotBool, Field(ge=-90, le=90)]
Longitude = Annotated[float, NotBool, Field(ge=-180, le=180)]

_ID_PATTERN = r"^[A-Za-z0-9_-]+$"
ObjectId = Annotated[
    str,
    Path(min_length=1, max_length=64, pattern=_ID_PATTERN, description="e.g. job_3f2a..."),
]
# An id in a body or a query (an account to filter by, an allocation reported on).
IdField = Annotated[
    str, Field(min_length=1, max_length=64, pattern=_ID_PATTERN, examples=["acc_3f2a9c1d"])
]
# Free text: no control characters (PostgreSQL cannot store NUL in text).
Label = Annotated[str, Field(max_length=200, pattern=r"^[^\x00-\x1f\x7f]*$")]
# Longer text that may span lines (an error report), still without NUL.
Text = Annotated[str, Field(max_length=4000, pattern=r"^[^\x00]*$")]


_ISO_TIME = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]")


def _iso_time(value: object) -> object:
    # pydantic would also read a number as seconds since 1970: a typo, not a time.
    if isinstance(value, datetime) or (isinstance(value, str) and _ISO_TIME.match(value)):
        return value
    raise ValueError("must be an ISO 8601 time with its UTC offset, e.g. 2026-01-01T00:00:00Z")


def _to_utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00+01:00 is before the first UTC instant
        raise ValueError("is out of range once converted to UTC") from None


# A moment given as input: with its UTC offset (a naive time is ambiguous), kept in UTC.
Moment = Annotated[
    AwareDatetime,
    BeforeValidator(_iso_time),
    AfterValidator(_to_utc),
    Field(examples=["2026-01-01T00:00:00Z"], description="ISO 8601 with its UTC offset"),
]
