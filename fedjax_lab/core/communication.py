"""Communication accounting: bytes sent up (clients to server) and down per round.

Every algorithm reports `bytes_up` and `bytes_down` in its round metrics, totalled over the
clients that take part, so communication is comparable across the library. Counts are floats:
a round of a thousand clients of a 6.5M-parameter model already overflows int32.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def tree_bytes(tree: PyTree) -> int:
    """Bytes of a pytree of arrays (or shape-dtype structs) as sent uncompressed."""
    return sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize
               for leaf in jax.tree.leaves(tree))


def sign_bytes(tree: PyTree) -> float:
    """Bytes of one sign bit per coordinate of a pytree."""
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree)) / 8


def participants_bytes(clients: jax.Array, per_client: float | jax.Array) -> jax.Array:
    """Bytes sent to or by the cohort's clients whose entry in `clients` (aggregation weights, or
    a mask of real clients) is positive, `per_client` bytes each.

    Both factors are floats before the product: the participants' int32 count times a model's
    bytes wraps to a negative number past 2 GiB (49 clients of an 11M-parameter model), and JAX
    refuses a Python int past int32 as an operand even of a float product."""
    dtype = jnp.result_type(float)
    return jnp.sum(clients > 0).astype(dtype) * jnp.asarray(per_client, dtype)


def model_exchange_bytes(weights: jax.Array, model_tree: PyTree) -> dict[str, jax.Array]:
    """`bytes_down`/`bytes_up` of a round that sends `model_tree` to every cohort client and
    receives one of the same size from each client that takes part (positive weight)."""
    size = tree_bytes(model_tree)
    return {"bytes_down": jnp.asarray(weights.shape[0] * size, jnp.result_type(float)),
            "bytes_up": participants_bytes(weights, size)}
