"""Local training: the one client-side primitive every algorithm composes.

A client runs `num_epochs` epochs of minibatch training over its own real examples with an optax
optimiser. Under `vmap` all clients must run the same program, so the loop has a fixed trip count
(`num_epochs * ceil(N / batch_size)` for the padded length N) and each step carries an `active`
flag: a step beyond the client's own `ceil(n_i / batch_size)` batches, or in an epoch beyond its
`active_epochs` (a straggler), leaves parameters and optimiser state unchanged. Each epoch draws a
fresh permutation of the client's real examples inside jit (McMahan et al. shuffle every epoch;
FedGen#7 and FedProx's reseeded batcher are the pitfalls avoided). The permutation and every
step's key depend only on the client's key, the example's position and (epoch, batch), never on
the padded length, so a padded client trains exactly as the same client unpadded.

Algorithms add their terms through the loss closure: FedProx adds `mu/2 ||w - w_t||^2`, Ditto
its personal proximal term, and so on.

Each step's key goes to the loss (`model_loss` gives it to the model's dropout). A loss that
returns the model's updated mutable collections (`losses.LossWithState`: BatchNorm running
statistics, which live inside the parameters pytree) has them written back into the parameters
after the step; they are statistics, not parameters, so their gradient is zeroed before the
optimiser sees it (a regulariser's pull on them, weight decay or a global-norm clip never
involves them) and the optimiser's update of them is replaced by the new values.
"""

import contextlib
import contextvars
import math
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.core.losses import split_loss
from fedjax_lab.core.types import ClientStream

PyTree = Any
# loss_fn(params, x_batch, y_batch, mask_batch, rng) -> scalar mean loss over the real examples
# (or a `LossWithState` carrying the model's updated statistics).
LossFn = Callable[[PyTree, jax.Array, jax.Array, jax.Array, jax.Array], Any]


_RUNNING_ALONE = contextvars.ContextVar("running_alone", default=False)


@contextlib.contextmanager
def client_alone():
    """Marks the client program traced inside as run alone (not under `vmap`), so that local
    training skips inactive steps with a `lax.cond` rather than computing and discarding them
    (under `vmap` a cond would become a select of both branches)."""
    token = _RUNNING_ALONE.set(True)
    try:
        yield
    finally:
        _RUNNING_ALONE.reset(token)


def running_alone() -> bool:
    """Whether the client program being traced runs alone (`client_alone`)."""
    return _RUNNING_ALONE.get()


class LocalTrainingResult(NamedTuple):
    """What one client's local training returns.

    Attributes:
        params: the parameters after the client's active steps.
        mean_loss: mean minibatch loss over the active steps, evaluated before each step (0 when
            the client took no step).
        num_steps: the number of active steps taken (int32).
    """

    params: PyTree
    mean_loss: jax.Array
    num_steps: jax.Array


def steps_per_epoch(padded_length: int, batch_size: int) -> int:
    """Trip count of one epoch for clients padded to `padded_length` examples."""
    return max(1, math.ceil(padded_length / batch_size))


def epoch_permutation(key: jax.Array, mask: jax.Array) -> jax.Array:
    """Indices of the real examples (mask True) in random order, followed by the padded ones.

    Each position draws its own bits from `fold_in(key, position)`, so the order of the real
    examples does not depend on how much padding follows them: the order is that of the keys
    (is padding, bits, position).
    """
    positions = jnp.arange(mask.shape[0], dtype=jnp.int32)
    bits = jax.vmap(lambda i: jax.random.bits(jax.random.fold_in(key, i)))(positions)
    is_padding = jnp.logical_not(mask)
    if mask.shape[0] > _PACKED_SORT_MAX_LENGTH or bits.dtype != jnp.uint32:  # uint64 under x64
        *_, order = jax.lax.sort((is_padding.astype(jnp.int32), bits, positions), num_keys=2)
        return order
    return _packed_sort_order(is_padding, bits)


# XLA:CPU sorts one array of uint32 about 7x faster than several arrays with a comparator over
# them (2,000 rows of 100: 3.1 ms against 22 ms), so up to this length the order of
# (is padding, bits, position) comes from two sorts of packed uint32 keys (7.3 ms for both).
_PACKED_SORT_MAX_LENGTH = 2**15


def _packed_sort_order(is_padding: jax.Array, bits: jax.Array) -> jax.Array:
    """The order of the keys (is_padding, bits, position) by two sorts of single uint32 arrays,
    least significant digit first (radix-style), each key packed with a position of `width`
    bits: first by (the low 32 - width bits of `bits`, position), then stably by (is_padding,
    the high width bits of `bits`), its position in the first order breaking ties."""
    length = bits.shape[0]
    width = max(1, (length - 1).bit_length())
    low_width = 32 - width
    position_mask = jnp.uint32((1 << width) - 1)
    positions = jnp.arange(length, dtype=jnp.uint32)
    low_bits = bits & jnp.uint32((1 << low_width) - 1)
    by_low_bits = jax.lax.sort((low_bits << width) | positions) & position_mask
    high_bits = (bits >> low_width)[by_low_bits]
    padding = is_padding.astype(jnp.uint32)[by_low_bits]
    by_high_bits = jax.lax.sort((padding << (2 * width)) | (high_bits << width) | positions)
    return by_low_bits[by_high_bits & position_mask].astype(jnp.int32)


class BatchSchedule(NamedTuple):
    """Which examples one client's step uses: the schedule `local_train` follows.

    Attributes:
        num_steps: the fixed trip count, `num_epochs * steps_per_epoch` (static).
        batch_size: examples per step (static).
        at: `at(step_index) -> (indices [B], batch_mask [B], batch_key, active)`.
    """

    num_steps: int
    batch_size: int
    at: Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array, jax.Array]]


def batch_schedule(mask: jax.Array, rng: jax.Array, *, num_epochs: int,
                   batch_size: int | None,
                   active_epochs: jax.Array | None = None) -> BatchSchedule:
    """The minibatches of one client (arguments as in `local_train`)."""
    padded_length = mask.shape[0]
    batch_size = padded_length if batch_size is None else batch_size
    num_batches = steps_per_epoch(padded_length, batch_size)
    num_real = jnp.sum(mask, dtype=jnp.int32)
    client_batches = (num_real + batch_size - 1) // batch_size
    if active_epochs is None:
        active_epochs = num_epochs
    shuffle_key = jax.random.fold_in(rng, ClientStream.SHUFFLE)
    step_key = jax.random.fold_in(rng, ClientStream.STEP)
    permutations = jax.vmap(lambda e: epoch_permutation(jax.random.fold_in(shuffle_key, e), mask))(
        jnp.arange(num_epochs))
    slack = num_batches * batch_size - padded_length
    permutations = jnp.pad(permutations, ((0, 0), (0, slack)))
    slot_is_real = jnp.arange(num_batches * batch_size) < num_real

    def at(step_index):
        epoch, batch = jnp.divmod(step_index, num_batches)
        start = batch * batch_size
        indices = jax.lax.dynamic_slice_in_dim(permutations[epoch], start, batch_size)
        batch_mask = jax.lax.dynamic_slice_in_dim(slot_is_real, start, batch_size)
        batch_key = jax.random.fold_in(jax.random.fold_in(step_key, epoch), batch)
        active = (epoch < active_epochs) & (batch < client_batches)
        return indices, batch_mask, batch_key, active

    return BatchSchedule(num_epochs * num_batches, batch_size, at)


def local_train(loss_fn: LossFn, optimizer: optax.GradientTransformation, params: PyTree,
                x: jax.Array, y: jax.Array, mask: jax.Array, rng: jax.Array, *,
                num_epochs: int, batch_size: int | None,
                active_epochs: jax.Array | None = None, unroll: int = 1) -> LocalTrainingResult:
    """Trains one client's copy of `params` on its examples (unbatched; `vmap` it over clients).

    Args:
        loss_fn: `loss_fn(params, x_batch, y_batch, mask_batch, rng)`; the mean over real examples
            of the batch, plus whatever term the algorithm adds (a `LossWithState` for models
            with statistics, written back after each step). `rng` is the step's own key.
        optimizer: the client optimiser; its state starts fresh from `optimizer.init(params)`.
        params: starting parameters (usually the round's global model).
        x: `[N, *feature_shape]` the client's examples, padded to N.
        y: `[N]` labels.
        mask: `[N]` bool, True for real examples.
        rng: the client's round key (`client_key`).
        num_epochs: epochs every full-work client runs (static).
        batch_size: examples per step (static); None means the full batch (one step per epoch).
        active_epochs: optional traced int, epochs this client actually runs (stragglers run fewer).
        unroll: `lax.scan` unroll factor of the step loop.

    Returns:
        A `LocalTrainingResult`.
    """
    x, y, mask = jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask)
    schedule = batch_schedule(mask, rng, num_epochs=num_epochs, batch_size=batch_size,
                              active_epochs=active_epochs)
    batch_size = schedule.batch_size

    def loss_and_state(*args):
        return split_loss(loss_fn(*args))

    def train_step(carry, indices, batch_mask, batch_key):
        params, opt_state, loss_sum = carry
        (loss, state), grads = jax.value_and_grad(loss_and_state, has_aux=True)(
            params, x[indices], y[indices], batch_mask, batch_key)
        grads = replace_subtrees(grads, jax.tree.map(jnp.zeros_like, state))
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = replace_subtrees(optax.apply_updates(params, updates), state)
        return params, opt_state, loss_sum + loss.astype(loss_sum.dtype)

    skip_inactive = running_alone()

    def step(carry, step_index):
        indices, batch_mask, batch_key, active = schedule.at(step_index)
        if skip_inactive:
            # A client run alone (sequential or unrolled) skips its inactive steps outright.
            carry = jax.lax.cond(active, train_step, lambda carry, *_: carry, carry, indices,
                                 batch_mask, batch_key)
        else:
            # Batched clients compute every step and keep the old values where inactive.
            new_carry = train_step(carry, indices, batch_mask, batch_key)
            carry = jax.tree.map(lambda new, old: jnp.where(active, new, old), new_carry, carry)
        return carry, active

    loss_dtype = jax.eval_shape(lambda *args: loss_and_state(*args)[0], params, x[:batch_size],
                                y[:batch_size], mask[:batch_size], rng).dtype
    init = (params, optimizer.init(params), jnp.zeros((), loss_dtype))
    (params, _, loss_sum), active_steps = jax.lax.scan(
        step, init, jnp.arange(schedule.num_steps), unroll=unroll)
    num_steps = jnp.sum(active_steps, dtype=jnp.int32)
    mean_loss = loss_sum / jnp.maximum(num_steps, 1).astype(loss_sum.dtype)
    return LocalTrainingResult(params=params, mean_loss=mean_loss, num_steps=num_steps)


def replace_subtrees(tree: PyTree, replacements: PyTree) -> PyTree:
    """`tree` with the subtrees that the nested dict `replacements` names replaced by its values
    (cast to the replaced leaves' dtypes, so a scan carry keeps its type)."""
    if isinstance(replacements, Mapping):
        if not replacements:
            return tree
        return {**tree, **{key: replace_subtrees(tree[key], value)
                           for key, value in replacements.items()}}
    return jax.tree.map(lambda old, new: jnp.asarray(new, old.dtype), tree, replacements)
