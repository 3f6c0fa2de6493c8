"""Services over HTTP: deploy, read, undeploy, infer; and the replicas' connections."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from broker.accounts.service import hash_key
from broker.auth import BATCHED_DEVELOPER, BatchedDeveloper, CurrentAccount, Developer, bearer_key
from broker.config import get_settings
from broker.db import SessionDep, Transactions, request_transactions
from broker.errors import InvalidInput, NotFound
from broker.models.account import Role
from broker.pagination import Page, PageQuery
from broker.ratelimit import remember_key
from broker.services import service as services
from broker.services import views
from broker.services.gateway import (
    GatewayTimeout,
    Known,
    ProgramError,
    ServiceUnavailable,
    caller_place,
    elsewhere,
    proxied,
    relay_of,
    replica_link,
    vouched,
)
from broker.services.relay import NoReplica, ProgramFailed, Target
from broker.services.schemas import ServiceCreate, ServiceDetail, ServiceOut
from broker.shortcuts import shortcut_route

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/services", tags=["services"])
replicas_router = APIRouter(prefix="/v1/replicas", tags=["services"])

BINARY = "application/octet-stream"


IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",
        description="Any unique string (a UUID is good). A retried POST with the same key "
        "returns the service the first one created instead of creating a second.",
    ),
]


@router.post(
    "",
    status_code=201,
    response_model=ServiceOut,
    responses={200: {"model": ServiceOut, "description": "A retry: the service the key made"}},
)
def deploy(
    session: SessionDep,
    developer: Developer,
    body: ServiceCreate,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> ServiceOut:
    """Deploy a packaged program as a service: a standing bid for replicas near its users."""
    service, created = services.deploy(session, developer, body, idempotency_key)
    if not created:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    return views.service_out(session, service)


@router.get("", response_model=Page[ServiceOut])
def list_services(
    session: SessionDep, account: CurrentAccount, query: Annotated[PageQuery, Query()]
) -> Page[ServiceOut]:
    rows, total = services.list_services(session, account, limit=query.limit, offset=query.offset)
    return Page.of([views.service_out(session, s) for s in rows], total, query)


@router.get("/{service_id}", response_model=ServiceDetail)
def get_service(session: SessionDep, account: CurrentAccount, service_id: str) -> ServiceDetail:
    """A service, its replicas, what its callers saw over the last minute, its scale events."""
    return views.detail(session, services.get_service(session, account, service_id))


@router.delete("/{service_id}", response_model=ServiceOut)
def undeploy(session: SessionDep, account: CurrentAccount, service_id: str) -> ServiceOut:
    """Take the service down; its replicas are let go and billed for what they ran."""
    return views.service_out(session, services.undeploy(session, account, service_id))


# -- requests -----------------------------------------------------------------------


async def _infer_shortcut(request: Request) -> Response | None:
    """``POST /v1/services/{id}/infer`` with a key, without FastAPI's per-request work
    (``broker.shortcuts``): the busiest route of a service, and the one whose time is
    the callers'. A web worker of ``broker serve`` checks the key (in a batch) and
    passes the request to the relay process, vouching for the caller with a signed
    header, so the key is not checked twice. None without a key: FastAPI answers 401."""
    key = await bearer_key(request)
    if key is None:
        return None
    settings = get_settings()
    transactions = await request_transactions(request)
    caller = vouched(request, settings)
    if caller is not None:  # its requests count against the caller's rate, not an address's
        remember_key(hash_key(key), f"account:{caller[0]}")
    else:
        checked = await BATCHED_DEVELOPER.admit_batched(request, transactions, key)
        caller = (checked.account.id, checked.account.role == Role.admin)
    if settings.relay_url:  # a web worker: the relay process answers
        return await proxied(request, settings, caller)
    return await _answer(request, transactions, caller, request.path_params["service_id"])


async def infer(
    request: Request,
    developer: BatchedDeveloper,
    service_id: str,
    location: Annotated[
        str | None,
        Header(
            alias="X-Broker-Location",
            description="Where the caller is, 'lat,lon': requests go to the replica nearest "
            "it with the least work queued (default: the service's busiest user region)",
        ),
    ] = None,
) -> Response:
    """Call the service: the body is an arrays bundle of the arguments (as `/v1/arrays`
    takes), the answer an arrays bundle of the results, streamed as the replica sends
    it. Headers say which replica answered (`X-Broker-Replica`), its time
    (`X-Broker-Replica-Ms`) and how many replicas went away first (`X-Broker-Retries`)."""
    # Requests with a key take the shortcut; this answers what it leaves (declared
    # here so that the schema and the key's refusals are FastAPI's own).
    transactions = await request_transactions(request)
    caller = (developer.id, developer.role == Role.admin)
    settings = get_settings()
    if settings.relay_url:
        return await proxied(request, settings, caller)
    return await _answer(request, transactions, caller, service_id)


router.add_api_route(
    "/{service_id}/infer",
    infer,
    methods=["POST"],
    response_class=StreamingResponse,
    responses={200: {"content": {BINARY: {}}, "description": "The results, an arrays bundle"}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {BINARY: {"schema": {"type": "string", "format": "binary"}}},
        }
    },
    route_class_override=shortcut_route(_infer_shortcut),
)


async def _answer(
    request: Request, transactions: Transactions, caller: tuple[str, bool], service_id: str
) -> Response:
    relay = relay_of(request.app)
    known: Known = request.app.state.services_known
    info = known.cached(service_id)
    if info is None:
        info = await run_in_threadpool(known.read, transactions, service_id)
    account_id, admin = caller
    if info is None or (info["account_id"] != account_id and not admin):
        raise NotFound(f"no service {service_id!r} of yours")
    if not info["live"]:
        raise ServiceUnavailable(f"service {service_id} is {info['state']}", field="service")
    lat, lon, region = caller_place(request.headers.get("x-broker-location"), info["users"])
    limit = get_settings().max_infer_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise InvalidInput(f"the request is over {limit} bytes", field="body")
    body = await request.body()
    if len(body) > limit:
        raise InvalidInput(f"the request is over {limit} bytes", field="body")
    target = Target(service_id, lat, lon, region, info["slo"])
    relay.transactions = transactions
    if not relay.connected(service_id):
        forwarded = await elsewhere(request, transactions, caller, service_id, body)
        if forwarded is not None:
            return forwarded
    try:
        answer = await relay.request(target, body)
    except NoReplica as e:
        relay.refuse(service_id, region)
        raise ServiceUnavailable(f"no replica of service {service_id} could answer: {e}") from e
    except ProgramFailed as e:
        raise ProgramError(f"the service's program refused or failed the request: {e}") from e
    except TimeoutError as e:
        raise GatewayTimeout(
            f"no answer from a replica in {relay.timeout_s:g} s", field="service"
        ) from e
    headers = {
        "X-Broker-Replica": answer.link.allocation_id,
        "X-Broker-Replica-Ms": f"{float(answer.header.get('ms') or 0.0):.3f}",
        "X-Broker-Retries": str(answer.retries),
    }
    if (whole := answer.whole()) is not None:  # one chunk: no streaming machinery
        return Response(whole, media_type=BINARY, headers=headers)
    return StreamingResponse(answer.chunks(), media_type=BINARY, headers=headers)


# -- replicas' connections -------------------------------------------------------------


@replicas_router.websocket("/{allocation_id}/connect")
async def connect(websocket: WebSocket, allocation_id: str) -> None:
    """A replica's agent holds this open while the replica serves (broker.services.relay)."""
    relay = relay_of(websocket.app)
    header = websocket.headers.get("authorization", "")
    key = header[7:] if header.lower().startswith("bearer ") else ""
    transactions = await request_transactions(websocket)  # type: ignore[arg-type]
    relay.transactions = transactions
    link = await run_in_threadpool(replica_link, transactions, key, allocation_id)
    if isinstance(link, str):
        await websocket.close(code=4403, reason=link[:120])
        return
    await websocket.accept()
    lock = asyncio.Lock()

    async def send(frame: bytes) -> None:
        async with lock:
            await websocket.send_bytes(frame)

    link.send = send
    relay.attach(link)
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            data = message.get("bytes")
            if data:
                try:
                    link.deliver(data)
                except ValueError as e:
                    log.warning("replica %s sent a bad frame: %s", allocation_id, e)
    except WebSocketDisconnect:
        pass
    finally:
        relay.detach(link)
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await websocket.close()
