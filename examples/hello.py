"""The smallest job: a JAX function the developer CLI packages, uploads and bids for.

    export BROKER_URL=http://127.0.0.1:8000 BROKER_API_KEY=bk_...   # a developer's key
    broker jobs submit examples/hello.py:predict \\
        --args '[[[0.5, -1.0], [1.0, 0.25]], [[1.0, 2.0], [3.0, 4.0]]]' \\
        --max-price 2.50 --wait

``predict(w, x)`` gets ``w`` and ``x`` as float32 arrays from ``--args`` and runs on
whichever backend the market picks; ``--wait`` prints its result.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def predict(w: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.tanh(x @ w)
