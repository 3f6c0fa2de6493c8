"""The authorization matrix: every endpoint, called by every kind of caller, answers
what ``RULES`` says.

The rules are keyed by the app's own route table: an endpoint with no rule fails
``test_every_route_has_a_rule`` (so a new endpoint cannot ship without deciding who
may call it), and so does a rule left for a route that is gone.

Each endpoint is called once per actor against one world, in which the developer
owns a running job (on the provider's node), its uploads and an invoice, and the
provider owns a node, an offer listed by hand and a withdrawn one. The "own" and
"someone else's" cases are the owner and the other actors calling about the same
object: ``developer``/``other_developer``, ``provider``/``other_provider``,
``agent`` (the node key of the node that runs the job) and ``other_agent`` (the
node key of another node of the same provider). Each call runs in a savepoint
that is rolled back, so every actor meets the same world.

Only the API is in scope: paths under ``/v1`` and the health probes. The web
dashboard's HTML pages (``web/``) have their own session and CSRF tests, and
FastAPI's documentation pages are public by design.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NamedTuple

import numpy as np
import pytest
from fastapi.routing import iter_route_contexts
from sqlalchemy import select
from sqlalchemy.orm import Session

from broker.accounts.callers import Agent
from broker.app import create_app
from broker.billing import invoices
from broker.blobs import service as blobs
from broker.config import get_settings
from broker.db import new_id, utcnow
from broker.models.account import Account, ApiKey, Role
from broker.models.blob import Blob, BlobGrant, BlobKind, BlobUpload
from broker.models.job_state import JobState
from broker.models.market import ClearingRound
from broker.models.service import Service
from broker.nodes import service as nodes
from broker.nodes.schemas import NodeOffer, NodeRegister
from broker.offers.service import withdraw_offer
from broker.portable import arrays
from broker.portable.manifest import Manifest, TensorSpec
from tests.conftest import ClientFactory
from tests.factories import job_body, make_account, make_job, make_offer, make_run, offer_body

ACTORS = (
    "anonymous",
    "developer",
    "other_developer",
    "provider",
    "other_provider",
    "admin",
    "agent",
    "other_agent",
)


class Expect(NamedTuple):
    """The status each actor gets."""

    anonymous: int
    developer: int
    other_developer: int
    provider: int
    other_provider: int
    admin: int
    agent: int
    other_agent: int


@dataclass(frozen=True)
class Rule:
    expect: Expect
    body: Any = None  # JSON, or bytes (sent as application/octet-stream)
    # Which world object fills each path parameter, where not the default one.
    params: dict[str, str] = field(default_factory=dict)
    # (world object, actors whose successful answer names it): for lists, that
    # each caller sees its own rows and nobody else's.
    shows: tuple[str, frozenset[str]] | None = None


def sees(name: str, *actors: str) -> tuple[str, frozenset[str]]:
    return name, frozenset(actors)


#                 anon dev  dev2 prov prov2 admin agent agent2
PUBLIC = Expect(200, 200, 200, 200, 200, 200, 200, 200)
ANY_KEY = Expect(401, 200, 200, 200, 200, 200, 403, 403)  # an account's own key; no node key
ADMIN_ONLY = Expect(401, 403, 403, 403, 403, 200, 403, 403)
# The node's allocation: only that node's agent reports on it (and admins); the
# provider's own key is told to use the node key; other providers and nodes get 404.
NODE_WORK = Expect(401, 403, 403, 403, 404, 200, 200, 404)
# The node itself: its agent or its provider (or admins); another node's key is refused.
NODE = Expect(401, 403, 403, 200, 404, 200, 200, 403)
# A blob the developer uploaded for its job: the developer, the provider running
# the job, that node's agent, admins.
JOB_BLOB = Expect(401, 200, 404, 200, 404, 200, 200, 404)

ARRAYS = arrays.encode([np.zeros(2, np.float32)])
NEW_ARRAYS = arrays.encode([np.ones(3, np.float32)])
PLACE = {"region": "europe-west4", "country": "NL", "lat": 53.44, "lon": 6.84}

RULES: dict[tuple[str, str], Rule] = {
    # accounts
    ("GET", "/v1/me"): Rule(ANY_KEY),
    ("GET", "/v1/accounts"): Rule(ADMIN_ONLY),
    ("POST", "/v1/accounts"): Rule(
        Expect(401, 403, 403, 403, 403, 201, 403, 403),
        body={"name": "newcomer", "role": "developer"},
    ),
    ("POST", "/v1/accounts/{account_id}/disable"): Rule(ADMIN_ONLY),
    ("POST", "/v1/accounts/{account_id}/enable"): Rule(ADMIN_ONLY),
    # keys: each account its own (admins any); the developer's is its only key, which
    # it may rotate but not revoke itself
    ("GET", "/v1/keys"): Rule(ANY_KEY, shows=sees("developer_key", "developer")),
    ("POST", "/v1/keys"): Rule(Expect(401, 201, 201, 201, 201, 201, 403, 403), body={}),
    ("POST", "/v1/keys/{key_id}/rotate"): Rule(Expect(401, 201, 404, 404, 404, 201, 403, 403)),
    ("DELETE", "/v1/keys/{key_id}"): Rule(Expect(401, 409, 404, 404, 404, 200, 403, 403)),
    # offers
    ("POST", "/v1/offers"): Rule(Expect(401, 403, 403, 201, 201, 201, 403, 403), body=offer_body()),
    ("GET", "/v1/offers"): Rule(
        ANY_KEY,
        shows=sees("hand_offer", *ACTORS),  # an active offer: anyone may find it
    ),
    ("GET", "/v1/offers/{offer_id}"): Rule(
        Expect(401, 404, 404, 200, 404, 200, 403, 403), params={"offer_id": "withdrawn_offer"}
    ),
    ("PATCH", "/v1/offers/{offer_id}"): Rule(
        Expect(401, 403, 403, 200, 404, 200, 403, 403), body={"price_per_hour": "2.00"}
    ),
    ("DELETE", "/v1/offers/{offer_id}"): Rule(Expect(401, 403, 403, 200, 404, 200, 403, 403)),
    # jobs
    ("POST", "/v1/jobs"): Rule(Expect(401, 201, 201, 403, 403, 201, 403, 403), body=job_body()),
    ("GET", "/v1/jobs"): Rule(ANY_KEY, shows=sees("job", "developer", "admin")),
    ("GET", "/v1/jobs/{job_id}"): Rule(Expect(401, 200, 404, 404, 404, 200, 403, 403)),
    ("GET", "/v1/jobs/{job_id}/runs"): Rule(Expect(401, 200, 404, 404, 404, 200, 403, 403)),
    ("GET", "/v1/jobs/{job_id}/logs"): Rule(Expect(401, 200, 404, 404, 404, 200, 403, 403)),
    ("POST", "/v1/jobs/{job_id}/cancel"): Rule(Expect(401, 200, 404, 404, 404, 200, 403, 403)),
    # market
    ("GET", "/v1/market/book"): Rule(ANY_KEY),
    ("GET", "/v1/catalog"): Rule(PUBLIC),
    ("POST", "/v1/market/clear"): Rule(ADMIN_ONLY),
    ("GET", "/v1/market/rounds"): Rule(ANY_KEY, shows=sees("round", *ACTORS[1:6])),
    ("GET", "/v1/market/rounds/{round_id}"): Rule(ANY_KEY),
    ("GET", "/v1/market/estimates"): Rule(ANY_KEY),
    ("GET", "/v1/carbon"): Rule(ANY_KEY),
    # artifacts and array bundles
    ("POST", "/v1/artifacts"): Rule(
        # Roles pass, then the bytes are checked: these are not an artifact.
        Expect(401, 422, 422, 403, 403, 422, 403, 403),
        body=b"not an artifact",
    ),
    ("POST", "/v1/arrays"): Rule(Expect(401, 201, 201, 201, 201, 201, 201, 201), body=NEW_ARRAYS),
    ("GET", "/v1/storage"): Rule(ANY_KEY),
    ("GET", "/v1/artifacts/{sha256}"): Rule(JOB_BLOB, params={"sha256": "artifact"}),
    ("GET", "/v1/artifacts/{sha256}/content"): Rule(JOB_BLOB, params={"sha256": "artifact"}),
    ("GET", "/v1/arrays/{sha256}"): Rule(JOB_BLOB, params={"sha256": "inputs"}),
    ("GET", "/v1/arrays/{sha256}/content"): Rule(JOB_BLOB, params={"sha256": "inputs"}),
    # runs
    ("GET", "/v1/allocations"): Rule(
        Expect(401, 403, 403, 200, 200, 200, 200, 200),
        shows=sees("allocation", "provider", "admin", "agent"),
    ),
    ("POST", "/v1/allocations/{allocation_id}/start"): Rule(NODE_WORK),
    ("POST", "/v1/allocations/{allocation_id}/progress"): Rule(NODE_WORK, body={"steps_done": 1}),
    ("POST", "/v1/allocations/{allocation_id}/checkpoint"): Rule(
        NODE_WORK, body={"checkpoint": "checkpoint", "step": 2}
    ),
    ("POST", "/v1/allocations/{allocation_id}/finish"): Rule(
        NODE_WORK, body={"outcome": "failed", "error": "out of memory", "retry": True}
    ),
    # nodes
    ("POST", "/v1/nodes"): Rule(
        # A node key cannot register nodes: only the provider's own key.
        Expect(401, 403, 403, 201, 201, 201, 403, 403),
        body={"name": "new-node", **PLACE},
    ),
    ("GET", "/v1/nodes"): Rule(ANY_KEY, shows=sees("node", "provider", "admin")),
    ("GET", "/v1/nodes/{node_id}"): Rule(Expect(401, 404, 404, 200, 404, 200, 403, 403)),
    ("POST", "/v1/nodes/{node_id}/heartbeat"): Rule(NODE, body={}),
    ("PUT", "/v1/nodes/{node_id}/offers"): Rule(NODE, body={"offers": []}),
    ("DELETE", "/v1/nodes/{node_id}"): Rule(NODE),
    # billing
    ("GET", "/v1/billing/fee"): Rule(ANY_KEY),
    ("PUT", "/v1/billing/fee"): Rule(ADMIN_ONLY, body={"percent": "7.5"}),
    ("GET", "/v1/invoices"): Rule(
        Expect(401, 200, 200, 403, 403, 200, 403, 403),
        shows=sees("invoice", "developer", "admin"),
    ),
    ("GET", "/v1/invoices/{invoice_id}"): Rule(Expect(401, 200, 404, 403, 403, 200, 403, 403)),
    ("POST", "/v1/invoices/generate"): Rule(
        Expect(401, 200, 200, 403, 403, 200, 403, 403), body={}
    ),
    ("POST", "/v1/invoices/{invoice_id}/pay"): Rule(ADMIN_ONLY),
    ("POST", "/v1/invoices/{invoice_id}/void"): Rule(ADMIN_ONLY),
    # Only a held invoice is released: the world's is open.
    ("POST", "/v1/invoices/{invoice_id}/release"): Rule(
        Expect(401, 403, 403, 403, 403, 409, 403, 403)
    ),
    ("GET", "/v1/statements"): Rule(
        Expect(401, 403, 403, 200, 200, 200, 403, 403), shows=sees("hand_offer", "provider")
    ),
    # Stripe signs its webhooks: no API key opens it, and an unsigned event is refused.
    ("POST", "/v1/stripe/webhook"): Rule(
        Expect(400, 400, 400, 400, 400, 400, 400, 400), body={"id": "evt_1"}
    ),
    # services: the developer's own (admins any); deploying needs a developer, and the
    # world's artifact is iterative, which a service cannot serve
    ("POST", "/v1/services"): Rule(
        Expect(401, 422, 422, 403, 403, 422, 403, 403),
        body={
            "artifact": "artifact",
            "inputs": "inputs",
            "users": [{"lat": 52.4, "lon": 4.9}],
            "latency_slo_ms": 50,
            "max_price_per_hour": "2.00",
        },
    ),
    ("GET", "/v1/services"): Rule(ANY_KEY, shows=sees("service", "developer", "admin")),
    ("GET", "/v1/services/{service_id}"): Rule(Expect(401, 200, 404, 404, 404, 200, 403, 403)),
    ("DELETE", "/v1/services/{service_id}"): Rule(Expect(401, 200, 404, 404, 404, 200, 403, 403)),
    # No replica is connected in the world: the owner gets 503 (no replica), as admins do.
    ("POST", "/v1/services/{service_id}/infer"): Rule(
        Expect(401, 503, 404, 403, 403, 503, 403, 403), body=ARRAYS
    ),
    # health
    ("GET", "/healthz"): Rule(PUBLIC),
    ("HEAD", "/healthz"): Rule(PUBLIC),
    ("GET", "/readyz"): Rule(PUBLIC),
    ("HEAD", "/readyz"): Rule(PUBLIC),
    # Aggregate counters only (no ids, no accounts), for a scraper with the metrics
    # token or on this machine; API keys open nothing (tests/test_security.py).
    ("GET", "/metrics"): Rule(Expect(403, 403, 403, 403, 403, 403, 403, 403)),
}

# Path parameters and the world object that fills them, unless a rule says otherwise.
DEFAULT_PARAMS = {
    "offer_id": "hand_offer",
    "job_id": "job",
    "round_id": "round",
    "allocation_id": "allocation",
    "node_id": "node",
    "invoice_id": "invoice",
    "key_id": "developer_key",
    "account_id": "developer_account",
    "service_id": "service",
}
HEALTH = ("/healthz", "/readyz", "/metrics")


def in_scope(path: str) -> bool:
    return path.startswith("/v1/") or path in HEALTH


def api_routes() -> set[tuple[str, str]]:
    app = create_app(auto_clear=False, auto_bill=False)
    return {
        (method, route.path)
        for route in iter_route_contexts(app.routes)
        if route.path is not None and in_scope(route.path)
        for method in route.methods or ()
    }


def test_every_route_has_a_rule() -> None:
    routes = api_routes()
    missing = sorted(routes - RULES.keys())
    assert not missing, f"routes with no authorization rule (add them to RULES): {missing}"
    stale = sorted(RULES.keys() - routes)
    assert not stale, f"rules for routes that no longer exist: {stale}"


@dataclass
class World:
    keys: dict[str, str | None]
    ids: dict[str, str]


def _fake_artifact(db: Session, owner: Account) -> str:
    """An iterative artifact's manifest and bytes, stored as an upload would leave them
    (no JAX export: this test is about who may read it, not what it runs)."""
    state = TensorSpec(shape=[2], dtype="float32")
    manifest = Manifest(
        kind="iterative",
        program_sha256="0" * 64,
        program_size=1,
        platforms=["cpu", "cuda"],
        fun_name="step",
        jax_version="0",
        calling_convention_version=9,
        devices=1,
        inputs=[state],
        outputs=[state],
        state_leaves=1,
        polymorphic=False,
        flops=1e9,
        bytes=1e6,
        dtype="fp32",
        custom_calls=[],
    )
    data = b"authz-artifact-" + new_id("a").encode()
    sha = blobs.get_store().put(data)
    db.add(Blob(sha256=sha, kind=BlobKind.artifact, size=len(data), meta=manifest.model_dump()))
    db.flush()
    db.add(BlobGrant(sha256=sha, account_id=owner.id))
    return sha


def _arrays(db: Session, owner: Account, data: bytes) -> str:
    sha = blobs.get_store().put(data)
    leaves = arrays.read_header(data[: arrays.MAX_HEAD], len(data))
    if db.get(Blob, sha) is None:
        db.add(
            Blob(
                sha256=sha,
                kind=BlobKind.arrays,
                size=len(data),
                meta={"leaves": [leaf.to_json() for leaf in leaves]},
            )
        )
        db.flush()
    blobs.grant(db, sha, owner.id)
    return sha


def build_world(db: Session) -> World:
    accounts: dict[str, tuple[Account, str]] = {
        "developer": make_account(db, Role.developer),
        "other_developer": make_account(db, Role.developer),
        "provider": make_account(db, Role.provider),
        "other_provider": make_account(db, Role.provider),
        "admin": make_account(db, Role.admin),
    }
    developer, provider = accounts["developer"][0], accounts["provider"][0]
    node, agent_key, _ = nodes.register(db, provider, NodeRegister(name="box-1", **PLACE), 3)
    _, sibling_key, _ = nodes.register(db, provider, NodeRegister(name="box-2", **PLACE), 3)
    (node_offer,) = nodes.sync_offers(
        db,
        Agent(provider, node.id),
        node.id,
        [NodeOffer.model_validate({"accelerator": "h100-sxm", "count": 8, "price_per_hour": "2"})],
    )
    hand_offer = make_offer(db, provider)
    withdrawn = make_offer(db, provider)
    withdraw_offer(db, provider, withdrawn.id)

    # The developer's iterative job, running on the node's offer.
    job = make_job(db, developer)
    job.artifact_sha256 = _fake_artifact(db, developer)
    job.inputs_sha256 = _arrays(db, developer, ARRAYS)
    job.steps, job.checkpoint_every = 4, 2
    allocation = make_run(db, job, node_offer, 0, ended_at=None)
    node_offer.count -= allocation.accelerators
    job.move_to(JobState.matched)
    job.move_to(JobState.running)
    job.attempts = 1
    checkpoint = _arrays(db, provider, ARRAYS)
    # Uploaded by the node's agent while it runs the job: what it may hand back.
    db.add(
        BlobUpload(
            id=new_id("upl"),
            sha256=checkpoint,
            account_id=provider.id,
            node_id=node.id,
            size=len(ARRAYS),
            uploaded_at=utcnow(),
        )
    )

    # A run of another job that ended on the hand-listed offer, and its invoice.
    done = make_job(db, developer)
    make_run(db, done, hand_offer, 3_600_000, ended_at=utcnow() - timedelta(minutes=5))
    done.move_to(JobState.matched)
    done.move_to(JobState.running)
    done.move_to(JobState.succeeded)
    (invoice,) = invoices.generate(
        db, period_start=utcnow() - timedelta(days=1), cutoff=utcnow(), account_id=developer.id
    )

    service = Service(
        id=new_id("svc"),
        account_id=developer.id,
        artifact_sha256=job.artifact_sha256,
        inputs_sha256=job.inputs_sha256,
        platforms=["cpu"],
        users=[{"lat": 52.4, "lon": 4.9, "share": 1.0}],
        latency_slo_ms=50.0,
        min_replicas=1,
        max_replicas=2,
        desired_replicas=1,
        max_price_per_hour_micros=2_000_000,
        allowed_countries=[],
    )
    db.add(service)
    round_ = ClearingRound(id=new_id("rnd"), trigger="manual", status="OPTIMAL")
    db.add(round_)
    db.flush()

    keys: dict[str, str | None] = {name: key for name, (_, key) in accounts.items()}
    keys.update(anonymous=None, agent=agent_key, other_agent=sibling_key)
    ids = {
        "hand_offer": hand_offer.id,
        "withdrawn_offer": withdrawn.id,
        "job": job.id,
        "allocation": allocation.id,
        "artifact": job.artifact_sha256,
        "inputs": job.inputs_sha256,
        "checkpoint": checkpoint,
        "node": node.id,
        "invoice": invoice.id,
        "round": round_.id,
        "service": service.id,
        "developer_account": developer.id,
        "developer_key": db.scalars(
            select(ApiKey.id).where(ApiKey.account_id == developer.id)
        ).one(),
    }
    return World(keys, ids)


@pytest.fixture
def webhook_secret(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("BROKER_STRIPE_WEBHOOK_SECRET", "whsec_authz")
    get_settings.cache_clear()
    yield
    monkeypatch.delenv("BROKER_STRIPE_WEBHOOK_SECRET")
    get_settings.cache_clear()


def _request(rule: Rule, world: World) -> dict[str, Any]:
    body = rule.body
    if isinstance(body, bytes):
        return {"content": body, "headers": {"Content-Type": "application/octet-stream"}}
    if isinstance(body, dict):
        # A value naming a world object (a checkpoint's digest) is replaced by its id.
        return {
            "json": {k: world.ids.get(v, v) if isinstance(v, str) else v for k, v in body.items()}
        }
    return {}


def test_authorization_matrix(
    db: Session,
    client_for: ClientFactory,
    webhook_secret: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    world = build_world(db)
    clients = {actor: client_for(world.keys[actor]) for actor in ACTORS}
    # Clearing rounds run in transactions of their own, which the rolled-back test
    # transaction cannot host; who may start one is what matters here (rounds
    # themselves are tested in tests/broker/market).
    monkeypatch.setattr(
        "broker.market.router.run_round",
        lambda engine, settings, trigger: db.get_one(ClearingRound, world.ids["round"]),
    )

    failures = []
    for (method, template), rule in sorted(RULES.items(), key=lambda item: item[0][::-1]):
        names = {**DEFAULT_PARAMS, **rule.params}
        path = template.format_map({p: world.ids[name] for p, name in names.items()})
        for actor, expected in zip(ACTORS, rule.expect, strict=True):
            savepoint = db.begin_nested()
            try:
                response = clients[actor].request(method, path, **_request(rule, world))
            finally:
                savepoint.rollback()
            if response.status_code != expected:
                failures.append(
                    f"{method} {template} as {actor}: {response.status_code}, expected "
                    f"{expected} ({response.text[:160]})"
                )
            elif rule.shows and response.is_success:
                name, viewers = rule.shows
                if (world.ids[name] in response.text) != (actor in viewers):
                    verb = "misses" if actor in viewers else "shows"
                    failures.append(f"{method} {template} as {actor} {verb} the {name}")
    assert not failures, "\n".join(["authorization matrix:", *failures])


def test_a_node_key_outside_its_node_gets_a_clear_error(
    db: Session, client_for: ClientFactory
) -> None:
    world = build_world(db)
    agent = client_for(world.keys["agent"])
    refused = agent.post("/v1/offers", json=offer_body())
    assert refused.status_code == 403
    error = refused.json()["error"]
    assert error["code"] == "node_key_not_allowed"
    assert world.ids["node"] in error["message"]
    assert "provider's own API key" in error["message"]
