"""Column and field types shared by several domains."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import Path
from pydantic import Field
from sqlalchemy import JSON
from sqlalchemy.dialects.postgresql import JSONB

# Lists of short strings (platforms, vendors, countries). JSONB on PostgreSQL so
# that they compare and group; plain JSON text on SQLite. Always stored sorted.
StrList = JSON().with_variant(JSONB(), "postgresql")

Platform = Literal["cuda", "rocm", "tpu", "cpu"]
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
Latitude = Annotated[float, Field(ge=-90, le=90)]
Longitude = Annotated[float, Field(ge=-180, le=180)]

ObjectId = Annotated[
    str,
    Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$", description="e.g. job_3f2a..."),
]
# Free text: no control characters (PostgreSQL cannot store NUL in text).
Label = Annotated[str, Field(max_length=200, pattern=r"^[^\x00-\x1f\x7f]*$")]
