from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from broker.allocations.schemas import AllocationOut
from broker.models.job_state import JobState
from broker.money import Usd
from broker.pagination import PageQuery
from broker.types import (
    CountryCode,
    Dtype,
    Float,
    IdField,
    Int,
    Label,
    Latitude,
    Longitude,
    ModelKey,
    NotBool,
    Platform,
    RegionName,
    VendorName,
)

MigProfileName = Annotated[
    str,
    Field(
        pattern=r"^([1-8]g|[sdqc]px)\.[0-9]{1,3}gb$",
        examples=["3g.40gb", "cpx.24gb"],
        description="A MIG profile, or an AMD compute partition",
    ),
]
Hours = Annotated[float, NotBool, Field(gt=0, le=100_000)]
Digest = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256, lower-case hex")]
Work = Annotated[float, NotBool, Field(ge=0, le=1e30)]


class Unmatched(BaseModel):
    """Why an open job is not matched: how many active offers each rule rules out."""

    offers_considered: int
    feasible: int = Field(description="Offers that pass every rule")
    ruled_out: dict[str, int] = Field(
        description="Per rule, the offers it rules out (an offer failing several counts in each)"
    )
    nearest: dict[str, str] = Field(
        default_factory=dict,
        description="Per rule that rules offers out, the figure on offer nearest to passing "
        "it (the largest offer, the cheapest ask, the nearest region...), among the offers "
        "that pass every other rule, or all of them when none does",
    )
    last_round_id: str | None
    last_round_at: datetime | None
    summary: str


class JobCreate(BaseModel):
    """A bid. A job the broker runs names its program (`artifact`, uploaded to
    `/v1/artifacts`) and inputs (`inputs`, uploaded to `/v1/arrays`); its platforms,
    flops, bytes and dtype then come from the artifact. A bid for capacity alone gives
    `platforms` and the runtime, either as `duration_hours` or as the work of the whole
    job (`flops` and/or `bytes`, with `dtype`), from which the solver estimates the
    runtime on each offer."""

    model_config = ConfigDict(extra="forbid")

    name: Label | None = None
    accelerators: Float = Field(
        default=1,
        gt=0,
        le=1024,
        description="All on one offer: a whole number, or part of one accelerator, more than "
        "0 and less than 1 in thousandths (0.5: half its compute and memory)",
    )
    mig_profile: MigProfileName | None = Field(
        default=None,
        description="Instead of a fraction: one MIG instance of this profile (e.g. 3g.40gb), "
        "hardware-isolated; the profile must exist for the models it names",
    )
    accepts_shared: bool = Field(
        default=False,
        description="A fraction may run on shared accelerators (time-sliced with a memory "
        "cap: cheaper, compute not isolated)",
    )
    min_memory_gib: Float = Field(default=0, ge=0, le=100_000, description="Per accelerator")
    vendors: list[VendorName] = Field(default_factory=list, max_length=16)
    accelerator_models: list[ModelKey] = Field(default_factory=list, max_length=64)
    platforms: list[Platform] | None = Field(
        default=None,
        min_length=1,
        max_length=4,
        description="Backends the job may run on; with an artifact, a subset of its platforms "
        "(default: all of them)",
    )
    artifact: Digest | None = Field(default=None, description="The program to run")
    inputs: Digest | None = Field(default=None, description="Its input arrays (flat leaves)")
    steps: Int | None = Field(
        default=None,
        ge=1,
        le=100_000_000,
        description="Iterative artifacts: steps to run",
    )
    checkpoint_every: Int | None = Field(
        default=None,
        ge=1,
        le=100_000_000,
        description="Save the state every this many steps",
    )
    max_price_per_hour: Usd = Field(description="Bid, USD per accelerator-hour")
    budget_usd: Usd | None = Field(
        default=None,
        description="The most the job may cost over all its runs, the broker's fee included: "
        "it is never matched where its estimated cost is higher, and it is stopped (failed) "
        "when its metered cost reaches it",
    )
    duration_hours: Hours | None = None
    flops: Work | None = None
    bytes: Work | None = None
    dtype: Dtype | None = Field(default=None, description="bf16 (default with flops) or fp32")
    deadline_hours: Hours | None = None
    max_gco2: Float | None = Field(
        default=None,
        gt=0,
        le=1e12,
        description="The most its run may emit, in g CO2e: offers whose estimate is higher "
        "are ruled out",
    )
    carbon_usd_per_t: Float | None = Field(
        default=None,
        ge=0,
        le=100_000,
        description="What avoiding a tonne of CO2e is worth to it, in USD: added to the cost "
        "clearing minimises (never charged); default the market's",
    )
    latency_slo_ms: Float | None = Field(default=None, gt=0, le=1_000_000)
    user_lat: Latitude | None = None
    user_lon: Longitude | None = None
    data_region: RegionName | None = None
    data_gb: Float | None = Field(default=None, ge=0, le=1e9)
    allowed_countries: list[CountryCode] = Field(default_factory=list, max_length=300)
    priority: Int = Field(default=1, ge=1, le=1000)


class JobOut(BaseModel):
    id: str
    account_id: str
    name: str | None
    state: JobState
    accelerators: int | float = Field(
        description="Accelerators on one offer, or the part of one it asks for (0.5)"
    )
    mig_profile: str | None = Field(default=None, description="The MIG profile it asks for")
    accepts_shared: bool = Field(default=False, description="May run on shared accelerators")
    min_memory_gib: float
    vendors: list[str]
    accelerator_models: list[str]
    platforms: list[str]
    max_price_per_hour: Usd
    budget_usd: Usd | None
    price_per_hour: Usd | None = Field(
        description="The ask locked when the market matched the job (its latest match): "
        "what it pays per accelerator-hour, before the broker's fee"
    )
    fee_percent: Decimal | None = Field(description="The broker's fee locked with that match")
    estimated_cost_usd: Usd | None = Field(
        description="That match's estimated compute cost, fee included"
    )
    cost_usd: Usd = Field(
        description="Metered cost over all its runs at their locked asks, fee included, to "
        "the micro-dollar (invoices round each line to the cent once)"
    )
    duration_hours: float | None
    flops: float | None
    bytes: float | None
    io_bytes: float | None = Field(
        default=None,
        description="Bytes a run moves besides its work: the inputs in, the results and "
        "checkpoints out (programs only); the market adds their transfer to the estimate",
    )
    program_bytes: int | None = Field(
        default=None,
        description="The size of its serialized program (programs only); the market adds "
        "compiling it to the estimate",
    )
    dtype: str | None
    deadline_hours: float | None
    max_gco2: float | None
    carbon_usd_per_t: float | None
    latency_slo_ms: float | None
    user_lat: float | None
    user_lon: float | None
    data_region: str | None
    data_gb: float | None
    allowed_countries: list[str]
    priority: int
    artifact: str | None
    inputs: str | None
    steps: int | None
    checkpoint_every: int | None
    steps_done: int = Field(description="Progress the provider reported")
    checkpoint: str | None = Field(description="Latest checkpoint (array bundle)")
    checkpoint_step: int
    result: str | None = Field(description="Output arrays, once the job succeeded")
    attempts: int = Field(description="Times a provider started the job")
    accelerator_seconds: float = Field(
        description="Metered usage over all its runs, as its providers reported it"
    )
    error: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobDetail(JobOut):
    allocation: AllocationOut | None = Field(
        description="The match: offer, locked ask, estimated runtime and cost (latest, if any)"
    )
    unmatched: Unmatched | None = Field(description="For an open job: why it is not matched")


class RunOut(BaseModel):
    """One run of a job: where the market placed it and how it ended."""

    allocation_id: str
    status: str
    node: str | None = Field(description="The agent's node that ran it (None: listed by hand)")
    accelerator: str
    accelerators: int
    held: str = Field(
        description='What it held: "2 x h100-sxm", "h100-sxm 3g.40gb" (a MIG instance), '
        '"0.5 x cpu shared" (shares of one accelerator)'
    )
    slice: str | None = Field(
        description='Fractions: the MIG instance ("3g.40gb@4") or shares ("2/4 shared on GPU 0")'
    )
    share: float = Field(description="Of one accelerator, what it is metered and billed at")
    platform: str
    emulated: bool = Field(description="Hardware emulated on a CPU (a demo)")
    region: str
    country: str
    price_per_hour: Usd
    estimated_runtime_hours: float
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    accelerator_seconds: float = Field(description="Usage its provider reported")
    end_reason: str | None = Field(
        description="Why it ended when it did not simply finish: the agent's error, a "
        "cancellation, a lost node, a start timeout, the deadline"
    )


class LogLineOut(BaseModel):
    """A line of a run's log, as the run's agent reported it."""

    allocation_id: str = Field(description="The run it belongs to")
    seq: int = Field(description="Its number in the run, from 0")
    at: datetime = Field(description="When the agent wrote it")
    stream: str = Field(description="agent: the agent's own line; program: the program's stderr")
    text: str


class JobQuery(PageQuery):
    state: JobState | None = Field(default=None, description="Only jobs in this state")
    account_id: IdField | None = Field(default=None, description="Admins: only this account's jobs")
