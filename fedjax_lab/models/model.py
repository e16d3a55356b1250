"""The `(init, apply)` pair algorithms see: parameters in, logits out, no framework objects."""

from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

PyTree = Any


class Model(NamedTuple):
    """A model as two pure functions.

    Attributes:
        init: `init(key) -> params`.
        apply: `apply(params, x [B, *feature_shape]) -> logits [B, num_classes]`.
        feature_shape: the shape of one example.
        num_classes: the number of output logits.
    """

    init: Callable[[jax.Array], PyTree]
    apply: Callable[[PyTree, jax.Array], jax.Array]
    feature_shape: tuple[int, ...]
    num_classes: int


def from_flax(module: nn.Module, feature_shape: tuple[int, ...], num_classes: int) -> Model:
    """Wraps a flax module once, at the edge, so algorithms only see pytrees and pure functions."""
    feature_shape = tuple(feature_shape)

    def init(key):
        return module.init(key, jnp.zeros((1,) + feature_shape, jnp.float32))["params"]

    def apply(params, x):
        return module.apply({"params": params}, x)

    return Model(init=init, apply=apply, feature_shape=feature_shape, num_classes=num_classes)
