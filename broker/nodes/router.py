"""Nodes: provider agents sign on, stay alive, publish their capacity and sign off."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from broker.auth import AgentDep, CurrentAccount
from broker.config import get_settings
from broker.db import SessionDep
from broker.errors import Forbidden
from broker.nodes import service
from broker.nodes.schemas import (
    Heartbeat,
    HeartbeatOut,
    NodeOffers,
    NodeOffersOut,
    NodeOut,
    NodeQuery,
    NodeRegister,
    NodeRegistered,
)
from broker.offers.schemas import OfferOut
from broker.pagination import Page
from broker.types import ObjectId

router = APIRouter(prefix="/v1/nodes", tags=["nodes"])


@router.post(
    "",
    response_model=NodeRegistered,
    status_code=201,
    summary="Register a node (provider's agent)",
    description="Signs a machine on and returns its node key, shown once. Registering a "
    "name again (the agent restarted) answers 200, revokes the earlier key and hands the "
    "jobs the node held back to the market.",
    responses={200: {"model": NodeRegistered, "description": "The node existed"}},
)
def register(
    session: SessionDep, agent: AgentDep, body: NodeRegister, response: Response
) -> NodeRegistered:
    if agent.node_id is not None:
        raise Forbidden("register nodes with the provider's own API key, not a node key")
    settings = get_settings()
    node, key, created = service.register(session, agent.account, body, settings.max_attempts)
    if not created:
        response.status_code = 200
    return NodeRegistered(
        node=NodeOut.model_validate(node),
        api_key=key,
        heartbeat_seconds=round(settings.node_timeout_s / 4, 3),
        timeout_seconds=settings.node_timeout_s,
    )


@router.get("", response_model=Page[NodeOut], summary="My nodes (provider; admin: all)")
def list_nodes(
    session: SessionDep, account: CurrentAccount, query: Annotated[NodeQuery, Query()]
) -> Page[NodeOut]:
    rows, total = service.list_nodes(session, account, query)
    return Page.of([NodeOut.model_validate(n) for n in rows], total, query)


@router.get("/{node_id}", response_model=NodeOut, summary="Read a node (its provider)")
def get_node(session: SessionDep, account: CurrentAccount, node_id: ObjectId) -> NodeOut:
    return NodeOut.model_validate(service.get_node(session, account, node_id))


@router.post("/{node_id}/heartbeat", response_model=HeartbeatOut, summary="Heartbeat (agent)")
def heartbeat(
    session: SessionDep, agent: AgentDep, node_id: ObjectId, body: Heartbeat
) -> HeartbeatOut:
    node, resync, ended = service.heartbeat(session, agent, node_id, body)
    return HeartbeatOut(node=NodeOut.model_validate(node), resync=resync, ended=ended)


@router.put(
    "/{node_id}/offers",
    response_model=NodeOffersOut,
    summary="Publish the node's capacity as offers (agent)",
    description="The whole list each time: one entry per model with its count and price. "
    "Models left out are withdrawn. Offers take the node's location.",
)
def sync_offers(
    session: SessionDep, agent: AgentDep, node_id: ObjectId, body: NodeOffers
) -> NodeOffersOut:
    offers = service.sync_offers(session, agent, node_id, body.offers)
    return NodeOffersOut(offers=[OfferOut.model_validate(o) for o in offers])


@router.delete(
    "/{node_id}",
    response_model=NodeOut,
    summary="Sign a node off (agent or provider)",
    description="Withdraws its offers and hands its jobs back to the market, where they "
    "resume from their last checkpoint; its node key stops working.",
)
def stop(session: SessionDep, agent: AgentDep, node_id: ObjectId) -> NodeOut:
    return NodeOut.model_validate(
        service.stop(session, agent, node_id, get_settings().max_attempts)
    )
