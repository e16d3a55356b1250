"""Local SGD with the large dense layer's per-client change kept as low-rank factors.

For a model `head(h W + b)` with `h = features(x)` (a `DenseSplit`), one plain SGD step changes
the dense kernel by `-lr h^T dz`, where `dz` is the loss gradient at the layer's output. After s
steps a client's kernel is therefore `W_0 - lr sum_t h_t^T dz_t = W_0 + U^T V`, with U the stacked
`h_t` (K = s * B rows) and V the stacked `-lr dz_t`. Since W_0 is the global model, shared by the
whole cohort, the forward pass is one large product `H W_0` for all clients' batches plus a
per-client correction `(h U^T) V`; `dz` is the gradient with respect to a zero probe added to the
layer's output, so no per-client kernel or kernel gradient is ever formed; and the server's mean
update is one product `-U_all^T (p * V_all)`. On XLA:CPU the per-client kernel products are
memory-bound (the FEMNIST CNN's 3136x2048 kernel is 25.7 MB per client) while the shared product
runs near the GEMM ceiling (shared/XLA_CPU.md). For conv nets the cohort's feature extractors run
through `ClientExecution` ("auto" unrolls them on CPU).

Where it is exact (same mathematics as `local_train`; float64 tests agree to rounding):
- the client optimiser is plain SGD (`sgd` below: no momentum, no weight decay, a constant
  learning rate) and the loss is the model's masked cross-entropy;
- optionally a proximal term `mu/2 ||w - w_t||^2` (FedProx), whose kernel part only scales the
  accumulated change by `1 - lr mu` each step, so the factors stay exact;
- the server aggregates with the weighted mean (no robust aggregator, no attack).
Anything else (momentum or Adam clients, other local terms, robust aggregation, models with
dropout or BatchNorm: `Model.has_train_mode`) falls back to the per-client `local_train`;
`fedavg(..., dense_update=...)` says which path ran and why.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.core.client_execution import ClientExecution
from fedjax_lab.core.local_training import batch_schedule
from fedjax_lab.core.losses import ProximalTerm, cross_entropy
from fedjax_lab.core.validation import check_number, is_traced, is_zero

PyTree = Any


class PlainSGD(NamedTuple):
    """`optax.sgd(learning_rate)` that also declares its learning rate (see `sgd`)."""

    init: Any
    update: Any
    learning_rate: float


def sgd(learning_rate: float) -> PlainSGD:
    """Plain SGD, exactly `optax.sgd(learning_rate)`, usable wherever an optax optimiser is.

    Declaring the learning rate (a number, or a traced scalar in a sweep) lets FedAvg and FedProx
    use the factored dense update for models with a `DenseSplit`.
    """
    check_number("learning_rate", learning_rate, "> 0", lambda lr: lr > 0)
    base = optax.sgd(learning_rate)
    return PlainSGD(base.init, base.update,
                    learning_rate if is_traced(learning_rate) else float(learning_rate))


def unsupported_reason(model, client_optimizer, local_regularizer) -> str | None:
    """Why the factored update cannot run this configuration exactly, or None if it can."""
    if getattr(model, "dense_split", None) is None:
        return "the model has no DenseSplit (no single large dense layer to factor)"
    if getattr(model, "has_train_mode", False):
        return ("the model trains differently from inference (dropout or batch statistics), "
                "which the factored update's inference-mode passes do not reproduce")
    if not isinstance(client_optimizer, PlainSGD):
        return ("the client optimiser is not fedjax_lab.core.factored.sgd (plain SGD with a "
                "declared learning rate)")
    if local_regularizer is not None and not isinstance(local_regularizer, ProximalTerm):
        return "the local loss has a term other than FedProx's proximal term"
    return None


def _without_kernel(params: PyTree, layer: str) -> PyTree:
    return {**params, layer: {k: v for k, v in params[layer].items() if k != "kernel"}}


def factored_local_sgd(split, learning_rate: float, params: PyTree, x: jax.Array, y: jax.Array,
                       mask: jax.Array, rng: jax.Array, weights: jax.Array, *, num_epochs: int,
                       batch_size: int | None, active_epochs: jax.Array | None = None,
                       mu: float = 0.0, execution: ClientExecution = ClientExecution()):
    """Local SGD of a whole cohort from `params`, returning its weighted mean update.

    Args:
        split: the model's `DenseSplit`.
        learning_rate: the clients' SGD learning rate.
        params: the global model.
        x, y, mask, rng: the cohort's `[C, N, ...]` examples, labels, masks and `[C]` keys.
        weights: `[C]` aggregation weights.
        num_epochs, batch_size, active_epochs: as in `local_train` (`active_epochs` is `[C]`).
        mu: proximal coefficient (0 for FedAvg).
        execution: how the per-client feature extractors and heads run.

    Returns:
        `(mean_delta, mean_losses [C], num_steps [C])` with `mean_delta = sum_c p_c (w - w_c)`,
        matching `local_train` run on each client followed by `weighted_mean`.
    """
    num_clients = x.shape[0]
    if active_epochs is None:
        active_epochs = jnp.full((num_clients,), num_epochs, jnp.int32)
    kernel = params[split.layer]["kernel"]
    start = _without_kernel(params, split.layer)
    schedule = lambda m, r, e: batch_schedule(m, r, num_epochs=num_epochs, batch_size=batch_size,
                                              active_epochs=e)
    first_client = schedule(mask[0], rng[0], active_epochs[0])
    num_steps, rows = first_client.num_steps, first_client.batch_size
    step_plan = jax.vmap(lambda m, r, e: jax.vmap(schedule(m, r, e).at)(jnp.arange(num_steps)))
    indices, batch_masks, _, active = step_plan(mask, rng, active_epochs)
    step_major = lambda a: jnp.moveaxis(a, 1, 0)
    d_in, d_out = kernel.shape
    factors_u = jnp.zeros((num_clients, num_steps * rows, d_in), kernel.dtype)
    factors_v = jnp.zeros((num_clients, num_steps * rows, d_out), kernel.dtype)
    small = jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, (num_clients,) + leaf.shape), start)

    def step(carry, plan):
        small, factors_u, factors_v, loss_sum = carry
        step_index, batch_indices, batch_mask, is_active = plan
        xb = jax.vmap(lambda xc, ic: xc[ic])(x, batch_indices)
        yb = jax.vmap(lambda yc, ic: yc[ic])(y, batch_indices)

        def objective(small, probe):
            h = execution.map(lambda c: split.features(*c), (small, xb))
            shared = (h.reshape(-1, d_in) @ kernel).reshape(h.shape[:2] + (d_out,))
            correction = jnp.einsum("cbk,cko->cbo", jnp.einsum("cbd,ckd->cbk", h, factors_u),
                                    factors_v)
            z = shared + correction + small[split.layer]["bias"][:, None, :] + probe
            logits = execution.map(lambda c: split.head(*c), (small, z))
            losses = jax.vmap(cross_entropy)(logits, yb, batch_mask)
            if not is_zero(mu):
                losses = (losses + jax.vmap(ProximalTerm(mu), (0, None))(small, start)
                          + 0.5 * mu * _squared_low_rank_norm(factors_u, factors_v))
            return jnp.sum(losses), (losses, h)

        probe = jnp.zeros((num_clients, rows, d_out), kernel.dtype)
        (_, (losses, h)), (grads, dz) = jax.value_and_grad(objective, (0, 1), has_aux=True)(
            small, probe)
        keep = lambda new, old: jnp.where(is_active.reshape((-1,) + (1,) * (new.ndim - 1)),
                                          new, old)
        small = jax.tree.map(lambda p, g: keep(p - learning_rate * g, p), small, grads)
        if not is_zero(mu):
            decay = jnp.where(is_active, 1 - learning_rate * mu, 1).astype(factors_v.dtype)
            factors_v = factors_v * decay[:, None, None]
        offset = step_index * rows
        factors_u = jax.lax.dynamic_update_slice_in_dim(
            factors_u, keep(h, jnp.zeros_like(h)), offset, axis=1)
        factors_v = jax.lax.dynamic_update_slice_in_dim(
            factors_v, keep(-learning_rate * dz, jnp.zeros_like(dz)), offset, axis=1)
        loss_sum = loss_sum + jnp.where(is_active, losses, 0)
        return (small, factors_u, factors_v, loss_sum), None

    init = (small, factors_u, factors_v, jnp.zeros((num_clients,), kernel.dtype))
    plan = (jnp.arange(num_steps), step_major(indices), step_major(batch_masks),
            step_major(active))
    (small, factors_u, factors_v, loss_sum), _ = jax.lax.scan(step, init, plan)
    steps = jnp.sum(active, axis=1, dtype=jnp.int32)
    mean_losses = loss_sum / jnp.maximum(steps, 1).astype(loss_sum.dtype)
    mean_delta = jax.tree.map(
        lambda s0, s: jnp.tensordot(weights.astype(s.dtype), s0 - s, axes=1), start, small)
    weighted_v = factors_v * weights.astype(kernel.dtype)[:, None, None]
    kernel_delta = -(factors_u.reshape(-1, d_in).T @ weighted_v.reshape(-1, d_out))
    mean_delta[split.layer] = {**mean_delta[split.layer], "kernel": kernel_delta}
    return mean_delta, mean_losses, steps


def _squared_low_rank_norm(factors_u: jax.Array, factors_v: jax.Array) -> jax.Array:
    """`||U_c^T V_c||_F^2` per client, from the K x K Gram matrices."""
    gram_u = jnp.einsum("ckd,cjd->ckj", factors_u, factors_u)
    gram_v = jnp.einsum("cko,cjo->ckj", factors_v, factors_v)
    return jnp.sum(gram_u * gram_v, axis=(1, 2))
