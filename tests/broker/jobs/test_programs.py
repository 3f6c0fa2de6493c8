"""Jobs that carry a program: the artifact and inputs are checked when the job is submitted."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import pytest
from sqlalchemy.orm import Session

from broker.models.account import Role
from broker.portable import arrays
from broker.portable.artifact import package, package_step
from tests.broker.portable.programs import mlp, mlp_args, sgd_args, sgd_step
from tests.conftest import ClientFactory, signed_in

BIN = {"Content-Type": "application/octet-stream"}


@pytest.fixture(scope="module")
def programs() -> dict[str, Any]:
    params, x = mlp_args()
    state, sx, sy = sgd_args()
    return {
        "function": package(mlp, params, x, platforms=("cpu", "cuda")),
        "function_inputs": arrays.encode(jax.tree.leaves((params, x))),
        "wrong_inputs": arrays.encode(jax.tree.leaves((params, x[:2]))),
        "step": package_step(sgd_step, state, sx, sy),
        "step_inputs": arrays.encode(jax.tree.leaves((state, sx, sy))),
    }


@pytest.fixture
def developer(db: Session, client_for: ClientFactory, programs: dict[str, Any]) -> Any:
    client = signed_in(db, client_for, Role.developer)
    client.sha = {}
    for name, value in programs.items():
        data = value if isinstance(value, bytes) else value.to_bytes()
        path = "/v1/arrays" if isinstance(value, bytes) else "/v1/artifacts"
        response = client.post(path, content=data, headers=BIN)
        assert response.status_code in (200, 201), response.text
        client.sha[name] = response.json()["sha256"]
    return client


def body(**fields: Any) -> dict[str, Any]:
    return {"max_price_per_hour": "2.00", **fields}


def test_platforms_and_work_come_from_the_artifact(
    developer: Any, programs: dict[str, Any]
) -> None:
    sha = developer.sha
    response = developer.post(
        "/v1/jobs", json=body(artifact=sha["step"], inputs=sha["step_inputs"], steps=50)
    )
    assert response.status_code == 201, response.text
    job = response.json()
    manifest = programs["step"].manifest
    assert job["platforms"] == ["cpu", "cuda", "rocm", "tpu"]
    assert job["flops"] == pytest.approx(manifest.flops * 50)
    assert job["bytes"] == pytest.approx(manifest.bytes * 50)
    # What a run moves: the inputs in, the results out, no checkpoints asked for.
    outputs = sum(
        np.dtype(spec.dtype).itemsize * int(np.prod(spec.shape)) for spec in manifest.outputs
    )
    assert job["io_bytes"] == len(programs["step_inputs"]) + outputs
    assert job["program_bytes"] == manifest.program_size
    every = developer.post(
        "/v1/jobs",
        json=body(artifact=sha["step"], inputs=sha["step_inputs"], steps=50, checkpoint_every=10),
    ).json()
    state = sum(
        np.dtype(spec.dtype).itemsize * int(np.prod(spec.shape))
        for spec in manifest.outputs[: manifest.state_leaves]
    )
    assert every["io_bytes"] == job["io_bytes"] + 5 * state
    assert job["dtype"] == "fp32"
    assert job["steps"] == 50
    assert job["steps_done"] == 0
    narrowed = developer.post(
        "/v1/jobs",
        json=body(artifact=sha["function"], inputs=sha["function_inputs"], platforms=["cuda"]),
    )
    assert narrowed.status_code == 201
    assert narrowed.json()["platforms"] == ["cuda"]


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"artifact": "function"}, "body.inputs", "needs its inputs"),
        ({"artifact": "function", "inputs": "wrong_inputs"}, "body.inputs", "do not fit"),
        ({"artifact": "function", "inputs": "step_inputs"}, "body.inputs", "takes 5 input"),
        (
            {"artifact": "function", "inputs": "function_inputs", "steps": 3},
            "body.steps",
            "plain function",
        ),
        ({"artifact": "step", "inputs": "step_inputs"}, "body.steps", "needs steps"),
        (
            {"artifact": "step", "inputs": "step_inputs", "steps": 4, "checkpoint_every": 5},
            "body.checkpoint_every",
            "more than steps",
        ),
        (
            {"artifact": "function", "inputs": "function_inputs", "platforms": ["tpu"]},
            "body.platforms",
            "not exported for tpu",
        ),
        (
            {"artifact": "function", "inputs": "function_inputs", "flops": 5},
            "body.flops",
            "leave it out",
        ),
        (
            {"inputs": "function_inputs", "platforms": ["cpu"], "duration_hours": 1},
            "body.inputs",
            "needs an artifact",
        ),
        ({"duration_hours": 1}, "body.platforms", "give platforms"),
    ],
)
def test_program_errors_name_the_field(
    developer: Any, fields: dict[str, Any], field: str, message: str
) -> None:
    resolved = {k: developer.sha.get(v, v) if isinstance(v, str) else v for k, v in fields.items()}
    response = developer.post("/v1/jobs", json=body(**resolved))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == field
    assert message in error["message"]


def test_another_developers_artifact_cannot_be_used(
    db: Session, client_for: ClientFactory, developer: Any
) -> None:
    other = signed_in(db, client_for, Role.developer)
    response = other.post(
        "/v1/jobs",
        json=body(artifact=developer.sha["function"], inputs=developer.sha["function_inputs"]),
    )
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "body.artifact"
    assert "upload it to /v1/artifacts first" in response.json()["error"]["message"]
