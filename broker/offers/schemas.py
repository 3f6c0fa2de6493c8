from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from broker.models.offer import FractionKind, OfferStatus
from broker.money import Usd
from broker.pagination import PageQuery
from broker.types import (
    CountryCode,
    Latitude,
    Longitude,
    ModelKey,
    NotBool,
    Platform,
    RegionName,
    VendorName,
)

Count = Annotated[int, NotBool, Field(ge=1, le=100_000, description="Accelerators offered")]
PositiveFigure = Annotated[float, NotBool, Field(gt=0, le=1_000_000)]
Hours = Annotated[float, NotBool, Field(gt=0, le=1_000_000)]
MigInstance = Annotated[
    str,
    Field(pattern=r"^([1-8]g|[sdqc]px)\.[0-9]{1,3}gb@[0-7]$", examples=["3g.40gb@4", "cpx.24gb@3"]),
]
Efficiency = Annotated[
    float,
    NotBool,
    Field(gt=0, le=1, description="Fraction of peak a job reaches (default 0.4)"),
]


class OfferTerms(BaseModel):
    """What an ask offers, wherever it is: the model, how many, the price, and hardware
    figures where they differ from the catalog's."""

    model_config = ConfigDict(extra="forbid")

    accelerator: ModelKey
    count: Count
    price_per_hour: Usd = Field(description="Ask, USD per accelerator-hour")
    vendor: VendorName | None = None
    platform: Platform | None = None
    memory_gib: PositiveFigure | None = None
    tflops_bf16: PositiveFigure | None = None
    tflops_fp32: PositiveFigure | None = None
    mem_bw_gbps: PositiveFigure | None = None
    available_hours: Hours | None = None
    efficiency: Efficiency = 0.4
    power_w: float | None = Field(
        default=None,
        gt=0,
        le=10_000,
        description="Watts one accelerator draws under load; default its model's datasheet "
        "TDP. At least 30 % of the TDP and at most the TDP, where the catalog knows it",
    )
    pue: float | None = Field(
        default=None,
        ge=1,
        le=3,
        description="The site's power usage effectiveness; default 1.0 for edge devices, "
        "1.5 for other sites",
    )
    grid_g_per_kwh: float | None = Field(
        default=None,
        ge=0,
        le=2000,
        description="Carbon intensity of the electricity used, g CO2e per kWh (a contract "
        "for clean power, a plant on site); default the region's or the country's grid",
    )
    startup_seconds: float | None = Field(
        default=None,
        ge=0,
        le=600,
        description="Seconds every run takes besides the program's work (checks, compiling, "
        "fetching and reporting), as the agent measured them; added to each program's "
        "estimated runtime until the model's finished runs give the broker its own figure",
    )
    transfer_s_per_gb: float | None = Field(
        default=None,
        ge=0,
        le=3600,
        description="Seconds a run takes per GB of a program's inputs and results moved in "
        "and out (reading, decoding, writing), as the agent measured them; added to each "
        "program's estimated runtime in proportion to its data",
    )
    compile_s_per_kb: float | None = Field(
        default=None,
        ge=0,
        le=60,
        description="Seconds a run takes per KB of serialized program to compile it (and "
        "run it a first time), as the agent measured them; added to each program's estimated "
        "runtime in proportion to its size",
    )
    emulated: bool = Field(
        default=False,
        description="Capacity of this model emulated on a CPU (demos): the agent runs its "
        "jobs on the CPU, and the offer says so everywhere. Accepted only by a broker "
        "started with BROKER_ALLOW_EMULATION=1",
    )
    kind: FractionKind = Field(
        default=FractionKind.whole,
        description="whole: whole accelerators; mig: one GPU in MIG mode, sold as isolated "
        "instances of its model's profiles (count 1); shared: each accelerator time-sliced "
        "into `shares` shares with `memory_per_share_gib` each (compute not isolated)",
    )
    shares: int | None = Field(
        default=None, ge=2, le=64, description="Shared offers: shares per accelerator"
    )
    memory_per_share_gib: PositiveFigure | None = Field(
        default=None, description="Shared offers: the memory each share may use, GiB"
    )
    mig_instances: list[MigInstance] = Field(
        default_factory=list,
        max_length=8,
        description="MIG offers: the instances cut now, as PROFILE@START (e.g. 3g.40gb@4); "
        "none: the GPU is cut as clearing proposes",
    )


class OfferCreate(OfferTerms):
    """An ask. Give `accelerator` by its catalog key and the broker fills the hardware
    figures (vendor, platform, memory, throughput, bandwidth); a model outside the
    catalog needs all of them."""

    region: RegionName
    country: CountryCode
    lat: Latitude
    lon: Longitude


class OfferUpdate(BaseModel):
    """Fields a provider may change on an active offer; absent fields stay as they are."""

    model_config = ConfigDict(extra="forbid")

    price_per_hour: Usd | None = None
    capacity: Count | None = Field(
        default=None,
        description="Accelerators listed in all; the free count follows, less what matches hold",
    )
    available_hours: Hours | None = Field(default=None, description="null clears the limit")
    efficiency: Efficiency | None = None


class OfferOut(BaseModel):
    # Read from the table's row (``Offer.price_per_hour`` gives the ask in dollars).
    model_config = ConfigDict(from_attributes=True)

    id: str
    provider_id: str
    node_id: str | None = Field(description="The node whose agent publishes it, if any")
    status: OfferStatus
    vendor: str
    accelerator: str
    platform: str
    count: int = Field(description="Free accelerators: capacity less what matches hold")
    capacity: int = Field(description="Accelerators listed in all")
    kind: FractionKind = Field(
        validation_alias="fraction_kind", description="whole, mig (isolated slices) or shared"
    )
    shares: int = Field(description="Shared offers: shares per accelerator (0: not shared)")
    memory_per_share_gib: float | None = Field(description="Shared offers: GiB per share")
    shares_busy: int = Field(description="Shared offers: shares that matches hold")
    mig_instances: list[str] = Field(description="MIG offers: free instances, PROFILE@START")
    mig_busy: list[str] = Field(description="MIG offers: instances that matches hold")
    device: str | None = Field(
        default=None, description="The node's device it sells, when its agent names one"
    )
    memory_gib: float
    tflops_bf16: float
    tflops_fp32: float
    mem_bw_gbps: float
    price_per_hour: Usd
    region: str
    country: str
    lat: float
    lon: float
    available_hours: float | None
    efficiency: float
    power_w: float | None = Field(description="Stated watts per accelerator (null: the TDP)")
    pue: float | None = Field(description="Stated PUE (null: the default for its site)")
    grid_g_per_kwh: float | None = Field(
        description="Stated g CO2e per kWh (null: its region's or country's grid)"
    )
    startup_seconds: float | None = Field(
        default=None, description="A run's start-up as its agent measured it (null: not measured)"
    )
    transfer_s_per_gb: float | None = Field(
        default=None,
        description="Seconds per GB of inputs and results a run moves, as its agent measured "
        "them (null: not measured)",
    )
    compile_s_per_kb: float | None = Field(
        default=None,
        description="Seconds per KB of program compiling takes, as its agent measured them "
        "(null: not measured)",
    )
    emulated: bool = Field(description="Emulated on a CPU, not the real hardware (demos)")
    created_at: datetime
    updated_at: datetime
    withdrawn_at: datetime | None
    suspended_at: datetime | None = Field(
        default=None, description="When the broker suspended it (status suspended)"
    )
    suspended_reason: str | None = Field(
        default=None,
        description="Why the broker took it off the book, and what to do: it left matches "
        "unstarted repeatedly (docs/market.md)",
    )


class OfferSort(StrEnum):
    price_asc = "price"
    price_desc = "-price"
    newest = "-created"


class OfferQuery(PageQuery):
    """Search filters; every filter narrows the result."""

    vendor: VendorName | None = None
    accelerator: ModelKey | None = Field(default=None, description="Model key or alias")
    platform: Platform | None = None
    min_memory_gib: float | None = Field(default=None, ge=0, le=1_000_000)
    min_count: int | None = Field(default=None, ge=1, le=100_000)
    region: RegionName | None = None
    country: CountryCode | None = None
    max_price: Usd | None = Field(default=None, description="Highest ask, USD per hour")
    kind: FractionKind | None = Field(
        default=None, description="What it sells of each accelerator: whole, mig or shared"
    )
    mine: bool = Field(default=False, description="Only the caller's own offers")
    status: OfferStatus | None = Field(
        default=OfferStatus.active, description="active (default) or withdrawn"
    )
    sort: OfferSort = Field(default=OfferSort.price_asc, description="price, -price or -created")
