"""Masked losses: padded examples contribute exactly nothing."""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

PyTree = Any


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of `values` over entries where `mask` is True (0 when none is)."""
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1)


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy over the real examples."""
    return masked_mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels), mask)


def model_loss(apply_fn: Callable[[PyTree, jax.Array], jax.Array]):
    """The supervised loss `loss(params, x, y, mask, rng)` of a model, for `local_train`."""

    def loss(params, x, y, mask, rng):
        del rng
        return cross_entropy(apply_fn(params, x), y, mask)

    return loss
