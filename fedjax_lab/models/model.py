"""The `(init, apply)` pair algorithms see: parameters in, logits out, no framework objects.

Training and inference are one `apply` with a flag, as in flax: `apply(params, x)` is inference
(dropout off, BatchNorm on its running statistics), which is what every `predict` calls;
`apply(params, x, train=True, rng=key, mask=mask)` is a training forward pass (dropout drawn from
`key`, BatchNorm on the statistics of the real examples of the batch). Models with mutable
variable collections (BatchNorm's "batch_stats") keep them inside their parameters pytree, as
`{"params": trainable, "batch_stats": statistics}`, so that everything an algorithm does to
parameters (broadcast, delta, weighted mean, checkpoint) carries the statistics too: FedAvg
averages them like the weights. Training asks `apply(..., return_state=True)` for the updated
collections; `fedjax_lab.core.losses.model_loss` hands them to `local_train`, which writes them
back after each step and keeps the optimiser off them.
"""

import inspect
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import numpy as np

from fedjax_lab.compiled import per_structure

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
        apply: `apply(params, x [B, *feature_shape], *, train=False, rng=None, mask=None,
            return_state=False) -> logits [B, num_classes]`. `apply(params, x)` is inference.
            `train=True` is a training pass: dropout draws from `rng`, batch statistics are
            taken over the examples where `mask [B]` is True (all when None). With
            `return_state=True` it returns `(logits, state)`, `state` the updated mutable
            collections shaped like the matching part of `params` (`{}` when none changed).
        feature_shape: the shape of one example.
        num_classes: the number of output logits.
        dense_split: for models built around one large dense layer, how to split them there.
        mutable: the variable collections training updates, e.g. `("batch_stats",)`. When
            non-empty, `params` is the whole variables dict `{"params": ..., "batch_stats": ...}`
            (the statistics travel, and are averaged, with the weights); otherwise it is the
            trainable parameters alone.
        has_train_mode: `apply(train=True)` computes something else than inference (dropout,
            batch statistics). Exact shortcuts that assume one deterministic function, such as
            the factored dense update, refuse such models.
    """

    init: Callable[[jax.Array], PyTree]
    apply: Callable[..., Any]
    feature_shape: tuple[int, ...]
    num_classes: int
    dense_split: DenseSplit | None = None
    mutable: tuple[str, ...] = ()
    has_train_mode: bool = False

    @property
    def has_state(self) -> bool:
        """Whether the parameters hold mutable collections (BatchNorm statistics)."""
        return bool(self.mutable)


def _takes(function, name: str) -> bool:
    parameters = inspect.signature(function).parameters
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD
                                     for p in parameters.values())


def from_flax(module: nn.Module, feature_shape: tuple[int, ...], num_classes: int, *,
              dense_layer: str | None = None, has_train_mode: bool | None = None) -> Model:
    """Wraps a flax module once, at the edge, so algorithms only see pytrees and pure functions.

    Equal arguments (flax modules compare by their fields) give the same `Model` object, so that
    `mlp(...)` called afresh for every seed builds algorithms whose programs compile once
    (`fedjax_lab.compiled`).

    The module's `__call__(x, ...)` may take `train` (the training flag; dropout layers draw
    from the "dropout" stream) and `mask` (the real examples, for batch statistics); each is
    passed only if the module takes it. Variable collections other than "params" (found by
    tracing `init` abstractly) make the model stateful (`Model.mutable`).

    Args:
        module: the flax module.
        feature_shape: the shape of one example.
        num_classes: the module's output width.
        dense_layer: names a large dense submodule of a module that also defines `features(x)`
            (its input) and `head(z)` (from its output on), giving the model a `DenseSplit`.
        has_train_mode: whether training differs from inference; by default, whether the
            module takes `train` or has mutable collections. A module whose `train` flag only
            matters for some of its settings (dropout rate 0) says so here.
    """
    return _wrapped_flax(module, tuple(feature_shape), num_classes, dense_layer, has_train_mode)


@per_structure
def _wrapped_flax(module: nn.Module, feature_shape: tuple[int, ...], num_classes: int,
                  dense_layer: str | None, has_train_mode: bool | None) -> Model:
    # numpy, not jnp: a model made while a program is traced must not keep a tracer.
    example = np.zeros((1,) + feature_shape, np.float32)
    shapes = jax.eval_shape(module.init, jax.random.key(0), example)
    mutable = tuple(name for name in shapes if name != "params")
    takes_train, takes_mask = _takes(module.__call__, "train"), _takes(module.__call__, "mask")
    if has_train_mode is None:
        has_train_mode = takes_train
    has_train_mode = bool(has_train_mode or mutable)

    def variables(params):
        return params if mutable else {"params": params}

    # One compiled program per model, whichever algorithm calls it: eager, its dozens of small
    # operations are traced and lowered again in every process; compiled inside each algorithm's
    # init, they would fuse differently per algorithm (Ditto would not start where FedAvg does).
    initial_variables = jax.jit(module.init)

    def init(key):
        initial = initial_variables(key, example)
        return dict(initial) if mutable else initial["params"]

    def apply(params, x, *, train=False, rng=None, mask=None, return_state=False):
        options = {}
        if takes_train:
            options["train"] = train
        if takes_mask and mask is not None:
            options["mask"] = mask
        rngs = {"dropout": rng} if train and rng is not None else None
        if train and mutable:
            logits, state = module.apply(variables(params), x, rngs=rngs, mutable=list(mutable),
                                         **options)
            state = dict(state)
        else:
            logits, state = module.apply(variables(params), x, rngs=rngs, **options), {}
        return (logits, state) if return_state else logits

    split = None
    if dense_layer is not None:
        split = DenseSplit(
            dense_layer,
            features=lambda params, x: module.apply(variables(params), x, method="features"),
            head=lambda params, z: module.apply(variables(params), z, method="head"))
    return Model(init=init, apply=apply, feature_shape=feature_shape, num_classes=num_classes,
                 dense_split=split, mutable=mutable, has_train_mode=has_train_mode)
