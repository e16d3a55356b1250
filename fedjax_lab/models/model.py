"""The `(init, apply)` pair algorithms see: parameters in, logits out, no framework objects."""

from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

PyTree = Any


class DenseSplit(NamedTuple):
    """A model seen as `head(dense(features(x)))` around one large dense layer.

    The factored local update (`fedjax_lab.core.factored`) keeps that layer's per-client change
    as low-rank factors instead of a per-client weight matrix.

    Attributes:
        layer: the key of the dense layer's `{"kernel", "bias"}` in the top-level params.
        features: `features(params, x [B, ...]) -> h [B, d_in]`, the layer's input.
        head: `head(params, z [B, d_out]) -> logits`, from the layer's output on.
    """

    layer: str
    features: Callable[[PyTree, jax.Array], jax.Array]
    head: Callable[[PyTree, jax.Array], jax.Array]


class Model(NamedTuple):
    """A model as two pure functions.

    Attributes:
        init: `init(key) -> params`.
        apply: `apply(params, x [B, *feature_shape]) -> logits [B, num_classes]`.
        feature_shape: the shape of one example.
        num_classes: the number of output logits.
        dense_split: for models built around one large dense layer, how to split them there.
    """

    init: Callable[[jax.Array], PyTree]
    apply: Callable[[PyTree, jax.Array], jax.Array]
    feature_shape: tuple[int, ...]
    num_classes: int
    dense_split: DenseSplit | None = None


def from_flax(module: nn.Module, feature_shape: tuple[int, ...], num_classes: int, *,
              dense_layer: str | None = None) -> Model:
    """Wraps a flax module once, at the edge, so algorithms only see pytrees and pure functions.

    `dense_layer` names a large dense submodule of a module that also defines `features(x)` (its
    input) and `head(z)` (from its output on), giving the model a `DenseSplit`.
    """
    feature_shape = tuple(feature_shape)

    def init(key):
        return module.init(key, jnp.zeros((1,) + feature_shape, jnp.float32))["params"]

    def apply(params, x):
        return module.apply({"params": params}, x)

    split = None
    if dense_layer is not None:
        split = DenseSplit(
            dense_layer,
            features=lambda params, x: module.apply({"params": params}, x, method="features"),
            head=lambda params, z: module.apply({"params": params}, z, method="head"))
    return Model(init=init, apply=apply, feature_shape=feature_shape, num_classes=num_classes,
                 dense_split=split)
