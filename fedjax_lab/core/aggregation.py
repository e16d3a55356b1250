"""Aggregation of stacked client results on the server.

Weights come from the clients' example counts (McMahan et al.'s p_i = n_i / sum_j n_j) or are
uniform; the choice is explicit because papers differ (FedProx's code weights by samples, its
Algorithm 2 averages uniformly). A client that holds no examples or does not participate (a
dropped straggler, a padded slot) has weight exactly 0.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any
WEIGHTINGS = ("num_examples", "uniform")


def check_weighting(weighting: str) -> None:
    """Refuses a `weighting` that is not one of WEIGHTINGS (at build time, before any round)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting {weighting!r} is unknown; allowed: {', '.join(WEIGHTINGS)}")


def client_weights(num_examples: jax.Array, *, weighting: str = "num_examples",
                   participating: jax.Array | None = None) -> jax.Array:
    """Aggregation weights `[C]`: non-negative, summing to 1, or all 0 if no client takes part.

    Args:
        num_examples: `[C]` real examples per client.
        weighting: "num_examples" (sample-weighted) or "uniform".
        participating: optional `[C]` bool; clients marked False get weight 0.
    """
    check_weighting(weighting)
    counts = jnp.asarray(num_examples)
    present = counts > 0
    if participating is not None:
        present = present & participating
    dtype = jnp.result_type(float)
    raw = counts.astype(dtype) if weighting == "num_examples" else jnp.ones(counts.shape, dtype)
    raw = jnp.where(present, raw, 0)
    total = jnp.sum(raw)
    return jnp.where(total > 0, raw / jnp.where(total > 0, total, 1), 0)


def weighted_mean(stacked: PyTree, weights: jax.Array) -> PyTree:
    """sum_i weights[i] * leaf[i] for every leaf `[C, ...]` of `stacked`."""
    return jax.tree.map(
        lambda leaf: jnp.tensordot(weights.astype(leaf.dtype), leaf, axes=1), stacked)


def server_update(params: PyTree, opt_state: PyTree, mean_delta: PyTree,
                  optimizer) -> tuple[PyTree, PyTree]:
    """One server optimiser step on the pseudo-gradient `mean_delta = sum_i p_i (w - w_i)`.

    Plain FedAvg is `optax.sgd(1.0)`, FedAvgM `optax.sgd(lr, momentum=beta)`; FedAdagrad, FedAdam
    and FedYogi (Reddi et al., ICLR 2021, arXiv 2003.00295) are
    `fedjax_lab.core.server_optimizers.adaptive_server_optimizer`.
    """
    updates, opt_state = optimizer.update(mean_delta, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
