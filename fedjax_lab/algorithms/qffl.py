"""q-FFL solved by q-FedAvg: the server step leans towards the clients the model serves worst.

References:
    Li, Sanjabi, Beirami, Smith. "Fair Resource Allocation in Federated Learning." ICLR 2020,
    arXiv 1905.10497 (Algorithm 3, q-FedAvg; Algorithm 2, q-FedSGD, is its one-step case:
    client.epochs 1, client.batch_size none). Reference code: litian96/fair_flearn.

Objective f_q(w) = Σ_k p_k F_k^{q+1}(w) / (q + 1); q = 0 is FedAvg's, larger q weighs the
clients of larger loss more. Update: selected client k computes F_k = F_k(w^t) on its real
examples, runs local SGD from w^t to w̄_k and sends Δ_k = F_k^q Δw_k, Δw_k = L (w^t - w̄_k), with
h_k = q F_k^{q-1} ||Δw_k||² + L F_k^q; the server sets w^{t+1} = w^t - Σ_k Δ_k / Σ_k h_k.

Computed as the same quantity in a form that cannot overflow (float32 F_k^q overflows at
F_k = 100, q = 20 and is 0 at F_k = 0.001): with d_k = w^t - w̄_k and a_k = F_k^q / Σ_j F_j^q (a
softmax of q log F_k over the real clients), w^{t+1} = w^t - s Σ_k a_k d_k, where
s = 1 / (1 + q L Σ_k a_k ||d_k||² / F_k). The a_k are known before training, so
`execution.map_reduce` sums the a_k d_k as clients finish (chunked cohorts never hold every
update). At q = 0, a_k = 1/m and s = 1 exactly: uniform FedAvg, bit for bit.

Sampling: the paper draws clients with probability proportional to n_k and sums their terms
unweighted, so p_k = n_k / n enters through the sampling. The reference's `sampling=2` is numpy's
weighted choice without replacement (successive draws), the distribution that
`fedjax_lab.data.sample_cohort(..., probabilities=size_weighted_probabilities(n))` draws (by
Gumbel top-k). `fedjax-lab run` draws uniform cohorts, under which the same unweighted update
optimises f_q with p_k = 1/N.

Reference details followed: F_k is the mean loss at w^t over the client's whole local training
set, evaluated (inference mode) before training; ||Δw_k||² runs over all parameters flattened;
F_k + 1e-10 stands for F_k in every power (the reference's epsilon), so F_k = 0 gives no
0 · inf; L defaults to 1 / client.lr, as the reference computes it (`lipschitz` sets another,
e.g. one tuned at q = 0). With that L and several local epochs, s is small (about 0.13 on the
default digits job at q = 1): q-FedAvg then moves far less per round than FedAvg.

Pitfalls avoided: F_k at w^t, not after local training; h_k's q F_k^{q-1} at q = 0 is
0 · F_k^{-1}, kept finite by the epsilon and computed as q times a finite number, so a traced q
= 0 in a sweep is FedAvg too; padded rows enter neither sum; sums over the real selected clients,
never divided by the cohort's padded size; a cohort without real clients leaves the model
unchanged (no 0/0).
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.algorithms.fedavg import FedAvgState, predict_with
from fedjax_lab.algorithms.spec import AlgorithmSpec, ClientTraining
from fedjax_lab.core import (Algorithm, ClientBatch, ClientExecution, cross_entropy, local_train,
                             model_loss, participants_bytes, server_update, tree_bytes)
from fedjax_lab.core.metrics import initial_metrics, round_metrics
from fedjax_lab.core.types import DataInfo
from fedjax_lab.core.validation import check_number, check_positive_int
from fedjax_lab.models import Model
from fedjax_lab.options import non_negative, option, optional, positive

PyTree = Any
# The reference's guard on F_k in F_k^q and F_k^{q-1} (fair_flearn, trainers/qffedavg.py).
LOSS_EPSILON = 1e-10


@dataclasses.dataclass(frozen=True)
class QFFLConfig:
    """q-FedAvg's options. q = 1 is the paper's q-FFL setting for its synthetic data (Vehicle
    uses q = 5: fair_flearn's README); the local job is FedAvg's default (SGD 0.05, E = 5,
    B = 10), so default q-FedAvg and FedAvg runs do the same local work."""

    client: ClientTraining = option(ClientTraining(lr=0.05, epochs=5, batch_size=10),
                                    "local training (L = 1 / lr assumes plain SGD)")
    q: float = option(1.0, "fairness q >= 0 of f_q = sum p_k F_k^(q+1) / (q+1); 0 = FedAvg",
                      non_negative, sweepable=True)
    lipschitz: float | None = option(None, "Lipschitz estimate L of the Δw_k = L (w - w_k) and "
                                     "h_k; none = 1 / client.lr (the reference's)",
                                     optional(positive), sweepable=True)


def build(config: QFFLConfig, model: Model, data: DataInfo,
          execution: ClientExecution = ClientExecution()) -> Algorithm:
    del data
    lipschitz = 1 / config.client.lr if config.lipschitz is None else config.lipschitz
    return qffl(model, config.client.optimizer(), q=config.q, lipschitz=lipschitz,
                num_epochs=config.client.epochs, batch_size=config.client.batch_size,
                execution=execution)


def qffl(model: Model, client_optimizer: optax.GradientTransformation, *, lipschitz: float,
         q: float = 1.0, num_epochs: int = 1, batch_size: int | None = 10,
         execution: ClientExecution = ClientExecution(), unroll: int = 1) -> Algorithm:
    """Builds q-FedAvg.

    Args:
        model: the `(init, apply)` model trained with softmax cross-entropy.
        client_optimizer: optax optimiser of local training, `optax.sgd(lr)` in the paper.
        lipschitz: L > 0, usually 1 / the client learning rate.
        q: the fairness parameter q >= 0.
        num_epochs: local epochs E.
        batch_size: local batch B; None is the full batch (with E = 1: q-FedSGD).
        execution: how clients run (vmap, chunked, sequential, unrolled, sharded).
        unroll: unroll factor of the local step loop.

    Returns:
        An `Algorithm` whose state is FedAvg's `FedAvgState` (its optimiser state is plain
        SGD's, empty).
    """
    check_number("q", q, ">= 0", lambda value: value >= 0)
    check_number("lipschitz", lipschitz, "> 0", lambda value: value > 0)
    check_positive_int("num_epochs", num_epochs)
    if batch_size is not None:
        check_positive_int("batch_size", batch_size)
    # w - s Σ a_k d_k as the server SGD step of FedAvg on s Σ a_k d_k (q = 0: FedAvg's exactly).
    server_sgd = optax.sgd(1.0)
    train_loss = model_loss(model.apply)

    def init(key: jax.Array) -> FedAvgState:
        params = model.init(key)
        empty = jnp.zeros(0)
        return FedAvgState(params, server_sgd.init(params), jnp.zeros((), jnp.int32),
                           initial_metrics(_metrics, jnp.zeros(0, bool), empty, empty,
                                           jnp.zeros(0, jnp.int32), params,
                                           optax.tree.zeros_like(params), jnp.ones(()), 4))

    def loss_at_global(global_params, client):
        x, y, mask = client
        return cross_entropy(model.apply(global_params, x), y, mask)

    def client_update(global_params, client):
        x, y, mask, rng = client
        result = local_train(train_loss, client_optimizer, global_params, x, y, mask, rng,
                             num_epochs=num_epochs, batch_size=batch_size, unroll=unroll)
        local_change = optax.tree.sub(global_params, result.params)
        return local_change, (result.mean_loss, result.num_steps,
                              optax.tree.norm(local_change, squared=True))

    def round_fn(state: FedAvgState, batch: ClientBatch) -> FedAvgState:
        global_params = state.params
        real = batch.num_examples > 0
        global_losses = execution.map(lambda client: loss_at_global(global_params, client),
                                      (batch.x, batch.y, batch.mask))
        shifted_losses = global_losses + LOSS_EPSILON
        shares = _loss_power_shares(q * jnp.log(shifted_losses), real)
        mean_change, (losses, steps, squared_norms) = execution.map_reduce(
            lambda client: client_update(global_params, client),
            (batch.x, batch.y, batch.mask, batch.rng), shares)
        # Σ_k h_k / (L Σ_j F_j^q) = 1 + q L Σ_k a_k ||d_k||² / F_k.
        curvature = jnp.sum(shares * squared_norms.astype(shares.dtype) / shifted_losses)
        step_scale = 1 / (1 + q * (lipschitz * curvature))
        pseudo_gradient = jax.tree.map(lambda leaf: step_scale.astype(leaf.dtype) * leaf,
                                       mean_change)
        params, opt_state = server_update(global_params, state.opt_state, pseudo_gradient,
                                          server_sgd)
        return FedAvgState(params, opt_state, state.round + 1,
                           _metrics(real, losses, global_losses, steps, global_params,
                                    pseudo_gradient, step_scale, global_losses.dtype.itemsize))

    def predict(state: FedAvgState, batch: ClientBatch) -> jax.Array:
        return predict_with(model, state.params, batch.x)

    return Algorithm(init=init, round=round_fn, predict=predict)


def _loss_power_shares(log_powers: jax.Array, real: jax.Array) -> jax.Array:
    """a_k = F_k^q / Σ_j F_j^q over the real rows from log F_k^q (0 for padded rows; all 0 when
    no row is real): the max is subtracted before exp, so no power overflows or underflows."""
    largest = jnp.max(jnp.where(real, log_powers, -jnp.inf), initial=-jnp.inf)
    powers = jnp.where(real, jnp.exp(log_powers - jnp.where(real.any(), largest, 0)), 0)
    total = jnp.sum(powers)
    return jnp.where(total > 0, powers / jnp.where(total > 0, total, 1), 0)


def _metrics(real, losses, global_losses, steps, params, pseudo_gradient, step_scale,
             scalar_bytes) -> dict[str, jax.Array]:
    """The round's metrics: train_loss the real clients' plain mean local loss; each real client
    receives the model and sends its update plus F_k (one scalar); the mean and max of F_k(w^t)
    over the real clients, whose spread q-FFL narrows; `step_scale` s, how much h_k's curvature
    term shortens the step (1 at q = 0; far below 1 means L is large for this local job)."""
    dtype = jnp.result_type(float)
    real_clients = jnp.sum(real).astype(dtype)
    uniform = jnp.where(real, 1 / jnp.maximum(real_clients, 1), 0)
    size = tree_bytes(params)
    return round_metrics(
        uniform, losses.astype(dtype), bytes_up=participants_bytes(real, size + scalar_bytes),
        bytes_down=participants_bytes(real, size),
        local_steps=jnp.sum(jnp.where(real, steps, 0)).astype(jnp.int32),
        update_norm=optax.tree.norm(pseudo_gradient).astype(dtype),
        global_loss_mean=jnp.sum(uniform * global_losses.astype(dtype)),
        global_loss_max=jnp.max(jnp.where(real, global_losses, 0), initial=0).astype(dtype),
        step_scale=jnp.asarray(step_scale).astype(dtype))


SPECS = (AlgorithmSpec(
    "qffl", QFFLConfig, build,
    paper="Li, Sanjabi, Beirami, Smith, Fair Resource Allocation in Federated Learning, ICLR 2020, "
          "arXiv 1905.10497",
    summary="q-FFL by q-FedAvg: updates weighted by F_k^q at the global model, step 1/sum h_k "
            "(q = 0: uniform FedAvg; q-FedSGD: client.epochs 1, batch_size none)",
    trains_model_state=True),)
