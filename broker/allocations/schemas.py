from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from broker.models.job_state import JobState
from broker.models.market import Allocation, AllocationStatus
from broker.models.offer import FractionKind
from broker.money import Usd, micros_to_usd
from broker.types import Float, Int, Text

Digest = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256, lower-case hex")]


class EstimatedCost(BaseModel):
    compute: Usd
    egress: Usd
    latency: Usd
    total: Usd


class AllocationOut(BaseModel):
    id: str
    status: str
    offer_id: str
    round_id: str | None
    accelerators: int
    slice: str | None = Field(
        default=None,
        description='Fractions: the MIG instance ("3g.40gb@4") or shares ("2/4 shared on GPU 0")',
    )
    share: float = Field(default=1.0, description="Of one accelerator, what it is billed at")
    price_per_hour: Usd = Field(description="The provider's ask, locked when the round cleared")
    runtime_hours: float = Field(description="Estimated runtime on this offer")
    rtt_ms: float
    estimated_cost: EstimatedCost
    energy_kwh: float = Field(description="Estimated energy at the wall (PUE included)")
    gco2: float = Field(description="Estimated emissions, g CO2e")
    measured_kwh: float | None = Field(
        default=None,
        description="The energy the run really used at the wall, from its agent's power "
        "readings times the site's PUE (null: not measured)",
    )
    measured_gco2: float | None = Field(
        default=None, description="Its emissions, g CO2e (null: not measured)"
    )
    created_at: datetime
    ended_at: datetime | None

    # Built by hand, not by ``from_attributes``: the table keeps micro-dollars in
    # columns of other names, and the estimate is nested.
    @classmethod
    def of(cls, a: Allocation) -> AllocationOut:
        return cls(
            id=a.id,
            status=a.status.value,
            offer_id=a.offer_id,
            round_id=a.round_id,
            accelerators=a.accelerators,
            slice=a.slice,
            share=a.share_num / a.share_den,
            price_per_hour=micros_to_usd(a.price_per_hour_micros),
            runtime_hours=a.runtime_hours,
            rtt_ms=a.rtt_ms,
            estimated_cost=EstimatedCost(
                compute=micros_to_usd(a.compute_micros),
                egress=micros_to_usd(a.egress_micros),
                latency=micros_to_usd(a.latency_micros),
                total=micros_to_usd(a.cost_micros),
            ),
            energy_kwh=a.energy_kwh,
            gco2=a.gco2,
            measured_kwh=a.measured_kwh,
            measured_gco2=a.measured_gco2,
            created_at=a.created_at,
            ended_at=a.ended_at,
        )


class ProviderAllocation(BaseModel):
    """A job the market gave to one of the provider's offers: what to run and from where."""

    allocation_id: str
    status: AllocationStatus
    job_id: str
    job_state: JobState
    offer_id: str
    accelerator: str = Field(default="", description="The offer's model (catalog key)")
    platform: str
    emulated: bool = Field(description="The offer is emulated: run the job on the CPU")
    accelerators: int
    artifact: str | None
    inputs: str | None
    steps: int | None
    checkpoint_every: int | None
    checkpoint: str | None = Field(description="Resume from this checkpoint, if any")
    checkpoint_step: int
    steps_done: int
    usage_limit_seconds: float | None = Field(
        description="Accelerator-seconds this run may use before the job's budget is spent: "
        "stop it there (null: no budget). Usage past it is not billed"
    )
    deadline_hours: float | None = Field(
        default=None,
        description="The job must finish within this many hours of the run's start: the "
        "broker fails it for good past them (null: no deadline)",
    )
    available_hours: float | None = Field(
        default=None,
        description="The offer is available for this many hours from the run's start: past "
        "them the broker hands the job back to the market (null: no limit)",
    )
    min_memory_gib: float = Field(
        default=0.0, description="Memory the job declared it needs, per accelerator"
    )
    memory_gib: float = Field(
        default=0.0, description="Memory of one of the offer's accelerators, as listed"
    )
    kind: FractionKind = Field(
        default=FractionKind.whole,
        description="What the offer sells of each accelerator: whole, mig or shared",
    )
    slice: str | None = Field(
        default=None,
        description='Fractions: the MIG instance to run on ("3g.40gb@4") or the shares of '
        'the offer\'s accelerator ("2/4 shared on GPU 0"); null: whole accelerators',
    )
    share: float = Field(default=1.0, description="Of one accelerator, the part it holds")
    slice_memory_gib: float | None = Field(
        default=None,
        description="Fractions: the memory the slice may use, GiB (the MIG profile's, or "
        "the shares' memory); the run is held to it",
    )
    device: str | None = Field(
        default=None, description="The node's device the offer sells, as its agent named it"
    )
    service_id: str | None = Field(
        default=None,
        description="A replica of this inference service: serve requests relayed over a "
        "WebSocket to the broker (`/v1/replicas/{allocation_id}/connect`) until the "
        "allocation ends, instead of running the program once",
    )
    relay: str | None = Field(
        default=None,
        description="A replica's broker to connect to, when not the one the agent calls "
        "(null: that one)",
    )
    created_at: datetime


class WorkQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    wait: float = Field(
        default=0,
        ge=0,
        le=30,
        description="Long poll: wait up to this many seconds for work when there is none",
    )


AcceleratorSeconds = Annotated[
    Float | None,
    Field(
        default=None,
        ge=0,
        le=1e10,
        description="Usage of this allocation so far: a running total, not an increment",
    ),
]


class LogLine(BaseModel):
    """A line of the run's log (docs/api.md): the agent's, or the program's stderr."""

    model_config = ConfigDict(extra="forbid")

    seq: Int = Field(
        ge=0,
        le=1_000_000,
        description="Its number in the run, from 0 (a line sent twice is kept once)",
    )
    at: AwareDatetime = Field(description="When the agent wrote it")
    stream: Literal["agent", "program"] = Field(
        default="agent", description="The agent's own line, or the program's stderr"
    )
    text: str = Field(max_length=2000, pattern=r"^[^\x00]*$")


LogLines = Annotated[
    list[LogLine],
    Field(
        default_factory=list,
        max_length=200,
        description="Lines of the run's log written since the last report",
    ),
]


class Progress(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps_done: Int = Field(ge=0, le=100_000_000)
    accelerator_seconds: AcceleratorSeconds = None
    log: LogLines


class CheckpointIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: Digest = Field(description="Array bundle of the state, uploaded to /v1/arrays")
    step: Int = Field(ge=1, le=100_000_000, description="Steps the state has done")


class Finish(BaseModel):
    model_config = ConfigDict(extra="forbid")

    outcome: Literal["succeeded", "failed"]
    result: Digest | None = Field(
        default=None, description="Succeeded: the output arrays, uploaded to /v1/arrays"
    )
    error: Text | None = Field(
        default=None, description="Failed: what went wrong, for the developer"
    )
    retry: bool = Field(
        default=False,
        strict=True,
        description="Failed because of the machine, not the program (out of memory, a "
        "device error): hand the job back to the market, within its attempts",
    )
    accelerator_seconds: AcceleratorSeconds = None
    log: LogLines
    energy_kwh: Float | None = Field(
        default=None,
        ge=0,
        le=1e6,
        description="The energy the run's devices used, kWh, as the agent measured it "
        "(power readings over the run; the site's PUE is the broker's to add); leave it out "
        "when not measured, and the bill keeps the estimate",
    )


class RunOut(BaseModel):
    """The provider's view of a job it runs, after a report: what running it needs and
    what became of the report, nothing of the developer's (no bid, budget, location or
    account)."""

    allocation_id: str
    status: AllocationStatus = Field(description="The allocation: active while it may run")
    job_id: str
    state: JobState = Field(description="The job's state after the report")
    steps: int | None
    steps_done: int
    checkpoint: str | None = Field(description="The latest checkpoint recorded")
    checkpoint_step: int
    result: str | None
    error: str | None = Field(description="Why the run ended, when it failed")
    accelerator_seconds: float = Field(description="This allocation's usage recorded so far")
