"""What a provider sees of the jobs it runs, and what a node may hand back as their
checkpoints and results: its own uploads for that allocation, nothing else."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
from sqlalchemy import update
from sqlalchemy.orm import Session

from broker.allocations.schemas import RunOut
from broker.db import utcnow
from broker.models.blob import BlobUpload
from broker.portable import arrays
from tests.conftest import ClientFactory
from tests.test_authz import build_world

BIN = {"Content-Type": "application/octet-stream"}


def _bundle(value: float) -> bytes:
    return arrays.encode([np.full(2, value, np.float32)])  # what the world's job returns


def test_reports_answer_with_the_provider_allocation_view_not_the_developers_job(
    db: Session, client_for: ClientFactory
) -> None:
    world = build_world(db)
    agent = client_for(world.keys["agent"])
    developer = client_for(world.keys["developer"]).get("/v1/me").json()
    allocation = world.ids["allocation"]
    answers = [
        agent.post(f"/v1/allocations/{allocation}/progress", json={"steps_done": 1}),
        agent.post(
            f"/v1/allocations/{allocation}/checkpoint",
            json={"checkpoint": world.ids["checkpoint"], "step": 2},
        ),
    ]
    sha = agent.post("/v1/arrays", content=_bundle(1.0), headers=BIN).json()["sha256"]
    answers.append(
        agent.post(
            f"/v1/allocations/{allocation}/finish", json={"outcome": "succeeded", "result": sha}
        )
    )
    for answer in answers:
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert set(body) == set(RunOut.model_fields)
        assert developer["id"] not in answer.text
        for private in ("account_id", "max_price_per_hour", "budget_usd", "user_lat", "name"):
            assert private not in body
    assert answers[-1].json()["state"] == "succeeded"
    assert answers[-1].json()["result"] == sha


def test_a_node_hands_back_only_what_it_uploaded_for_the_allocation(
    db: Session, client_for: ClientFactory
) -> None:
    world = build_world(db)
    agent = client_for(world.keys["agent"])
    sibling = client_for(world.keys["other_agent"])  # another node of the same provider
    allocation = world.ids["allocation"]
    finish = f"/v1/allocations/{allocation}/finish"

    # Another node's upload, though the provider account may read it.
    foreign = sibling.post("/v1/arrays", content=_bundle(7.0), headers=BIN)
    assert foreign.status_code == 201
    refused = agent.post(finish, json={"outcome": "succeeded", "result": foreign.json()["sha256"]})
    assert refused.status_code == 422
    assert "uploaded by node" in refused.json()["error"]["message"]
    checkpoint = agent.post(
        f"/v1/allocations/{allocation}/checkpoint",
        json={"checkpoint": foreign.json()["sha256"], "step": 2},
    )
    assert checkpoint.status_code == 422
    # Its own upload, but from before the job was matched to it.
    early = agent.post("/v1/arrays", content=_bundle(5.0), headers=BIN).json()["sha256"]
    db.execute(
        update(BlobUpload)
        .where(BlobUpload.sha256 == early)
        .values(uploaded_at=utcnow() - timedelta(days=2))
    )
    assert agent.post(finish, json={"outcome": "succeeded", "result": early}).status_code == 422
    # Uploading it again, now, makes it this run's.
    assert agent.post("/v1/arrays", content=_bundle(5.0), headers=BIN).status_code == 200
    done = agent.post(finish, json={"outcome": "succeeded", "result": early})
    assert done.status_code == 200, done.text
    developer = client_for(world.keys["developer"])
    assert developer.get(f"/v1/arrays/{early}").status_code == 200
    # The sibling's upload was never given to the developer.
    assert developer.get(f"/v1/arrays/{foreign.json()['sha256']}").status_code == 404
