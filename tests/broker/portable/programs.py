"""Small JAX programs the portability tests package and run."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def mlp(params: list[tuple[Any, Any]], x: Any) -> dict[str, Any]:
    for w, b in params:
        x = jnp.tanh(x @ w + b)
    return {"sum": x.sum(), "out": x}


def mlp_args(dtype: Any = jnp.float32, batch: int = 8) -> tuple[Any, Any]:
    rng = np.random.default_rng(0)
    params = [
        (jnp.asarray(rng.normal(size=(16, 16)) * 0.3, dtype), jnp.zeros(16, dtype))
        for _ in range(2)
    ]
    return params, jnp.asarray(rng.normal(size=(batch, 16)), dtype)


def sgd_step(state: tuple[Any, Any], x: Any, y: Any) -> tuple[Any, Any]:
    w, step = state
    grad = jax.grad(lambda w: jnp.mean((jnp.tanh(x @ w) - y) ** 2))(w)
    return w - 0.3 * grad, step + 1


def sgd_args() -> tuple[tuple[Any, Any], Any, Any]:
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(32, 4)), jnp.float32)
    return (w, jnp.int32(0)), x, y


def plain_steps(n: int) -> tuple[Any, Any]:
    state, x, y = sgd_args()
    step = jax.jit(sgd_step)
    for _ in range(n):
        state = step(state, x, y)
    return state
