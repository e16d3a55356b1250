"""Masked losses: padded examples contribute exactly nothing.

Labels are one class per example (`[B]`) or, for next-token prediction, one target per position
of a sequence (`[B, T]`, logits `[B, T, V]`). A sequence target equal to `IGNORE_LABEL` (padding;
for next-word data also the beginning, end and out-of-vocabulary tokens, as fedjax and Reddi et
al. report) counts neither in the loss nor in accuracy, and a padded example's targets never do.
The loss of a batch of sequences is the mean over its counted tokens, as fedjax's and TFF's
sequence losses are.

`model_loss` runs the model in training mode (dropout from the step's key, batch statistics over
the batch's real examples). A model with mutable collections (BatchNorm statistics) also returns
their new values: its loss is then a `LossWithState`, which behaves as the scalar loss under
the arithmetic algorithms use to add their terms (`base_loss(...) + prox(...)`) and carries the
statistics to `local_train`, which writes them back after the step (`split_loss`).
"""

import dataclasses
import inspect
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any
# A sequence target that counts in no loss or metric (PyTorch's ignore_index, fedjax's masked
# target values).
IGNORE_LABEL = -1


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of `values` over entries where `mask` is True (0 when none is)."""
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1)


def label_weights(labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Which labels count, shaped like `labels`: the example is real (`mask [..., N]`) and,
    for sequence targets (`labels` with more axes than `mask`), the target is not ignored."""
    extra = labels.ndim - mask.ndim
    if extra == 0:
        return mask
    return mask.reshape(mask.shape + (1,) * extra) & (labels != IGNORE_LABEL)


def cross_entropies(logits: jax.Array, labels: jax.Array, mask: jax.Array):
    """(per-label cross-entropy, per-label weight), both shaped like `labels`; an ignored
    target's cross-entropy is that of class 0 times weight 0, so no index is out of range."""
    weights = label_weights(labels, mask)
    safe_labels = jnp.where(weights, labels, 0)
    return optax.softmax_cross_entropy_with_integer_labels(logits, safe_labels), weights


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy over the real examples (over the counted tokens of sequence
    targets)."""
    return masked_mean(*cross_entropies(logits, labels, mask))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LossWithState:
    """A scalar training loss and the model's updated mutable collections (`Model.apply`'s
    state, shaped like part of the parameters).

    Adding, subtracting, multiplying or dividing by a number or array acts on `value` and keeps
    `state`, so a regulariser added to a model loss keeps its statistics. Two of them do not
    combine: which statistics would win is ambiguous.
    """

    value: jax.Array
    state: PyTree

    def _combine(self, other, operation):
        if isinstance(other, LossWithState):
            raise TypeError("two losses that both carry model state cannot be combined; compute "
                            "the second one in inference mode or from a scalar loss")
        return LossWithState(operation(self.value, other), self.state)

    def __add__(self, other):
        return self._combine(other, lambda a, b: a + b)

    def __radd__(self, other):
        return self._combine(other, lambda a, b: b + a)

    def __sub__(self, other):
        return self._combine(other, lambda a, b: a - b)

    def __rsub__(self, other):
        return self._combine(other, lambda a, b: b - a)

    def __mul__(self, other):
        return self._combine(other, lambda a, b: a * b)

    def __rmul__(self, other):
        return self._combine(other, lambda a, b: b * a)

    def __truediv__(self, other):
        return self._combine(other, lambda a, b: a / b)

    def __neg__(self):
        return LossWithState(-self.value, self.state)


def split_loss(loss) -> tuple[jax.Array, PyTree]:
    """`(scalar loss, updated model state)` of a loss function's output (`{}` for a scalar)."""
    if isinstance(loss, LossWithState):
        return loss.value, loss.state
    return loss, {}


def _takes_training_options(apply_fn) -> bool:
    try:
        parameters = inspect.signature(apply_fn).parameters
    except (TypeError, ValueError):
        return False
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return True
    return {"train", "rng", "mask", "return_state"} <= set(parameters)


def model_loss(apply_fn: Callable[..., Any]):
    """The supervised loss `loss(params, x, y, mask, rng)` of a model, for `local_train`.

    `apply_fn` is a `Model.apply`, run in training mode: dropout draws from `rng` (the step's
    key) and batch statistics are taken over the real examples (`mask`). The loss is the mean
    cross-entropy over the real examples, a `LossWithState` when the model's statistics moved.
    Any other `apply_fn(params, x) -> logits` (a function without the training keywords) is
    called as it is and `rng` is unused.
    """
    if not _takes_training_options(apply_fn):
        def loss(params, x, y, mask, rng):
            del rng
            return cross_entropy(apply_fn(params, x), y, mask)

        return loss

    def loss(params, x, y, mask, rng):
        logits, state = apply_fn(params, x, train=True, rng=rng, mask=mask, return_state=True)
        value = cross_entropy(logits, y, mask)
        return LossWithState(value, state) if state else value

    return loss


class ProximalTerm(NamedTuple):
    """FedProx's `(mu / 2) ||w - w_t||^2`, whose gradient in w is `mu (w - w_t)`.

    A named term (not a bare closure) so the factored dense update can recognise it.
    """

    mu: float

    def __call__(self, params: PyTree, global_params: PyTree) -> jax.Array:
        return 0.5 * self.mu * optax.tree.norm(optax.tree.sub(params, global_params),
                                               squared=True)
