"""The agent in this process against a live server: it registers, publishes this CPU,
runs what the market matches to it, reports usage, and on stopping hands running
work back to the market with its checkpoint."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sqlalchemy import Engine, select

from adapters import registry
from adapters.base import Device
from broker.agent import AgentConfig, NodeAgent, parse_prices
from broker.agent.node import _Run
from broker.config import get_settings
from broker.db import transaction
from broker.market.clearing import run_round
from broker.models.account import Role
from broker.models.market import Allocation
from broker.sandbox import Placement
from broker.sdk import Client
from broker.sdk.provider import RunHandle
from tests.factories import make_account

PRICE: dict[str, Any] = {"max_price_per_hour": 1.0}


def slow_step(state: tuple[Any, Any], m: Any) -> tuple[Any, Any]:
    w, count = state
    return jax.lax.fori_loop(0, 4, lambda _, w: jnp.tanh(w @ m), w), count + 1


def _wait(check: Any, timeout: float = 60) -> Any:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.05)
    raise AssertionError("timed out")


def _start_agent(
    live_url: str, engine: Engine, slots: int = 1, shares: int | None = None
) -> Iterator[dict[str, Any]]:
    with transaction(engine) as session:
        _, dev_key = make_account(session, Role.developer)
        _, prov_key = make_account(session, Role.provider)
    config = AgentConfig(
        broker=live_url,
        api_key=prov_key,
        name="test-node",
        region="europe-west4",
        country="NL",
        lat=53.44,
        lon=6.84,
        prices=parse_prices(["cpu=0.10"]),
        adapter="cpu",
        options=registry.Options(cpu_slots=slots),
        poll_seconds=0.5,
        shares=shares,
    )
    node = NodeAgent(config)
    stop = threading.Event()
    thread = threading.Thread(target=node.run, args=(stop,), daemon=True)
    thread.start()
    developer = Client(live_url, dev_key, retries=1)
    _wait(lambda: developer.http.json("GET", "/v1/offers")["total"] == 1)
    yield {
        "node": node,
        "stop": stop,
        "thread": thread,
        "developer": developer,
        "engine": engine,
    }
    stop.set()
    thread.join(timeout=60)
    developer.close()


@pytest.fixture
def agent(
    live_url: str, fresh_engine: Engine, request: pytest.FixtureRequest
) -> Iterator[dict[str, Any]]:
    """An agent offering this CPU (``cpu_slots`` from the test's param, 1 by default)."""
    yield from _start_agent(live_url, fresh_engine, getattr(request, "param", 1))


@pytest.fixture
def shared_agent(live_url: str, fresh_engine: Engine) -> Iterator[dict[str, Any]]:
    """An agent selling this CPU as two shares (``broker agent --shares 2``)."""
    yield from _start_agent(live_url, fresh_engine, shares=2)


def clear(engine: Engine) -> None:
    run_round(engine, get_settings(), "manual")


def test_the_agent_runs_what_the_market_matches(agent: dict[str, Any]) -> None:
    developer: Client = agent["developer"]
    (offer,) = developer.http.json("GET", "/v1/offers")["items"]
    assert (offer["accelerator"], offer["price_per_hour"], offer["node_id"]) == (
        "cpu",
        "0.10",
        agent["node"].node_id,
    )
    # This CPU's power cannot be read here (no RAPL in a container): a reader that says
    # 40 W stands in for the hardware's, so the run's energy is measured and reported.
    agent["node"].power_reader = {"watts": lambda: {0: 40.0}}
    job = developer.submit(lambda x: x @ x.T, jnp.ones((4, 3)), **PRICE)
    clear(agent["engine"])
    job.wait(timeout=60, poll=0.05, progress=False)
    np.testing.assert_array_equal(job.result(), np.full((4, 4), 3.0))
    assert job.data["accelerator_seconds"] > 0
    with transaction(agent["engine"], write=False) as session:
        (run,) = session.scalars(select(Allocation).where(Allocation.job_id == job.id)).all()
        # 40 W over the run's wall time (at least the metered time), times the PUE.
        assert run.measured_kwh is not None
        assert run.measured_kwh >= 40 * job.data["accelerator_seconds"] / 3.6e6
        assert run.measured_gco2 is not None
    # The run's log reached the broker with its reports: the agent's lines, the end.
    lines = developer.http.json("GET", f"/v1/jobs/{job.id}/logs")
    texts = [line["text"] for line in lines]
    assert texts[0].startswith("fetched the program (")
    assert any(t.startswith("compiled for cpu in ") for t in texts)
    assert texts[-1] == "the run succeeded"
    # After signing on, the agent measured a run's start-up and stated it with its offer.
    measured = _wait(
        lambda: developer.http.json("GET", "/v1/offers")["items"][0]["startup_seconds"]
    )
    assert 0 < measured < 60
    overheads = agent["node"].overheads
    assert overheads.startup_seconds == pytest.approx(measured, abs=0.001)
    # And what a GB of a program's data costs a run here, beside it.
    offer = developer.http.json("GET", "/v1/offers")["items"][0]
    assert offer["transfer_s_per_gb"] == pytest.approx(overheads.transfer_s_per_gb, abs=0.001)
    assert 0 <= offer["transfer_s_per_gb"] < 600
    assert offer["compile_s_per_kb"] == pytest.approx(overheads.compile_s_per_kb, abs=0.0001)

    agent["stop"].set()
    agent["thread"].join(timeout=60)
    assert not agent["thread"].is_alive()
    assert developer.http.json("GET", "/v1/offers")["total"] == 0


def test_stopping_hands_running_work_back_with_its_checkpoint(agent: dict[str, Any]) -> None:
    developer: Client = agent["developer"]
    m = jnp.eye(64) * 0.5
    job = developer.submit(
        slow_step,
        (jnp.ones((64, 64)), jnp.int32(0)),
        m,
        steps=100_000,
        checkpoint_every=20,
        **PRICE,
    )
    clear(agent["engine"])
    _wait(lambda: job.refresh().data["checkpoint_step"] >= 20)
    agent["stop"].set()
    agent["thread"].join(timeout=60)
    assert not agent["thread"].is_alive()
    back = job.refresh().data
    assert back["state"] == "open"
    assert "agent stopped" in back["error"]
    assert back["checkpoint_step"] >= 20
    assert back["accelerator_seconds"] > 0


@pytest.mark.parametrize("agent", [2], indirect=True)
def test_jobs_run_side_by_side_when_the_node_has_room(agent: dict[str, Any]) -> None:
    developer: Client = agent["developer"]
    (offer,) = developer.http.json("GET", "/v1/offers")["items"]
    assert offer["count"] == 2
    m = jnp.eye(64) * 0.5
    jobs = [
        developer.submit(
            slow_step,
            (jnp.ones((64, 64)), jnp.int32(0)),
            m,
            steps=100_000,
            checkpoint_every=50,
            **PRICE,
        )
        for _ in range(2)
    ]
    clear(agent["engine"])
    _wait(lambda: all(j.refresh().data["steps_done"] > 0 for j in jobs))
    assert len(agent["node"].running()) == 2
    for job in jobs:
        job.cancel()
    _wait(lambda: not agent["node"].running())


def forever(x: Any) -> Any:
    # Counts up in twos from 0: wraps around through the even numbers, never -1.
    return jax.lax.while_loop(lambda c: c[0] != -1, lambda c: c + 2, x)


@pytest.mark.parametrize("kind", ["single-call", "iterative"])
def test_a_cancelled_run_stops_within_seconds_and_frees_its_slot(
    agent: dict[str, Any], kind: str
) -> None:
    """A single call that never ends is killed too: the run is a child process."""
    import time

    developer: Client = agent["developer"]
    node: NodeAgent = agent["node"]
    if kind == "single-call":
        job = developer.submit(forever, jnp.zeros(1, jnp.int32), **PRICE)
    else:
        job = developer.submit(
            slow_step,
            (jnp.ones((64, 64)), jnp.int32(0)),
            jnp.eye(64) * 0.5,
            steps=10_000_000,
            checkpoint_every=1_000_000,
            **PRICE,
        )
    clear(agent["engine"])
    _wait(lambda: job.refresh().data["state"] == "running" and node.running())
    time.sleep(1.0)  # well into the program
    cancelled = time.monotonic()
    job.cancel()
    _wait(lambda: not node.running(), timeout=15)
    assert time.monotonic() - cancelled < 10
    # The slot is free again: the next job runs on it and finishes.
    after = developer.submit(lambda x: x + 1, jnp.ones(3), **PRICE)
    clear(agent["engine"])
    after.wait(timeout=60, poll=0.05, progress=False)
    np.testing.assert_array_equal(after.result(), np.full(3, 2.0))


def _node(
    platform: str, shares: int | None = None, prices: dict[str, Decimal] | None = None
) -> NodeAgent:
    config = AgentConfig(
        broker="http://127.0.0.1:9",
        api_key="bk_x",
        name="n",
        region="r",
        country="NL",
        lat=0,
        lon=0,
        prices={"*": Decimal("2")} if prices is None else prices,
        adapter="cpu",
        platform=platform,
        shares=shares,
    )
    return NodeAgent(config)


def test_offers_follow_devices_and_prices() -> None:
    node = _node("cuda", prices={"h100-sxm": Decimal("2.5"), "*": Decimal("1")})
    config = node.config
    devices = [
        Device(id="0", name="NVIDIA H100 80GB HBM3", model="h100-sxm", platform="cuda"),
        Device(id="1", name="NVIDIA H100 80GB HBM3", model="h100-sxm", platform="cuda"),
        Device(id="2", name="busy", model="h100-sxm", platform="cuda", offerable=False),
        Device(id="3", name="?", model=None, platform="cuda", offerable=False),
        Device(id="tpu", name="v5litepod-8", model="tpu-v5e", platform="tpu", count=8),
    ]
    # Only what this agent's backend (cuda here) runs is offered: not the TPU.
    assert node.offers(devices) == [
        {"accelerator": "h100-sxm", "count": 2, "price_per_hour": "2.5"}
    ]
    config.prices = {"cpu": Decimal("0.1")}
    assert node.offers(devices) == []  # h100 has no price
    config.platform, config.prices = "cpu", {"*": Decimal("1")}
    cpu = Device(id="cpu", name="host", model="cpu", platform="cpu", tflops_fp32=0.3)
    assert node.offers([*devices, cpu]) == [
        {"accelerator": "cpu", "count": 1, "price_per_hour": "1", "tflops_fp32": 0.3}
    ]


MIG_3G = (("3g.40gb@4", "MIG-aaaa"), ("3g.40gb@0", "MIG-bbbb"))


def test_shared_and_mig_offers_follow_the_devices() -> None:
    node = _node("cuda", shares=4)
    devices = [
        Device(id="0", name="H100", model="h100-sxm", platform="cuda", memory_gib=79.6),
        Device(id="1", name="H100", model="h100-sxm", platform="cuda", memory_gib=79.6),
        Device(
            id="2",
            name="H100",
            model="h100-sxm",
            platform="cuda",
            memory_gib=79.6,
            mig=MIG_3G,
            extra={"uuid": "GPU-2222"},
        ),
    ]
    shared, cut = node.offers(devices)
    # The whole GPUs as four shares each, their memory split and rounded down.
    assert (shared["count"], shared["kind"], shared["shares"]) == (2, "shared", 4)
    assert shared["memory_per_share_gib"] == 19.9
    # The MIG GPU as its instances, one offer naming it.
    assert (cut["count"], cut["kind"], cut["device"]) == (1, "mig", "GPU-2222")
    assert cut["mig_instances"] == ["3g.40gb@0", "3g.40gb@4"]
    # Without --shares the other GPUs are sold whole.
    whole, _ = _node("cuda").offers(devices)
    assert "kind" not in whole


def test_a_fractional_run_is_placed_on_its_slice() -> None:
    node = _node("cuda", shares=4)
    node._devices = [
        Device(id="0", name="H100", model="h100-sxm", platform="cuda", memory_gib=80),
        Device(id="1", name="H100", model="h100-sxm", platform="cuda", memory_gib=80),
        Device(
            id="2", name="H100", model="h100-sxm", platform="cuda", mig=MIG_3G,
            extra={"uuid": "GPU-2222"},
        ),
    ]  # fmt: skip
    order: dict[str, Any] = {"accelerator": "h100-sxm", "kind": "mig", "device": "GPU-2222"}
    placed = node.placement({**order, "slice": "3g.40gb@0"})
    assert isinstance(placed, Placement)
    assert placed.env == {"CUDA_VISIBLE_DEVICES": "MIG-bbbb"}
    refused = node.placement({**order, "slice": "7g.80gb@0"})
    assert isinstance(refused, str)
    assert "not cut on GPU 2" in refused
    shared = {"accelerator": "h100-sxm", "kind": "shared", "device": None}
    placed = node.placement({**shared, "slice": "1/4 shared on GPU 1"})
    assert isinstance(placed, Placement)
    assert placed.env == {
        "CUDA_VISIBLE_DEVICES": "1",
        "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.237",  # a quarter, less room for its context
    }
    placed = node.placement({**shared, "slice": "4/4 shared on GPU 0"})
    assert isinstance(placed, Placement)
    assert placed.env == {"CUDA_VISIBLE_DEVICES": "0"}  # all of it: no cap
    assert node.placement({**shared, "slice": None}) is None  # whole accelerators
    assert isinstance(node.placement({**shared, "slice": "1/4 shared on GPU 5"}), str)


def test_an_amd_partition_runs_on_its_logical_gpu() -> None:
    node = _node("rocm")
    cut = tuple((f"cpx.24gb@{k}", str(8 + k)) for k in range(8))
    gpu = Device(id="0000:05:00", name="MI300X", model="mi300x", platform="rocm", mig=cut)
    node._devices = [gpu]
    (offer,) = node.offers([gpu])
    assert (offer["kind"], offer["device"], len(offer["mig_instances"])) == ("mig", "0000:05:00", 8)
    order = {"accelerator": "mi300x", "kind": "mig", "device": "0000:05:00", "slice": "cpx.24gb@3"}
    placed = node.placement(order)
    assert isinstance(placed, Placement)
    assert placed.env == {"HIP_VISIBLE_DEVICES": "11"}


def test_cpu_shares_get_cores_of_their_own() -> None:
    node = _node("cpu", shares=2)
    node._devices = [Device(id="host", name="cpu", model="cpu", platform="cpu", count=1)]
    cores = sorted(os.sched_getaffinity(0))
    order = {"accelerator": "cpu", "kind": "shared", "slice": "1/2 shared on GPU 0"}
    first = node.placement(order)
    assert isinstance(first, Placement)
    assert first.cpus is not None
    assert len(first.cpus) == max(1, round(len(cores) / 2))
    assert first.env == {}  # the spare child can take it: cores are set after it starts
    node._runs["a"] = _Run(RunHandle("a", 0.5), threading.Thread(), None, first.cpus)
    second = node.placement(order)
    assert isinstance(second, Placement)
    assert second.cpus is not None
    if len(cores) > 1:
        assert not set(first.cpus) & set(second.cpus)  # the least used cores go first


def test_prices_parse_to_catalog_keys() -> None:
    assert parse_prices(["h100=2.50", "*=1", "MI300X=3"]) == {
        "h100-sxm": Decimal("2.50"),
        "*": Decimal("1"),
        "mi300x": Decimal("3"),
    }
    for bad in ("h100", "h100=", "h100=-1", "=2", "h100=abc", "h100=nan"):
        with pytest.raises(ValueError, match="MODEL=USD_PER_HOUR"):
            parse_prices([bad])


def test_a_run_whose_end_cannot_be_reported_is_reported_later(agent: dict[str, Any]) -> None:
    """The broker was down when the run ended: the agent keeps the end and sends it
    with a later heartbeat, so the result is not lost to the outage."""
    from broker.sdk.http import BrokerUnavailable

    node: NodeAgent = agent["node"]
    assert node.client is not None
    real_finish = node.client.finish

    def broker_down_at_the_end(allocation: str, outcome: str, *args: Any, **kw: Any) -> Any:
        if outcome == "succeeded":
            raise BrokerUnavailable(503, "unavailable", "the broker is down")
        return real_finish(allocation, outcome, *args, **kw)

    node.client.finish = broker_down_at_the_end  # type: ignore[method-assign,assignment]
    developer: Client = agent["developer"]
    job = developer.submit(lambda x: x + 1, jnp.ones(3), **PRICE)
    clear(agent["engine"])
    _wait(lambda: node._unreported)
    assert job.refresh().data["state"] == "running"
    node.client.finish = real_finish  # type: ignore[method-assign]
    node.hand_back_unreported()  # the next heartbeat does this
    done = job.refresh().data
    assert done["state"] == "succeeded"
    assert done["attempts"] == 1
    np.testing.assert_array_equal(job.result(), np.full(3, 2.0))
    assert not node._unreported


def test_an_emulated_offer_runs_its_jobs_on_this_cpu_and_says_so(
    live_url: str,
    fresh_engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A demo's H100, emulated: offered and labelled as such, its job run from the
    artifact's cpu version, with a log line that says it."""
    monkeypatch.setenv("BROKER_ALLOW_EMULATION", "1")
    get_settings.cache_clear()
    with transaction(fresh_engine) as session:
        _, dev_key = make_account(session, Role.developer)
        _, prov_key = make_account(session, Role.provider)
    config = AgentConfig(
        broker=live_url,
        api_key=prov_key,
        name="demo-h100",
        region="us-east1",
        country="US",
        lat=33.2,
        lon=-80.0,
        prices=parse_prices(["h100-sxm=2.50"]),
        adapter="emulated",
        options=registry.Options(emulate=(("h100-sxm", 1),)),
        poll_seconds=0.5,
    )
    node = NodeAgent(config)
    stop = threading.Event()
    thread = threading.Thread(target=node.run, args=(stop,), daemon=True)
    thread.start()
    try:
        with Client(live_url, dev_key, retries=1) as developer:
            (offer,) = _wait(lambda: developer.http.json("GET", "/v1/offers")["items"])
            assert (offer["accelerator"], offer["platform"], offer["emulated"]) == (
                "h100-sxm",
                "cuda",
                True,
            )
            x = jnp.arange(6.0)
            job = developer.submit(
                lambda v: jnp.sin(v) * 2, x, platforms=("cpu", "cuda"), max_price_per_hour=3
            )
            run_round(fresh_engine, get_settings(), "manual")
            done = job.wait(timeout=60, poll=0.2, progress=False)
            np.testing.assert_allclose(done.result(), np.sin(np.arange(6.0)) * 2, rtol=1e-6)
            assert done.data["price_per_hour"] == "2.50"
    finally:
        stop.set()
        thread.join(timeout=30)
        get_settings.cache_clear()
    assert any("emulates cuda" in r.getMessage() for r in caplog.records)


def test_a_broker_refuses_emulated_offers_unless_told_to(db: Any, client_for: Any) -> None:
    from tests.conftest import signed_in
    from tests.factories import offer_body

    provider = signed_in(db, client_for, Role.provider)
    refused = provider.post("/v1/offers", json=offer_body(emulated=True))
    assert refused.status_code == 422
    assert refused.json()["error"]["field"] == "body.emulated"
    assert "BROKER_ALLOW_EMULATION" in refused.json()["error"]["message"]
    plain = provider.post("/v1/offers", json=offer_body())
    assert plain.json()["emulated"] is False


def heavy_step(state: tuple[Any, Any], m: Any) -> tuple[Any, Any]:
    w, count = state
    return jax.lax.fori_loop(0, 4, lambda _, w: jnp.tanh(w @ m) / 2, w), count + 1


def test_two_halves_share_the_cpu_at_once_and_a_whole_job_waits(
    shared_agent: dict[str, Any],
) -> None:
    """Issue 23's end to end: two jobs that need half of this CPU each run on it at
    once, each on cores of its own, with the right results; a job that needs all of
    it waits until they are done, then runs."""
    developer: Client = shared_agent["developer"]
    engine: Engine = shared_agent["engine"]
    (offer,) = developer.http.json("GET", "/v1/offers")["items"]
    assert (offer["kind"], offer["shares"], offer["count"]) == ("shared", 2, 1)
    m = np.full((384, 384), 1 / 384, dtype=np.float32)
    w0 = np.eye(384, dtype=np.float32)
    steps = 60
    halves = [
        developer.submit(
            heavy_step,
            (w0 * (k + 1), np.int32(0)),
            m,
            steps=steps,
            accelerators=0.5,
            accepts_shared=True,
            **PRICE,
        )
        for k in range(2)
    ]
    clear(engine)
    # Both run at once: the node's one CPU holds two halves.
    _wait(lambda: all(h.refresh().data["state"] in ("running", "succeeded") for h in halves))
    whole = developer.submit(lambda x: x * 2, jnp.ones(3), **PRICE)
    clear(engine)
    assert whole.refresh().data["state"] == "open"  # no accelerator is free whole
    for k, h in enumerate(halves):
        h.wait(timeout=120, poll=0.1, progress=False)
        expected = w0 * (k + 1)
        for _ in range(steps):
            for _ in range(4):
                expected = np.tanh(expected @ m) / 2
        w, count = h.result()
        np.testing.assert_allclose(w, expected, rtol=1e-4, atol=1e-6)
        assert int(count) == steps
    with transaction(engine, write=False) as session:
        runs = {
            a.job_id: a
            for a in session.scalars(
                select(Allocation).where(Allocation.job_id.in_([h.id for h in halves]))
            )
        }
    first, second = (runs[h.id] for h in halves)
    assert first.slice == second.slice == "1/2 shared on GPU 0"
    assert first.started_at is not None
    assert second.started_at is not None
    assert first.ended_at is not None
    assert second.ended_at is not None
    assert max(first.started_at, second.started_at) < min(first.ended_at, second.ended_at)
    # Each ran on cores of its own (when there are two to give), billed at half.
    placed = [
        next(
            line["text"]
            for line in developer.http.json("GET", f"/v1/jobs/{h.id}/logs")
            if line["text"].startswith("runs on 1/2 shared on GPU 0: ")
        )
        for h in halves
    ]
    if len(os.sched_getaffinity(0)) >= 2:
        assert placed[0] != placed[1]
    for h in halves:
        data = h.refresh().data
        assert data["accelerator_seconds"] > 0
    # Once both halves are done the whole job gets all of the CPU.
    clear(engine)
    whole.wait(timeout=60, poll=0.05, progress=False)
    np.testing.assert_array_equal(whole.result(), np.full(3, 2.0))
    with transaction(engine, write=False) as session:
        (run,) = session.scalars(select(Allocation).where(Allocation.job_id == whole.id))
        assert (run.slice, run.share_num, run.share_den) == ("2/2 shared on GPU 0", 1, 1)
