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


def model_exchange_bytes(weights: jax.Array, model_tree: PyTree) -> dict[str, jax.Array]:
    """`bytes_down`/`bytes_up` of a round that sends `model_tree` to every cohort client and
    receives one of the same size from each client that takes part (positive weight)."""
    dtype = jnp.result_type(float)
    size = tree_bytes(model_tree)
    return {"bytes_down": jnp.asarray(weights.shape[0] * size, dtype),
            "bytes_up": (jnp.sum(weights > 0) * size).astype(dtype)}
