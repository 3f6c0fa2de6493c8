"""Node operations: register, heartbeat, publish offers, sign off, and the sweep that
marks silent nodes offline. Functions take the session and never commit.

Rows are locked node first, then offers, allocations and jobs (the order the
rest of the broker uses after the node), so concurrent heartbeats, sweeps and
clearing rounds cannot deadlock.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from broker import ledger
from broker.accounts.callers import Agent
from broker.accounts.service import issue_key
from broker.accounts.visibility import own_rows, owns
from broker.allocations.service import meter
from broker.billing import service as billing
from broker.db import new_id, utcnow
from broker.errors import Conflict, Forbidden, NotFound
from broker.models.account import Account, ApiKey
from broker.models.job import Job
from broker.models.market import Allocation, AllocationStatus
from broker.models.node import Node, NodeStatus
from broker.models.offer import FractionKind, Offer, OfferStatus
from broker.money import usd_to_micros
from broker.nodes.schemas import DeviceReport, Heartbeat, NodeOffer, NodeQuery, NodeRegister
from broker.offers.schemas import OfferCreate
from broker.offers.service import (
    check_emulation,
    create_offer,
    fraction_terms,
    hardware_figures,
    resolve_model,
    withdraw_offer,
)


def register(
    session: Session, provider: Account, data: NodeRegister, max_attempts: int
) -> tuple[Node, str, bool]:
    """Sign a node on; returns it, its new node key, and whether it was new.

    The same name again is the machine's agent restarting: its earlier key is
    revoked, so a stale agent still running stops at its next call, and jobs the
    earlier agent held go back to the market (the new agent knows nothing of them).
    """
    node = session.scalar(
        select(Node)
        .where(Node.provider_id == provider.id, Node.name == data.name)
        .with_for_update()
    )
    created = node is None
    if node is None:
        node = Node(id=new_id("node"), provider_id=provider.id, name=data.name)
        try:
            # Two agents signing on with one name at once: the unique index decides.
            with session.begin_nested():
                session.add(node)
                _describe(node, data)
                session.flush()
        except IntegrityError:
            raise Conflict(
                f"node {data.name!r} is registering from another agent right now",
                field="body.name",
            ) from None
    else:
        _describe(node, data)
        _hand_back(session, node, "the node's agent restarted", max_attempts)
        _revoke_keys(session, node)
    node.status, node.status_reason = NodeStatus.online, None
    node.last_heartbeat_at = node.updated_at = utcnow()
    session.flush()
    return node, issue_key(session, provider, node_id=node.id), created


def _describe(node: Node, data: NodeRegister) -> None:
    node.region, node.country, node.lat, node.lon = data.region, data.country, data.lat, data.lon
    node.adapters = list(data.adapters)
    node.devices = _devices(data.devices)
    node.agent_version = data.agent_version


def _devices(devices: list[DeviceReport]) -> list[dict[str, Any]]:
    return [d.model_dump(mode="json") for d in devices]


def get_node(session: Session, viewer: Account, node_id: str) -> Node:
    """A node its provider (or an admin) may read; others get 404."""
    node = session.get(Node, node_id)
    if node is None or not owns(viewer, node.provider_id):
        raise NotFound(f"no node {node_id!r} of yours")
    return node


def list_nodes(session: Session, viewer: Account, query: NodeQuery) -> tuple[list[Node], int]:
    conditions = own_rows(viewer, Node.provider_id)
    if query.status is not None:
        conditions.append(Node.status == query.status)
    total = session.scalar(select(func.count()).select_from(Node).where(*conditions)) or 0
    rows = session.scalars(
        select(Node)
        .where(*conditions)
        .order_by(Node.created_at, Node.id)
        .limit(query.limit)
        .offset(query.offset)
    ).all()
    return list(rows), total


def _agent_node(session: Session, agent: Agent, node_id: str) -> Node:
    """The node, locked, if the caller is its agent (or its provider, or an admin)."""
    node = session.scalar(select(Node).where(Node.id == node_id).with_for_update())
    account = agent.account
    if node is None or not owns(account, node.provider_id):
        raise NotFound(f"no node {node_id!r} of yours")
    if agent.node_id is not None and agent.node_id != node.id:
        raise Forbidden(f"this key is node {agent.node_id}'s; it cannot act for node {node_id}")
    return node


def heartbeat(
    session: Session, agent: Agent, node_id: str, data: Heartbeat
) -> tuple[Node, bool, list[str]]:
    """The node is alive. Returns it, whether it must publish its offers again (it
    had been marked offline, which withdrew them), and which of the reported
    allocations are no longer active on it (to stop)."""
    node = _agent_node(session, agent, node_id)
    if node.status == NodeStatus.stopped:
        raise Conflict(f"node {node.name} has signed off; register it again", field="node")
    resync = node.status == NodeStatus.offline
    node.status, node.status_reason = NodeStatus.online, None
    node.last_heartbeat_at = node.updated_at = utcnow()
    if data.devices is not None:
        node.devices = _devices(data.devices)
    ended = []
    for report in sorted(data.usage, key=lambda r: r.allocation_id):  # one lock order
        row = _node_allocation(session, node, report.allocation_id)
        if row is None:
            ended.append(report.allocation_id)
        elif meter(session, *row, report.accelerator_seconds):
            billing.stop_at_budget(session, row[1])
            ended.append(report.allocation_id)
    session.flush()
    return node, resync, ended


def _node_allocation(
    session: Session, node: Node, allocation_id: str
) -> tuple[Allocation, Job] | None:
    """The node's active allocation and its job, locked; None if it is not one."""
    allocation = session.scalar(
        select(Allocation)
        .join(Offer, Offer.id == Allocation.offer_id)
        .where(
            Allocation.id == allocation_id,
            Allocation.status == AllocationStatus.active,
            Offer.node_id == node.id,
        )
        .with_for_update()
    )
    if allocation is None:
        return None
    job = session.scalar(select(Job).where(Job.id == allocation.job_id).with_for_update())
    assert job is not None  # a foreign key
    return allocation, job


def _offer_key(offer: Offer) -> tuple[str, str, str]:
    """What a node's offer is known by: its model, its kind and its device."""
    return offer.accelerator, FractionKind(offer.fraction_kind).value, offer.device or ""


def sync_offers(
    session: Session, agent: Agent, node_id: str, wanted: list[NodeOffer]
) -> list[Offer]:
    """Make the node's active offers what the agent says it has: one offer per model,
    kind (whole, mig, shared) and device, at the agent's price and count. Offers no
    longer listed (or listed with count 0) are withdrawn: jobs matched to them and not
    started go back to the book, running ones finish. The same list again changes
    nothing, so the agent may resend it freely.
    """
    node = _agent_node(session, agent, node_id)
    if node.status != NodeStatus.online:
        raise Conflict(
            f"node {node.name} is {node.status.value}: send a heartbeat or register first",
            field="node",
        )
    provider = session.get(Account, node.provider_id)
    assert provider is not None  # a foreign key
    by_key: dict[tuple[str, str, str], NodeOffer] = {}
    for item in wanted:
        key = (resolve_model(item.accelerator), item.kind.value, item.device or "")
        if key in by_key:
            what = f"{key[0]} ({key[1]}{', ' + key[2] if key[2] else ''})"
            raise Conflict(
                f"{what} is listed twice; list each model, kind and device once",
                field="body.offers",
            )
        check_emulation(item)
        by_key[key] = item
    current = {
        _offer_key(o): o
        for o in session.scalars(
            select(Offer)
            .where(Offer.node_id == node.id, Offer.status == OfferStatus.active)
            .order_by(Offer.id)
            .with_for_update()
        )
    }
    # A model whose offer the broker suspended stays off the book until the provider
    # withdraws that offer (broker.market.timeouts): publishing does not relist it.
    suspended = {
        _offer_key(o)
        for o in session.scalars(
            select(Offer).where(Offer.node_id == node.id, Offer.status == OfferStatus.suspended)
        )
    }
    for key, item in by_key.items():
        if item.count == 0 or key in suspended:
            continue
        data = OfferCreate(
            **item.model_dump(exclude={"count", "device"}),
            count=item.count,
            region=node.region,
            country=node.country,
            lat=node.lat,
            lon=node.lon,
        )
        offer = current.get(key)
        if offer is None:
            offer = create_offer(session, provider, data)
            offer.node_id, offer.device = node.id, item.device
        else:
            _refresh(offer, data)
    for key, offer in current.items():
        if key not in by_key or by_key[key].count == 0:
            withdraw_offer(session, provider, offer.id)
    session.flush()
    return list(
        session.scalars(
            select(Offer)
            .where(
                Offer.node_id == node.id,
                Offer.status.in_((OfferStatus.active, OfferStatus.suspended)),
            )
            .order_by(Offer.accelerator)
        )
    )


def _refresh(offer: Offer, data: OfferCreate) -> None:
    """Update an offer in place; capacity never drops below what matches hold."""
    figures = hardware_figures(data)
    capacity = max(data.count, ledger.held(offer))
    changes: dict[str, Any] = {
        "price_per_hour_micros": usd_to_micros(data.price_per_hour),
        "available_hours": data.available_hours,
        "efficiency": data.efficiency,
        "emulated": data.emulated,
        "power_w": data.power_w,
        "pue": data.pue,
        "grid_g_per_kwh": data.grid_g_per_kwh,
        "startup_seconds": data.startup_seconds,
        "transfer_s_per_gb": data.transfer_s_per_gb,
        "compile_s_per_kb": data.compile_s_per_kb,
        **{f: v for f, v in figures.items() if f != "accelerator"},
    }
    fraction = fraction_terms(data, offer.accelerator, float(str(figures["memory_gib"])))
    if offer.fraction_kind == FractionKind.shared and offer.shares_busy == 0:
        # Cut differently only while no match holds a share.
        changes["shares"] = fraction["shares"]
        changes["memory_per_share_gib"] = fraction["memory_per_share_gib"]
    elif offer.fraction_kind == FractionKind.mig:
        # The instances that exist now, less those matches hold (a held instance the
        # agent no longer lists stays held until its run ends).
        changes["mig_instances"] = sorted(set(fraction["mig_instances"]) - set(offer.mig_busy))
    if capacity != offer.capacity or any(getattr(offer, k) != v for k, v in changes.items()):
        ledger.resize_offer(offer, capacity)
        for k, v in changes.items():
            setattr(offer, k, v)
        offer.updated_at = utcnow()


def stop(session: Session, agent: Agent, node_id: str, max_attempts: int) -> Node:
    """The agent signs off: offers withdrawn, running jobs handed back to the market
    (they resume from their last checkpoint elsewhere), node keys revoked.
    Stopping twice is harmless."""
    node = _agent_node(session, agent, node_id)
    if node.status != NodeStatus.stopped:
        _hand_back(session, node, "the node's agent stopped", max_attempts)
        node.status, node.status_reason = NodeStatus.stopped, "the agent signed off"
        node.updated_at = utcnow()
        _revoke_keys(session, node)
        session.flush()
    return node


def _revoke_keys(session: Session, node: Node) -> None:
    session.execute(
        update(ApiKey)
        .where(ApiKey.node_id == node.id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )


def _hand_back(session: Session, node: Node, reason: str, max_attempts: int) -> int:
    """Withdraw the node's offers and send every job they hold back to the market."""
    offers = list(
        session.scalars(
            select(Offer)
            .where(Offer.node_id == node.id, Offer.status == OfferStatus.active)
            .order_by(Offer.id)
            .with_for_update()
        )
    )
    for offer in offers:
        # Every job the node holds goes back below, running ones included.
        ledger.withdraw_offer(session, offer, release_matched=False)
    rows = session.execute(
        select(Allocation, Job)
        .join(Offer, Offer.id == Allocation.offer_id)
        .join(Job, Job.id == Allocation.job_id)
        .where(Offer.node_id == node.id, Allocation.status == AllocationStatus.active)
        .order_by(Allocation.id)
        .with_for_update()
    ).all()
    for _, job in rows:
        ledger.requeue(session, job, reason, max_attempts)
    session.flush()
    return len(rows)


def sweep(
    session: Session, timeout_s: float, max_attempts: int, now: datetime | None = None
) -> int:
    """Mark nodes silent for ``timeout_s`` offline: their offers leave the book and
    their jobs go back to the market. Returns how many nodes went offline.

    Each node is re-checked under its row lock, so a heartbeat racing the sweep
    wins, and two sweepers (two broker processes) never both hand a node back.
    """
    cutoff = (now or utcnow()) - timedelta(seconds=timeout_s)
    ids = session.scalars(
        select(Node.id).where(Node.status == NodeStatus.online, Node.last_heartbeat_at < cutoff)
    ).all()
    swept = 0
    for node_id in ids:
        node = session.scalar(
            select(Node)
            .where(
                Node.id == node_id,
                Node.status == NodeStatus.online,
                Node.last_heartbeat_at < cutoff,
            )
            .with_for_update(skip_locked=True)
        )
        if node is None:
            continue
        reason = f"node {node.name} sent no heartbeat for {timeout_s:g} s"
        _hand_back(session, node, reason, max_attempts)
        node.status, node.status_reason = NodeStatus.offline, reason
        node.updated_at = utcnow()
        swept += 1
    session.flush()
    return swept
