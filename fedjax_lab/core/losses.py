"""Masked losses: padded examples contribute exactly nothing."""

from typing import Any, Callable, NamedTuple

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


class ProximalTerm(NamedTuple):
    """FedProx's `(mu / 2) ||w - w_t||^2`, whose gradient in w is `mu (w - w_t)`.

    A named term (not a bare closure) so the factored dense update can recognise it.
    """

    mu: float

    def __call__(self, params: PyTree, global_params: PyTree) -> jax.Array:
        return 0.5 * self.mu * optax.tree.norm(optax.tree.sub(params, global_params),
                                               squared=True)
