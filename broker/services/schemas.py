from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from broker.models.job_state import JobState
from broker.models.service import ServiceState
from broker.money import Usd
from broker.types import CountryCode, Float, IdField, Int, Label, Latitude, Longitude, Platform

Digest = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256, lower-case hex")]
MAX_REPLICAS = 64


class UserRegion(BaseModel):
    """A place the service's requests come from, and its part of them."""

    model_config = ConfigDict(extra="forbid")

    name: Label | None = None
    lat: Latitude
    lon: Longitude
    share: Float = Field(default=1.0, gt=0, le=1e6, description="Relative weight")


class ServiceCreate(BaseModel):
    """A standing bid for replicas of one program near its users. The program
    (`artifact`, from `/v1/artifacts`) is packaged as a job's is; `inputs` (from
    `/v1/arrays`) are example arguments, which every replica compiles and checks on
    before it answers requests. Each replica holds one accelerator at most
    `max_price_per_hour`."""

    model_config = ConfigDict(extra="forbid")

    name: Label | None = None
    artifact: Digest
    inputs: Digest
    users: list[UserRegion] = Field(min_length=1, max_length=32)
    latency_slo_ms: Float = Field(
        gt=0, le=10_000, description="Round trip from each user region to its nearest replica"
    )
    min_replicas: Int = Field(default=1, ge=1, le=MAX_REPLICAS)
    max_replicas: Int = Field(default=4, ge=1, le=MAX_REPLICAS)
    max_price_per_hour: Usd = Field(description="USD per replica-hour (one accelerator)")
    platforms: list[Platform] | None = Field(
        default=None, description="A subset of the artifact's platforms (default: all of them)"
    )
    allowed_countries: list[CountryCode] = Field(default_factory=list, max_length=300)
    target_queue: Float = Field(
        default=2.0,
        gt=0,
        le=10_000,
        description="Scale up when requests waiting per replica stay above this",
    )
    target_p95_ms: Float | None = Field(
        default=None,
        gt=0,
        le=600_000,
        description="Scale up when the 95th percentile of time in a replica stays above this",
    )

    @model_validator(mode="after")
    def _bounds(self) -> ServiceCreate:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})"
            )
        return self


class ReplicaOut(BaseModel):
    """One replica: a job of the service's, where it runs and how it is doing."""

    job_id: IdField
    state: JobState
    allocation_id: str | None
    offer_id: str | None
    accelerator: str | None
    region: str | None
    country: str | None
    lat: float | None
    lon: float | None
    since: datetime | None
    healthy: bool = Field(description="Connected to the broker and answering")
    queued: float | None = Field(description="Requests in it, on average, over the last window")
    requests: int = Field(description="Requests it answered over the last minute")
    waiting_for: str | None = Field(
        default=None, description="For a replica not yet placed: the offer its placement chose"
    )


class ServiceEventOut(BaseModel):
    at: datetime
    kind: str
    replicas_from: int
    replicas_to: int
    reason: str


class RegionStats(BaseModel):
    """What the callers of one user region saw over the last minute."""

    region: str
    requests: int
    errors: int
    within_slo: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None


class ServiceOut(BaseModel):
    id: str
    name: str | None
    state: ServiceState
    endpoint: str = Field(description="POST an arrays bundle of the arguments here")
    artifact: str = Field(description="The program's address (`/v1/artifacts/{sha256}`)")
    relay: str | None = Field(
        default=None,
        description="Where to send requests to skip a hop: the broker's relay process, when "
        "it has one (null: the broker's own URL)",
    )
    users: list[UserRegion]
    latency_slo_ms: float
    min_replicas: int
    max_replicas: int
    desired_replicas: int
    max_price_per_hour: Usd
    platforms: list[str]
    allowed_countries: list[str]
    target_queue: float
    target_p95_ms: float | None
    unmatched: str | None = Field(
        description="Why a user region has no replica within the SLO, or a replica the "
        "service wants has no offer (None: all placed)"
    )
    error: str | None
    replicas: list[ReplicaOut]
    created_at: datetime
    undeployed_at: datetime | None


class ServiceDetail(ServiceOut):
    """A service with what its callers saw over the last minute and its scale events."""

    requests_per_second: float
    errors: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    regions: list[RegionStats]
    events: list[ServiceEventOut]
