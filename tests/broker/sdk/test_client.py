"""The SDK against the app served for real: submit, clear, run on this CPU, wait, result."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sqlalchemy import Engine

from broker.config import get_settings
from broker.db import transaction
from broker.market.clearing import run_round
from broker.models.account import Role
from broker.sdk import Client, JobCancelled, JobFailed, ProviderClient, run_allocation
from tests.factories import make_account, offer_body

PRICE: dict[str, Any] = {"max_price_per_hour": 4.0, "deadline_hours": 6}


def loss_fn(params: dict[str, Any], batch: dict[str, Any]) -> dict[str, Any]:
    pred = jnp.tanh(batch["x"] @ params["w"] + params["b"])
    return {"loss": jnp.mean((pred - batch["y"]) ** 2), "pred": pred}


def train_step(state: tuple[Any, Any], x: Any, y: Any) -> tuple[Any, Any]:
    w, count = state
    grad = jax.grad(lambda w: jnp.mean((jnp.tanh(x @ w) - y) ** 2))(w)
    return w - 0.5 * grad, count + 1


@pytest.fixture
def market(live_url: str, fresh_engine: Engine) -> Iterator[dict[str, Any]]:
    """A developer and a provider with one CPU offer, on a live server."""
    with transaction(fresh_engine) as session:
        _, dev_key = make_account(session, Role.developer)
        _, prov_key = make_account(session, Role.provider)
    developer = Client(live_url, dev_key, retries=1)
    provider = ProviderClient(live_url, prov_key, retries=1)
    offer = provider.http.json(
        "POST",
        "/v1/offers",
        json=offer_body(
            accelerator="cpu-core",
            vendor="cpu",
            platform="cpu",
            memory_gib=8,
            tflops_bf16=0.1,
            tflops_fp32=0.1,
            mem_bw_gbps=10,
            count=2,
            price_per_hour="0.10",
        ),
    )
    yield {"developer": developer, "provider": provider, "offer": offer, "engine": fresh_engine}
    developer.close()
    provider.close()


def clear(engine: Engine) -> None:
    run_round(engine, get_settings(), "manual")


def run_all(provider: ProviderClient) -> list[str]:
    return [run_allocation(provider, order) for order in provider.work()]


def test_submit_wait_result_equals_plain_jax(market: dict[str, Any]) -> None:
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32), "b": jnp.zeros(4)}
    batch = {"x": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32), "y": jnp.ones((16, 4))}
    client: Client = market["developer"]
    job = client.submit(
        loss_fn, params, batch, accelerators=1, data_region="europe-west4", data_gb=1, **PRICE
    )
    assert job.state == "open"
    assert job.data["platforms"] == ["cpu", "cuda", "rocm", "tpu"]
    assert job.data["flops"] > 0
    assert job.data["dtype"] == "fp32"

    clear(market["engine"])
    assert run_all(market["provider"]) == ["succeeded"]
    job.wait(timeout=30, poll=0.05)
    out = job.result()
    expected = loss_fn(params, batch)
    assert set(out) == {"loss", "pred"}
    np.testing.assert_allclose(out["pred"], expected["pred"], rtol=1e-6)
    np.testing.assert_allclose(out["loss"], expected["loss"], rtol=1e-6)
    # A fresh handle (another process, say) reads the same result.
    again = client.job(job.id).result()
    np.testing.assert_allclose(again["loss"], expected["loss"], rtol=1e-6)
    assert [j.id for j in client.jobs(state="succeeded")] == [job.id]


def test_iterative_job_resumes_from_checkpoint_and_matches_uninterrupted(
    market: dict[str, Any],
) -> None:
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(10, 6)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(10, 3)), jnp.float32)
    state = (w, jnp.int32(0))
    client: Client = market["developer"]
    provider: ProviderClient = market["provider"]
    job = client.submit(train_step, state, x, y, steps=20, checkpoint_every=5, **PRICE)
    clear(market["engine"])
    (order,) = provider.work()

    # The first provider run dies after its second checkpoint (step 10).
    real_checkpoint = provider.checkpoint
    stop = threading.Event()

    def dying_checkpoint(allocation: str, leaves: Any, step: int) -> str:
        sha = real_checkpoint(allocation, leaves, step)
        if step == 10:
            stop.set()
            raise KeyboardInterrupt  # the machine goes away mid-job
        return sha

    provider.checkpoint = dying_checkpoint  # type: ignore[method-assign,assignment]
    with pytest.raises(KeyboardInterrupt):
        run_allocation(provider, order)
    provider.checkpoint = real_checkpoint  # type: ignore[method-assign,assignment]
    assert client.job(job.id).data["checkpoint_step"] == 10

    # The market hands the job back (here, by hand) and it resumes on the next run.
    requeue(market["engine"], job.id)
    clear(market["engine"])
    (order,) = provider.work()
    assert order["checkpoint_step"] == 10
    assert run_allocation(provider, order) == "succeeded"
    job.wait(timeout=30, poll=0.05, progress=False)
    assert job.data["attempts"] == 2
    assert job.data["steps_done"] == 20

    plain = state
    for _ in range(20):
        plain = jax.jit(train_step)(plain, x, y)
    out = job.result()
    np.testing.assert_allclose(out[0], plain[0], rtol=1e-6, atol=1e-6)
    assert int(out[1]) == 20


def requeue(engine: Engine, job_id: str) -> None:
    from broker.ledger import end_job
    from broker.models.job import Job
    from broker.models.job_state import JobState

    with transaction(engine) as session:
        job = session.get(Job, job_id)
        assert job is not None
        end_job(session, job, JobState.open)


def test_failed_and_cancelled_jobs_raise_clear_errors(market: dict[str, Any]) -> None:
    client: Client = market["developer"]
    provider: ProviderClient = market["provider"]
    job = client.submit(lambda x: x * 2, jnp.ones(3), **PRICE)
    clear(market["engine"])
    (order,) = provider.work()
    provider.start(order["allocation_id"])
    provider.finish(order["allocation_id"], "failed", error="out of memory")
    with pytest.raises(JobFailed, match="out of memory"):
        job.wait(timeout=10, poll=0.05, progress=False)

    other = client.submit(lambda x: x + 1, jnp.ones(3), **PRICE)
    other.cancel()
    with pytest.raises(JobCancelled):
        other.wait(timeout=10, poll=0.05, progress=False)


def test_cpu_only_offer_never_gets_a_cuda_only_job(market: dict[str, Any]) -> None:
    client: Client = market["developer"]
    job = client.submit(lambda x: x * 2, jnp.ones(3), platforms=("cuda",), **PRICE)
    assert job.data["platforms"] == ["cuda"]
    clear(market["engine"])
    detail = job.refresh().data
    assert detail["state"] == "open"
    assert detail["unmatched"]["ruled_out"]["platform"] == 1
    assert detail["unmatched"]["feasible"] == 0


def test_a_job_is_never_run_as_another_platform(market: dict[str, Any]) -> None:
    """A cuda offer's job handed to this CPU machine goes back to the market, unrun."""
    provider: ProviderClient = market["provider"]
    gone = provider.http.json("DELETE", f"/v1/offers/{market['offer']['id']}")
    assert gone["status"] == "withdrawn"
    provider.http.json(
        "POST",
        "/v1/offers",
        json=offer_body(accelerator="h100-sxm", count=1, price_per_hour="0.01"),
    )
    client: Client = market["developer"]
    job = client.submit(lambda x: x * 2, jnp.ones(3), platforms=("cpu", "cuda"), **PRICE)
    clear(market["engine"])
    (order,) = provider.work()
    assert order["platform"] == "cuda"
    assert run_allocation(provider, order) == "requeued"
    back = job.refresh().data
    assert back["state"] == "open"
    assert "the offer is cuda but this machine runs jobs on cpu" in back["error"]
