"""A developer's session with the broker: submit JAX work, wait, read the result,
cap a job's cost with a budget, cancel a job, and read the invoice.

    BROKER_URL=http://127.0.0.1:8000 BROKER_API_KEY=bk_... python examples/developer.py

The key is a developer's (`broker accounts create NAME --role developer`, or a
demo developer's key that `make run` prints). Some provider must be offering
capacity: `make run` starts a demo market, or run examples/provider.py.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from broker.sdk import Client, JobFailed


def predict(params: dict[str, jax.Array], batch: jax.Array) -> jax.Array:
    return jnp.tanh(batch @ params["w"] + params["b"])


def train_step(
    state: tuple[jax.Array, jax.Array], x: jax.Array, y: jax.Array
) -> tuple[jax.Array, jax.Array]:
    w, step = state
    grad = jax.grad(lambda w: jnp.mean((jnp.tanh(x @ w) - y) ** 2))(w)
    return w - 0.1 * grad, step + 1


def main() -> int:
    url = os.environ.get("BROKER_URL", "http://127.0.0.1:8000")
    key = os.environ["BROKER_API_KEY"]
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32), "b": jnp.zeros(4)}
    batch = jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)

    with Client(url, key) as client:
        # 1. Submit, wait, result: the same arrays predict(params, batch) returns here.
        job = client.submit(predict, params, batch, max_price_per_hour=3.0, name="example-predict")
        print(f"submitted {job.id}")
        job.wait(timeout=300)
        np.testing.assert_allclose(job.result(), predict(params, batch), rtol=1e-5, atol=1e-6)
        print(
            f"{job.id} succeeded on an offer at ${job.data['price_per_hour']}/h; "
            f"cost ${job.data['cost_usd']}"
        )

        # 2. An iterative job with checkpoints, and a budget it may not exceed.
        x = jnp.asarray(rng.normal(size=(64, 8)), jnp.float32)
        y = jnp.asarray(rng.normal(size=(64, 4)), jnp.float32)
        state = (jnp.zeros((8, 4)), jnp.int32(0))
        training = client.submit(
            train_step, state, x, y, steps=500, checkpoint_every=100,
            max_price_per_hour=3.0, budget_usd=1, name="example-train",
        )  # fmt: skip
        try:
            _, steps = training.wait(timeout=300).result()
            budget = training.data["budget_usd"]
            print(f"{training.id} trained {int(steps)} steps, within its ${budget} budget")
        except JobFailed as failed:  # stopped at its budget, say
            print(f"{training.id} failed: {failed}")

        # 3. Cancel: a bid no provider will take (a tenth of a cent an hour) stays open.
        cheap = client.submit(
            predict, params, batch, max_price_per_hour=0.001, name="example-cancel"
        )
        print(f"{cheap.id} is {cheap.cancel().state}")

        # 4. The invoice for what ran: a line per run, the fee, the total.
        for invoice in client.generate_invoice():
            detail = client.invoice(invoice["id"])
            print(
                f"invoice {detail['id']} ({detail['status']}): {len(detail['lines'])} line(s), "
                f"fee ${detail['fee']}, total ${detail['total']}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
