from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from broker.models.node import NodeStatus
from broker.offers.schemas import OfferOut, OfferTerms
from broker.pagination import PageQuery
from broker.types import (
    CountryCode,
    Float,
    IdField,
    Int,
    Label,
    Latitude,
    Longitude,
    Platform,
    RegionName,
)

NodeName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=100,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        examples=["gpu-box-1"],
        description="Unique among the provider's nodes; the host name by default",
    ),
]
ShortText = Annotated[str, Field(max_length=64, pattern=r"^[^\x00-\x1f\x7f]*$")]


class DeviceReport(BaseModel):
    """One accelerator as the agent's adapter found it."""

    model_config = ConfigDict(extra="forbid")

    id: ShortText
    name: Label
    model: ShortText | None = Field(default=None, description="Catalog key, if known")
    platform: Platform
    count: Int = Field(default=1, ge=1, le=4096)
    memory_gib: Float | None = Field(default=None, ge=0, le=1_000_000)
    healthy: bool = Field(default=True, strict=True)
    utilization: Float | None = Field(default=None, ge=0, le=1)
    offerable: bool = Field(default=True, strict=True)
    reason: Label | None = Field(default=None, description="Why it is not offered")


Devices = Annotated[list[DeviceReport], Field(max_length=1024)]


class NodeRegister(BaseModel):
    """An agent signing on. Registering a name again is the same node restarting: the
    earlier agent's key stops working and the jobs it held go back to the market."""

    model_config = ConfigDict(extra="forbid")

    name: NodeName
    region: RegionName
    country: CountryCode
    lat: Latitude
    lon: Longitude
    adapters: list[Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,31}$")]] = Field(
        default_factory=list, max_length=16
    )
    devices: Devices = Field(default_factory=list)
    agent_version: ShortText | None = None


class UsageReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    allocation_id: IdField
    accelerator_seconds: Float = Field(
        ge=0,
        le=1e10,
        description="Running total for this allocation, not an increment",
    )


class Heartbeat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    devices: Devices | None = Field(default=None, description="Absent: unchanged")
    usage: list[UsageReport] = Field(default_factory=list, max_length=1024)


class NodeOffer(OfferTerms):
    """One model's accelerators on the node (or one MIG GPU's instances), at the
    provider's price. The node's location fills the offer's; the catalog fills the
    hardware figures unless given."""

    count: Int = Field(ge=0, le=100_000, description="Accelerators offered; 0 withdraws")
    device: str | None = Field(
        default=None,
        max_length=64,
        pattern=r"^[A-Za-z0-9._:-]+$",
        description="The node's device this offer sells (MIG offers: the GPU's UUID). "
        "A node lists one offer per model, kind and device",
    )


class NodeOffers(BaseModel):
    model_config = ConfigDict(extra="forbid")

    offers: list[NodeOffer] = Field(max_length=64)


class NodeOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    provider_id: str
    name: str
    status: NodeStatus
    status_reason: str | None
    adapters: list[str]
    region: str
    country: str
    lat: float
    lon: float
    devices: list[DeviceReport]
    agent_version: str | None
    last_heartbeat_at: datetime
    created_at: datetime
    updated_at: datetime


class NodeRegistered(BaseModel):
    node: NodeOut
    api_key: str = Field(
        description="The node key, shown once: the agent's credential for this node's "
        "heartbeats, offers and allocations"
    )
    heartbeat_seconds: float = Field(description="Send a heartbeat at least this often")
    timeout_seconds: float = Field(description="Silent this long, the node goes offline")


class HeartbeatOut(BaseModel):
    node: NodeOut
    resync: bool = Field(
        description="The node had gone offline and its offers were withdrawn: publish them again"
    )
    ended: list[str] = Field(
        description="Reported allocations that are no longer active here: stop running them"
    )


class NodeOffersOut(BaseModel):
    offers: list[OfferOut]


class NodeQuery(PageQuery):
    status: NodeStatus | None = None
