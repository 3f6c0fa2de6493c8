"""Bad input: schemathesis over the app's own OpenAPI description.

Every operation gets generated requests, valid and invalid ones (wrong types, values
out of range, strings too long, missing or unknown fields), with path parameters
that are random or name real objects. Each answer must be no 5xx, a status the
description lists, with the content type and body its schema says (errors
included: every error has the one documented shape); invalid requests must be
refused with a 4xx.

Requests are sent as the callers the authorization matrix (``tests/test_authz.py``)
lets through, so that they reach validation and the handler rather than stopping
at 403; the description's security scheme is left out of what schemathesis sees,
since missing and wrong keys are the matrix's business.

Each operation runs on the rolled-back test database, in the matrix's world (a
running job, offers, nodes and their keys, an invoice, uploads); every request runs
in a savepoint that is rolled back, so examples do not pile up state. Examples are
derandomized, so a run is reproducible; ``SCHEMA_EXAMPLES`` raises the count for
a longer hunt.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy.orm import Session

from broker.app import create_app
from broker.models.market import ClearingRound
from tests.conftest import ClientFactory
from tests.test_authz import RULES, World, build_world

EXAMPLES = int(os.environ.get("SCHEMA_EXAMPLES", "25"))
CALLERS = ("developer", "provider", "agent", "admin")
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
SPEC = create_app(auto_clear=False, auto_bill=False).openapi()
OPERATIONS = [(method.upper(), path) for path, item in SPEC["paths"].items() for method in item]

# The world object a path parameter names, when a case aims at a real one.
KNOWN = {
    "offer_id": "hand_offer",
    "job_id": "job",
    "round_id": "round",
    "allocation_id": "allocation",
    "node_id": "node",
    "invoice_id": "invoice",
}


def _known(world: World, path: str, names: list[str]) -> dict[str, str]:
    ids = {name: world.ids[KNOWN[name]] for name in names if name in KNOWN}
    if "sha256" in names:
        ids["sha256"] = world.ids["artifact" if "/artifacts/" in path else "inputs"]
    return ids


def _without_security(spec: dict[str, Any]) -> dict[str, Any]:
    spec = copy.deepcopy(spec)
    spec.get("components", {}).pop("securitySchemes", None)
    for item in spec["paths"].values():
        for operation in item.values():
            operation.pop("security", None)
    return spec


def _callers(method: str, path: str) -> list[str]:
    """The callers the matrix lets past authentication and roles for this endpoint."""
    expect = RULES[method, path].expect._asdict()
    return [c for c in CALLERS if expect[c] not in (401, 403)] or list(CALLERS)


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_operation(
    method: str,
    path: str,
    db: Session,
    client_for: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    world = build_world(db)
    # Clearing rounds run in transactions of their own, which the rolled-back test
    # transaction cannot host (and the endpoint takes no input to fuzz).
    monkeypatch.setattr(
        "broker.market.router.run_round",
        lambda engine, settings, trigger: db.get_one(ClearingRound, world.ids["round"]),
    )
    schema = schemathesis.openapi.from_dict(_without_security(SPEC))
    schema.app = client_for(None).app
    operation = schema[path][method]
    names = [p.name for p in operation.path_parameters]
    strategies = [
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
    ]
    if names:
        known = _known(world, path, names)
        strategies.append(operation.as_strategy(GenerationMode.POSITIVE, path_parameters=known))
        strategies.append(operation.as_strategy(GenerationMode.NEGATIVE, path_parameters=known))

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=st.one_of(strategies), caller=st.sampled_from(_callers(method, path)))
    def run(case: Any, caller: str) -> None:
        headers = {"Authorization": f"Bearer {world.keys[caller]}"}
        savepoint = db.begin_nested()
        try:
            case.call_and_validate(headers=headers, checks=CHECKS)
        finally:
            savepoint.rollback()

    run()


def test_stateful_workflows(
    db: Session, client_for: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sequences of calls that feed each other: schemathesis infers the links from the
    description (an offer's id from POST /v1/offers to PATCH /v1/offers/{offer_id}, a
    node's from POST /v1/nodes to its heartbeat, an invoice's to pay and void, ...).
    Each step is sent as the first caller the matrix lets through (the one that owns
    what the step before created); each scenario is rolled back."""
    world = build_world(db)
    monkeypatch.setattr(
        "broker.market.router.run_round",
        lambda engine, settings, trigger: db.get_one(ClearingRound, world.ids["round"]),
    )
    schema = schemathesis.openapi.from_dict(_without_security(SPEC))
    schema.app = client_for(None).app

    class Workflow(schema.as_state_machine()):  # type: ignore[misc]
        def setup(self) -> None:
            self.savepoint = db.begin_nested()

        def teardown(self) -> None:
            self.savepoint.rollback()

        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            caller = _callers(case.operation.method.upper(), case.operation.path)[0]
            return {"headers": {"Authorization": f"Bearer {world.keys[caller]}"}}

        def validate_response(
            self, response: Any, case: Any, additional_checks: Any = None, **kwargs: Any
        ) -> None:
            case.validate_response(response, checks=CHECKS, transport_kwargs=kwargs)

    Workflow.run(
        settings=settings(
            max_examples=max(10, EXAMPLES),
            stateful_step_count=8,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.explicit, Phase.generate, Phase.shrink],
            suppress_health_check=list(HealthCheck),
        )
    )


NUL = "\x00"
# Requests that once answered 500 (on PostgreSQL, which cannot store NUL in text,
# or on any database, for times without a UTC offset), and other malformed or
# oversized ones: each gets a 4xx that names the input at fault.
BAD: list[tuple[str, str, str, Any, int, str | None]] = [
    # caller, method, path ({name} fills from the world), body, status, field
    ("admin", "GET", "/v1/jobs?account_id=a%00b", None, 422, "query.account_id"),
    ("admin", "GET", "/v1/invoices?account_id=a%00b", None, 422, "query.account_id"),
    ("admin", "GET", "/v1/statements?provider_id=a%00b", None, 422, "query.provider_id"),
    ("admin", "POST", "/v1/invoices/generate", {"account_id": f"a{NUL}"}, 422, "body.account_id"),
    (
        "agent",
        "POST",
        "/v1/allocations/{allocation}/finish",
        {"outcome": "failed", "error": f"oops{NUL}"},
        422,
        "body.error",
    ),
    (
        "agent",
        "POST",
        "/v1/nodes/{node}/heartbeat",
        {"usage": [{"allocation_id": f"a{NUL}", "accelerator_seconds": 1}]},
        422,
        "body.usage.0.allocation_id",
    ),
    ("provider", "GET", "/v1/statements?start=2026-01-01T00:00:00", None, 422, "query.start"),
    (
        "provider",
        "GET",
        "/v1/statements?start=2026-01-01T00:00:00Z&end=2026-02-01T00:00:00",
        None,
        422,
        "query.end",
    ),
    (
        "provider",
        "GET",
        "/v1/statements?start=0001-01-01T00:00:00%2B01:00",
        None,
        422,
        "query.start",
    ),
    ("provider", "GET", "/v1/statements?end=9999-12-31T23:59:59-05:00", None, 422, "query.end"),
    ("provider", "GET", "/v1/statements?start=0.5", None, 422, "query.start"),
    ("provider", "GET", "/v1/allocations?wait=1&unknown=1", None, 422, "query.unknown"),
    ("developer", "GET", "/v1/jobs?limit=1000", None, 422, "query.limit"),
    ("developer", "GET", "/v1/jobs?offset=-1", None, 422, "query.offset"),
    ("developer", "GET", "/v1/offers?min_memory_gib=nan", None, 422, "query.min_memory_gib"),
    ("developer", "POST", "/v1/jobs", b"\xff\xfe", 422, "body"),
    ("developer", "POST", "/v1/jobs", b"[" * 100_000, 422, "body"),
    ("developer", "POST", "/v1/jobs", b"null", 422, "body"),
    (
        "developer",
        "POST",
        "/v1/jobs",
        {"name": "x" * 201, "max_price_per_hour": 1},
        422,
        "body.name",
    ),
    (
        "developer",
        "POST",
        "/v1/jobs",
        {"platforms": ["cpu"], "max_price_per_hour": "0.1234567", "duration_hours": 1},
        422,
        "body.max_price_per_hour",
    ),
    (
        "developer",
        "POST",
        "/v1/jobs",
        {"allowed_countries": ["NL"] * 301, "max_price_per_hour": 1},
        422,
        "body.allowed_countries",
    ),
    ("developer", "POST", "/v1/jobs", b'{"name": "' + b"x" * 1_100_000 + b'"}', 413, None),
    ("developer", "POST", "/v1/arrays", b"BRKARR01" + b"\xff" * 64, 422, "body"),
    ("developer", "POST", "/v1/artifacts", b"", 422, "body"),
]


@pytest.mark.parametrize(
    ("caller", "method", "path", "body", "status", "field"),
    BAD,
    ids=[f"{m} {p[:48]} {s}" for _, m, p, _, s, _ in BAD],
)
def test_bad_input_gets_a_clear_4xx(
    db: Session,
    client_for: ClientFactory,
    caller: str,
    method: str,
    path: str,
    body: Any,
    status: int,
    field: str | None,
) -> None:
    world = build_world(db)
    client = client_for(world.keys[caller])
    url = path.format_map(world.ids)
    if isinstance(body, bytes):
        kind = "octet-stream" if "/v1/arrays" in url or "/v1/artifacts" in url else "json"
        response = client.request(
            method, url, content=body, headers={"Content-Type": f"application/{kind}"}
        )
    else:
        response = client.request(method, url, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["field"] == field
    assert error["message"]
