"""Nodes over HTTP: register, publish offers, heartbeats with usage, sign-off, and the
sweep that hands a silent node's jobs back to the market."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, update

from broker.config import get_settings
from broker.db import transaction, utcnow
from broker.market.clearing import run_round
from broker.models.account import Role
from broker.models.market import Allocation
from broker.models.node import Node
from broker.nodes.service import sweep
from tests.conftest import ClientFactory
from tests.factories import job_body, make_account

NODE = {"name": "box-1", "region": "europe-west4", "country": "NL", "lat": 53.44, "lon": 6.84}
H100 = {"accelerator": "h100-sxm", "count": 4, "price_per_hour": "2.00"}


def _client(engine: Engine, clients: ClientFactory, role: Role) -> Any:
    with transaction(engine) as session:
        account, key = make_account(session, role)
    client: Any = clients(key)
    client.account = account
    return client


@pytest.fixture
def market(fresh_engine: Engine, fresh_client_for: ClientFactory) -> dict[str, Any]:
    provider = _client(fresh_engine, fresh_client_for, Role.provider)
    developer = _client(fresh_engine, fresh_client_for, Role.developer)
    return {
        "engine": fresh_engine,
        "clients": fresh_client_for,
        "provider": provider,
        "developer": developer,
    }


def register(market: dict[str, Any], **overrides: Any) -> tuple[Any, str]:
    """Register a node; returns a client holding its node key, and its id."""
    response = market["provider"].post("/v1/nodes", json={**NODE, **overrides})
    assert response.status_code in (200, 201), response.text
    body = response.json()
    return market["clients"](body["api_key"]), body["node"]["id"]


def publish(agent: Any, node_id: str, *offers: dict[str, Any]) -> list[dict[str, Any]]:
    response = agent.put(f"/v1/nodes/{node_id}/offers", json={"offers": list(offers)})
    assert response.status_code == 200, response.text
    return list(response.json()["offers"])


def matched_job(market: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    body = job_body(**{"platforms": ["cuda"], "max_price_per_hour": "5.00", **overrides})
    job = market["developer"].post("/v1/jobs", json=body)
    assert job.status_code == 201, job.text
    run_round(market["engine"], get_settings(), "manual")
    return dict(market["developer"].get(f"/v1/jobs/{job.json()['id']}").json())


def age_heartbeat(engine: Engine, node_id: str, seconds: float) -> None:
    with transaction(engine) as session:
        session.execute(
            update(Node)
            .where(Node.id == node_id)
            .values(last_heartbeat_at=utcnow() - timedelta(seconds=seconds))
        )


def test_register_gives_a_node_key_and_again_revokes_the_old_one(market: dict[str, Any]) -> None:
    first = market["provider"].post("/v1/nodes", json=NODE)
    assert first.status_code == 201, first.text
    body = first.json()
    assert body["node"]["status"] == "online"
    assert body["timeout_seconds"] == get_settings().node_timeout_s
    assert body["heartbeat_seconds"] < body["timeout_seconds"]
    old = market["clients"](body["api_key"])
    node_id = body["node"]["id"]
    assert old.post("/v1/nodes", json={**NODE, "name": "other"}).status_code == 403
    assert old.post(f"/v1/nodes/{node_id}/heartbeat", json={}).status_code == 200

    again = market["provider"].post("/v1/nodes", json=NODE)
    assert again.status_code == 200
    assert again.json()["node"]["id"] == node_id
    assert old.post(f"/v1/nodes/{node_id}/heartbeat", json={}).status_code == 401

    listed = market["provider"].get("/v1/nodes").json()
    assert [n["id"] for n in listed["items"]] == [node_id]
    other = _client(market["engine"], market["clients"], Role.provider)
    assert other.get(f"/v1/nodes/{node_id}").status_code == 404
    assert other.get("/v1/nodes").json()["total"] == 0


def test_bad_registrations_are_refused(market: dict[str, Any]) -> None:
    provider, developer = market["provider"], market["developer"]
    assert developer.post("/v1/nodes", json=NODE).status_code == 403
    for bad in ({"name": "a b"}, {"country": "nl"}, {"lat": 91}, {"devices": [{"id": "0"}]}):
        response = provider.post("/v1/nodes", json={**NODE, **bad})
        assert response.status_code == 422, (bad, response.text)


def test_publish_makes_the_offers_what_the_node_has(market: dict[str, Any]) -> None:
    agent, node_id = register(market)
    (offer,) = publish(agent, node_id, H100)
    assert offer["node_id"] == node_id
    assert (offer["accelerator"], offer["count"], offer["price_per_hour"]) == (
        "h100-sxm",
        4,
        "2.00",
    )
    assert (offer["region"], offer["country"], offer["lat"]) == ("europe-west4", "NL", 53.44)
    assert offer["memory_gib"] == 80  # from the catalog

    # The same list again changes nothing; a new count or price updates in place.
    assert publish(agent, node_id, H100)[0]["updated_at"] == offer["updated_at"]
    (changed,) = publish(agent, node_id, {**H100, "count": 2, "price_per_hour": "1.50"})
    assert (changed["id"], changed["count"], changed["price_per_hour"]) == (offer["id"], 2, "1.50")

    # A model left out, or listed with count 0, is withdrawn.
    cpu = {"accelerator": "cpu", "count": 1, "price_per_hour": "0.05", "tflops_fp32": 0.2}
    (only,) = publish(agent, node_id, {**H100, "count": 0}, cpu)
    assert (only["accelerator"], only["tflops_fp32"]) == ("cpu", 0.2)
    withdrawn = market["provider"].get(f"/v1/offers/{offer['id']}").json()
    assert withdrawn["status"] == "withdrawn"

    twice = agent.put(f"/v1/nodes/{node_id}/offers", json={"offers": [H100, H100]})
    assert twice.status_code == 409


def test_a_node_lists_each_mig_gpu_and_its_orders_name_the_slice(
    market: dict[str, Any],
) -> None:
    agent, node_id = register(market)
    gpu = {"accelerator": "h100-sxm", "count": 1, "price_per_hour": "7.00", "kind": "mig"}
    first = {**gpu, "device": "GPU-1111", "mig_instances": ["3g.40gb@0", "3g.40gb@4"]}
    second = {**gpu, "device": "GPU-2222", "mig_instances": ["7g.80gb@0"]}
    offers = publish(agent, node_id, first, second)
    assert sorted((o["device"], o["kind"], o["mig_instances"][0]) for o in offers) == [
        ("GPU-1111", "mig", "3g.40gb@0"),
        ("GPU-2222", "mig", "7g.80gb@0"),
    ]
    # Listing a GPU twice is refused; one its agent cut again follows the listing.
    assert agent.put(
        f"/v1/nodes/{node_id}/offers", json={"offers": [first, first]}
    ).status_code == 409  # fmt: skip
    job = matched_job(market, accelerators=1, mig_profile="3g.40gb", duration_hours=1)
    assert job["state"] == "matched"
    (order,) = agent.get("/v1/allocations").json()
    assert (order["kind"], order["device"], order["accelerator"]) == ("mig", "GPU-1111", "h100-sxm")
    # The agent's GPU is sold as cut: an instance that exists, not a new one.
    assert order["slice"] in ("3g.40gb@0", "3g.40gb@4")
    assert order["slice_memory_gib"] == 40
    assert order["share"] == pytest.approx(3 / 7)
    # The provider cuts the other half into a 2g and a 1g; the held instance stays held.
    other = 4 if order["slice"] == "3g.40gb@0" else 0
    cut = [order["slice"], f"2g.20gb@{other}", f"1g.10gb@{other + 2}"]
    offers = publish(agent, node_id, {**first, "mig_instances": cut}, second)
    mine = next(o for o in offers if o["device"] == "GPU-1111")
    assert mine["mig_busy"] == [order["slice"]]
    assert mine["mig_instances"] == sorted(cut[1:])


def test_an_amd_gpu_is_sold_as_it_is_partitioned(market: dict[str, Any]) -> None:
    agent, node_id = register(market)
    gpu = {"accelerator": "mi300x", "count": 1, "price_per_hour": "4.00", "kind": "mig"}
    mixed = {**gpu, "device": "0000:05:00", "mig_instances": ["dpx.96gb@0", "qpx.48gb@4"]}
    refused = agent.put(f"/v1/nodes/{node_id}/offers", json={"offers": [mixed]})
    assert refused.status_code == 422
    assert "one mode" in refused.json()["error"]["message"]
    cpx = {**gpu, "device": "0000:05:00", "mig_instances": [f"cpx.24gb@{k}" for k in range(8)]}
    publish(agent, node_id, cpx)
    # A job for half of it finds no DPX partition: the GPU is not cut again for it.
    half = matched_job(
        market, platforms=["rocm"], mig_profile="dpx.96gb", accelerator_models=["mi300x"]
    )
    assert half["state"] == "open"
    small = matched_job(
        market, platforms=["rocm"], mig_profile="cpx.24gb", accelerator_models=["mi300x"]
    )
    assert small["state"] == "matched"
    (order,) = agent.get("/v1/allocations").json()
    assert order["slice"].startswith("cpx.24gb@")
    assert order["share"] == pytest.approx(1 / 8)


def test_a_shared_offer_sells_shares_and_whole_ones(market: dict[str, Any]) -> None:
    agent, node_id = register(market)
    shared = {
        "accelerator": "h100-sxm",
        "count": 1,
        "price_per_hour": "2.00",
        "kind": "shared",
        "shares": 4,
        "memory_per_share_gib": 20,
    }
    (offer,) = publish(agent, node_id, shared)
    assert (offer["kind"], offer["shares"]) == ("shared", 4)
    job = matched_job(market, accelerators=0.25, accepts_shared=True, duration_hours=1)
    assert job["state"] == "matched"
    (order,) = agent.get("/v1/allocations").json()
    assert (order["slice"], order["share"], order["slice_memory_gib"]) == (
        "1/4 shared on GPU 0",
        0.25,
        20,
    )
    # While a share is held it cannot be cut differently.
    (same,) = publish(agent, node_id, {**shared, "shares": 2, "memory_per_share_gib": 40})
    assert (same["id"], same["shares"]) == (offer["id"], 4)


def test_a_node_key_acts_for_its_own_node_only(market: dict[str, Any]) -> None:
    agent_a, node_a = register(market, name="a")
    agent_b, _node_b = register(market, name="b")
    publish(agent_a, node_a, H100)
    assert agent_b.post(f"/v1/nodes/{node_a}/heartbeat", json={}).status_code == 403
    assert agent_b.put(f"/v1/nodes/{node_a}/offers", json={"offers": []}).status_code == 403
    assert agent_b.delete(f"/v1/nodes/{node_a}").status_code == 403
    other = _client(market["engine"], market["clients"], Role.provider)
    assert other.post(f"/v1/nodes/{node_a}/heartbeat", json={}).status_code == 404

    job = matched_job(market)
    (order,) = agent_a.get("/v1/allocations").json()
    assert order["job_id"] == job["id"]
    assert agent_b.get("/v1/allocations").json() == []
    allocation = order["allocation_id"]
    assert agent_b.post(f"/v1/allocations/{allocation}/start").status_code == 404
    # The provider's own key is told to leave the node's work to its agent.
    refused = market["provider"].post(f"/v1/allocations/{allocation}/start")
    assert refused.status_code == 403
    assert "node key" in refused.json()["error"]["message"]
    assert agent_a.post(f"/v1/allocations/{allocation}/start").status_code == 200


def test_usage_is_capped_by_wall_time_and_counted_once(market: dict[str, Any]) -> None:
    agent, node_id = register(market)
    publish(agent, node_id, H100)
    job = matched_job(market, accelerators=2)
    (order,) = agent.get("/v1/allocations").json()
    allocation = order["allocation_id"]
    assert agent.post(f"/v1/allocations/{allocation}/start").status_code == 200
    with transaction(market["engine"]) as session:  # the job started 100 s ago
        session.execute(
            update(Allocation)
            .where(Allocation.id == allocation)
            .values(started_at=utcnow() - timedelta(seconds=100))
        )

    def seconds() -> float:
        return float(market["developer"].get(f"/v1/jobs/{job['id']}").json()["accelerator_seconds"])

    progress = f"/v1/allocations/{allocation}/progress"
    assert (
        agent.post(progress, json={"steps_done": 0, "accelerator_seconds": 50}).status_code == 200
    )
    assert seconds() == 50
    agent.post(progress, json={"steps_done": 0, "accelerator_seconds": 50})  # replayed
    agent.post(progress, json={"steps_done": 0, "accelerator_seconds": 20})  # late
    assert seconds() == 50
    # 2 accelerators for ~100 s: a claim of 10,000 s is cut to the wall time.
    beat = {"usage": [{"allocation_id": allocation, "accelerator_seconds": 10_000}]}
    answer = agent.post(f"/v1/nodes/{node_id}/heartbeat", json=beat).json()
    assert answer["ended"] == []
    assert 200 <= seconds() < 210
    finish = {"outcome": "succeeded", "accelerator_seconds": 1}
    assert agent.post(f"/v1/allocations/{allocation}/finish", json=finish).status_code == 200
    assert 200 <= seconds() < 210

    # Reports on an ended allocation count nothing and tell the agent to stop.
    beat = {"usage": [{"allocation_id": allocation, "accelerator_seconds": 10_000}]}
    answer = agent.post(f"/v1/nodes/{node_id}/heartbeat", json=beat).json()
    assert answer["ended"] == [allocation]
    assert 200 <= seconds() < 210


def test_a_silent_node_goes_offline_and_its_jobs_go_back(market: dict[str, Any]) -> None:
    engine = market["engine"]
    agent, node_id = register(market)
    (offer,) = publish(agent, node_id, H100)
    running = matched_job(market)
    waiting = matched_job(market)
    orders = {o["job_id"]: o for o in agent.get("/v1/allocations").json()}
    assert agent.post(f"/v1/allocations/{orders[running['id']]['allocation_id']}/start").is_success

    timeout = get_settings().node_timeout_s
    with transaction(engine) as session:
        assert sweep(session, timeout, max_attempts=3) == 0  # still fresh
    age_heartbeat(engine, node_id, timeout + 1)
    with transaction(engine) as session:
        assert sweep(session, timeout, max_attempts=3) == 1
    node = market["provider"].get(f"/v1/nodes/{node_id}").json()
    assert node["status"] == "offline"
    assert "no heartbeat" in node["status_reason"]
    assert market["provider"].get(f"/v1/offers/{offer['id']}").json()["status"] == "withdrawn"
    developer = market["developer"]
    back = developer.get(f"/v1/jobs/{running['id']}").json()
    assert (back["state"], back["attempts"]) == ("open", 1)
    assert "no heartbeat" in back["error"]
    assert "back in the order book" in back["error"]
    assert developer.get(f"/v1/jobs/{waiting['id']}").json()["state"] == "open"
    started = f"/v1/allocations/{orders[running['id']]['allocation_id']}/progress"
    assert agent.post(started, json={"steps_done": 1}).status_code == 409

    # The agent comes back: its heartbeat says to publish again.
    answer = agent.post(f"/v1/nodes/{node_id}/heartbeat", json={}).json()
    assert (answer["node"]["status"], answer["resync"]) == ("online", True)
    assert agent.post(f"/v1/nodes/{node_id}/heartbeat", json={}).json()["resync"] is False
    (again,) = publish(agent, node_id, H100)
    assert again["id"] != offer["id"]


def test_a_job_lost_too_often_fails_with_the_reason(market: dict[str, Any]) -> None:
    engine = market["engine"]
    agent, node_id = register(market)
    job = matched_job(market)
    for attempt in (1, 2):
        publish(agent, node_id, H100)
        run_round(engine, get_settings(), "manual")
        (order,) = agent.get("/v1/allocations").json()
        assert agent.post(f"/v1/allocations/{order['allocation_id']}/start").is_success
        age_heartbeat(engine, node_id, 1000)
        with transaction(engine) as session:
            sweep(session, 60, max_attempts=2)
        agent.post(f"/v1/nodes/{node_id}/heartbeat", json={})
        state = market["developer"].get(f"/v1/jobs/{job['id']}").json()
        assert state["attempts"] == attempt
    assert state["state"] == "failed"
    assert state["error"].startswith("gave up after 2 attempts; the last: node box-1 sent no")


def test_a_failure_marked_retry_goes_back_to_the_market(market: dict[str, Any]) -> None:
    agent, node_id = register(market)
    publish(agent, node_id, H100)
    job = matched_job(market)
    (order,) = agent.get("/v1/allocations").json()
    allocation = order["allocation_id"]
    agent.post(f"/v1/allocations/{allocation}/start")
    failed = {"outcome": "failed", "error": "CUDA error: out of memory", "retry": True}
    assert agent.post(f"/v1/allocations/{allocation}/finish", json=failed).status_code == 200
    assert agent.post(f"/v1/allocations/{allocation}/finish", json=failed).status_code == 200
    back = market["developer"].get(f"/v1/jobs/{job['id']}").json()
    assert back["state"] == "open"
    assert "out of memory" in back["error"]


def test_signing_off_withdraws_offers_and_hands_jobs_back(market: dict[str, Any]) -> None:
    agent, node_id = register(market)
    (offer,) = publish(agent, node_id, H100)
    job = matched_job(market)
    (order,) = agent.get("/v1/allocations").json()
    agent.post(f"/v1/allocations/{order['allocation_id']}/start")
    stopped = agent.delete(f"/v1/nodes/{node_id}")
    assert stopped.status_code == 200
    assert stopped.json()["status"] == "stopped"
    assert market["provider"].get(f"/v1/offers/{offer['id']}").json()["status"] == "withdrawn"
    back = market["developer"].get(f"/v1/jobs/{job['id']}").json()
    assert back["state"] == "open"
    assert "agent stopped" in back["error"]
    assert agent.post(f"/v1/nodes/{node_id}/heartbeat", json={}).status_code == 401
    # The provider may sign a node off too, and twice is harmless.
    assert market["provider"].delete(f"/v1/nodes/{node_id}").status_code == 200
