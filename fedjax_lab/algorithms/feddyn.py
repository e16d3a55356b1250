"""FedDyn: local objectives corrected by a per-client gradient memory, a server that tracks it.

References:
    Acar, Zhao, Matas, Mattina, Whatmough, Saligrama. "Federated Learning Based on Dynamic
    Regularization." ICLR 2021, arXiv 2111.04263 (reference code: alpemreacar/FedDyn).

Update (Algorithm 1): sampled client i minimises L_i(θ) - <g_i, θ> + (α/2)||θ - θ^{t-1}||² from
θ^{t-1} (local SGD epochs), then g_i <- g_i - α (θ_i - θ^{t-1}); the server keeps
h <- h - (α/m) Σ_{i∈P_t} (θ_i - θ^{t-1}), m the WHOLE population, and sets
θ^t = (1/|P_t|) Σ_{i∈P_t} θ_i - h/α. The memories g_i (zeros at start) live in `client_states`,
stacked over the population; h is their population mean after every round. The state holds h/α
(`h_over_alpha`), which grows by (1/m) Σ_{i∈P_t} (θ^{t-1} - θ_i) and needs no division by α.

Built by composition: `local_train` with the dynamic regulariser in its loss closure, clients run
by `execution.map` (their new memories come back stacked, to be scattered), `weighted_mean` for
both server sums, and `server_update` on the pseudo-gradient (1/|P_t|) Σ (θ^{t-1} - θ_i) + h/α,
so the default `optax.sgd(1.0)` is the paper's server and FedAdam-style optimisers compose.

α = 0: h/α is undefined in the paper, and its α -> 0 limit is NOT FedAvg: h/α =
-(1/m) Σ_s Σ_{i∈P_s} (θ_i^s - θ^{s-1}) accumulates every past drift whatever α is, so a state
h/α updated unconditionally would still correct the server at α = 0. The paper's h itself stays
exactly 0 at α = 0 (it only ever grows by α times something), so h/α is defined as 0 there and
its accumulation is switched off (a `where` on α > 0, so a traced α = 0 in a sweep does the
same): FedDyn with α = 0 is FedAvg with uniform weights, bit for bit.

Weighting: the paper's uniform mean over participants and one α. The reference code instead
scales α per client by m n_i / Σ_j n_j and keeps (θ_i - θ) sums in place of g_i; that variant is
not offered here.

Pitfalls avoided: the server's h sums the cohort's drifts over the population size m, not the
cohort size (implementations that divide by |P_t| over-correct by m / |P_t|); unsampled clients'
and padded rows' memories never change (`scatter_clients` with `valid`); the linear term uses the
memory from before this round's training, and the anchor is θ^{t-1}, not the client's moving copy.
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.algorithms.fedavg import _round_metrics, predict_with
from fedjax_lab.algorithms.spec import AlgorithmSpec, ClientTraining, ServerOptimizer
from fedjax_lab.core import (Algorithm, ClientBatch, ClientExecution, client_weights,
                             gather_clients, local_train, model_loss, scatter_clients,
                             server_update, weighted_mean)
from fedjax_lab.core.metrics import initial_metrics
from fedjax_lab.core.personal_models import check_num_clients, replicate
from fedjax_lab.core.types import DataInfo
from fedjax_lab.core.validation import check_number, check_positive_int, is_zero
from fedjax_lab.models import Model
from fedjax_lab.options import non_negative, option

PyTree = Any


@dataclasses.dataclass(frozen=True)
class FedDynConfig:
    """FedDyn's options; α = 0.01 with SGD 0.1, E = 5, B = 50 are the reference's CIFAR-10
    script (the paper tunes α in {0.1, 0.01, 0.001}); its weight decay 1e-3 is left at 0, as in
    Algorithm 1."""

    client: ClientTraining = option(ClientTraining(lr=0.1, epochs=5, batch_size=50),
                                    "local training")
    server: ServerOptimizer = option(ServerOptimizer(), "server optimiser on the corrected "
                                     "mean delta; sgd at lr 1 is the paper's server")
    alpha: float = option(0.01, "dynamic regulariser alpha (0: FedAvg with uniform weights)",
                          non_negative, sweepable=True)


def build(config: FedDynConfig, model: Model, data: DataInfo,
          execution: ClientExecution = ClientExecution()) -> Algorithm:
    return feddyn(model, config.client.optimizer(), num_clients=data.num_clients,
                  alpha=config.alpha, server_optimizer=config.server.build(),
                  num_epochs=config.client.epochs, batch_size=config.client.batch_size,
                  execution=execution)


class FedDynClientState(NamedTuple):
    """Attributes: gradient_memory, the paper's ∇L̃_i (g_i), one model-shaped pytree per client."""

    gradient_memory: PyTree


class FedDynState(NamedTuple):
    """Attributes: params (θ), opt_state (server optimiser), round, metrics, client_states (a
    `FedDynClientState`, leaves `[num_clients, ...]`), h_over_alpha (the paper's h divided by α,
    h being the population mean of the g_i; 0 at α = 0)."""

    params: PyTree
    opt_state: PyTree
    round: jax.Array
    metrics: dict[str, jax.Array]
    client_states: FedDynClientState
    h_over_alpha: PyTree


def feddyn(model: Model, client_optimizer: optax.GradientTransformation, *, num_clients: int,
           alpha: float = 0.01, server_optimizer: optax.GradientTransformation | None = None,
           num_epochs: int = 1, batch_size: int | None = 10,
           execution: ClientExecution = ClientExecution(), unroll: int = 1) -> Algorithm:
    """Builds FedDyn.

    Args:
        model: the `(init, apply)` model trained with softmax cross-entropy.
        client_optimizer: optax optimiser of local training (the paper: SGD).
        num_clients: the population size m (memories are stacked over it; h divides by it).
        alpha: α >= 0 of the dynamic regulariser; 0 is FedAvg with uniform weights.
        server_optimizer: optax optimiser on the pseudo-gradient; default `optax.sgd(1.0)`.
        num_epochs: local epochs.
        batch_size: local batch; None is the full batch.
        execution: how clients run (vmap, chunked, sequential, unrolled).
        unroll: unroll factor of the local step loop.

    Returns:
        An `Algorithm` whose state is `FedDynState`.
    """
    check_num_clients(num_clients)
    check_number("alpha", alpha, "alpha >= 0", lambda value: value >= 0)
    check_positive_int("num_epochs", num_epochs)
    if batch_size is not None:
        check_positive_int("batch_size", batch_size)
    server_optimizer = optax.sgd(1.0) if server_optimizer is None else server_optimizer
    base_loss = model_loss(model.apply)

    def init(key: jax.Array) -> FedDynState:
        params = model.init(key)
        zeros = optax.tree.zeros_like(params)
        metrics = initial_metrics(_metrics, jnp.zeros(0), jnp.zeros(0), jnp.zeros(0, jnp.int32),
                                  zeros, zeros)
        return FedDynState(params, server_optimizer.init(params), jnp.zeros((), jnp.int32),
                           metrics, FedDynClientState(replicate(zeros, num_clients)), zeros)

    def client_update(global_params, client):
        memory, x, y, mask, rng = client
        if is_zero(alpha):
            loss_fn = base_loss  # the memory stays 0: no term, so α = 0 trains exactly as FedAvg
        else:
            def loss_fn(params, xb, yb, mb, key):
                return base_loss(params, xb, yb, mb, key) + dynamic_regularizer(
                    params, global_params, memory, alpha)
        result = local_train(loss_fn, client_optimizer, global_params, x, y, mask, rng,
                             num_epochs=num_epochs, batch_size=batch_size, unroll=unroll)
        # FedAvg's sign (θ^{t-1} - θ_i), so the server step is FedAvg's at α = 0.
        delta = optax.tree.sub(global_params, result.params)
        new_memory = jax.tree.map(lambda g, d: g + alpha * d, memory, delta)
        return delta, new_memory, result.mean_loss, result.num_steps

    def round_fn(state: FedDynState, batch: ClientBatch) -> FedDynState:
        global_params = state.params
        cohort = gather_clients(state.client_states, batch.client_ids)
        deltas, memories, losses, steps = execution.map(
            lambda client: client_update(global_params, client),
            (cohort.gradient_memory, batch.x, batch.y, batch.mask, batch.rng))
        participating = batch.num_examples > 0
        weights = client_weights(batch.num_examples, weighting="uniform")
        mean_delta = weighted_mean(deltas, weights)
        if is_zero(alpha):
            h_over_alpha, pseudo_gradient = state.h_over_alpha, mean_delta
        else:
            # h sums the cohort's drifts over the whole population m, not over the cohort.
            population_share = participating.astype(weights.dtype) / num_clients
            h_over_alpha = jax.tree.map(
                lambda correction, drift: correction + jnp.where(alpha > 0, drift, 0),
                state.h_over_alpha, weighted_mean(deltas, population_share))
            pseudo_gradient = jax.tree.map(jnp.add, mean_delta, h_over_alpha)
        params, opt_state = server_update(global_params, state.opt_state, pseudo_gradient,
                                          server_optimizer)
        client_states = scatter_clients(state.client_states, batch.client_ids,
                                        FedDynClientState(memories), valid=participating)
        metrics = _metrics(weights, losses, steps, pseudo_gradient, h_over_alpha)
        return FedDynState(params, opt_state, state.round + 1, metrics, client_states,
                           h_over_alpha)

    def predict(state: FedDynState, batch: ClientBatch) -> jax.Array:
        return predict_with(model, state.params, batch.x)

    return Algorithm(init=init, round=round_fn, predict=predict)


def dynamic_regularizer(params: PyTree, global_params: PyTree, gradient_memory: PyTree,
                        alpha) -> jax.Array:
    """-<g_i, θ> + (α/2)||θ - θ^{t-1}||²: its gradient α(θ - θ^{t-1}) - g_i is added to every
    local step's."""
    linear = optax.tree.vdot(gradient_memory, params)
    proximal = optax.tree.norm(optax.tree.sub(params, global_params), squared=True)
    return 0.5 * alpha * proximal - linear


def _metrics(weights, losses, steps, pseudo_gradient, h_over_alpha) -> dict[str, jax.Array]:
    """FedAvg's metrics (the model travels both ways) plus the norm of the correction h/α."""
    return _round_metrics(weights, losses, steps, pseudo_gradient,
                          correction_norm=optax.tree.norm(h_over_alpha).astype(
                              jnp.result_type(float)))


SPECS = (AlgorithmSpec(
    "feddyn", FedDynConfig, build,
    paper="Acar et al., Federated Learning Based on Dynamic Regularization, ICLR 2021, "
          "arXiv 2111.04263",
    summary="clients add -<g_i, θ> + (α/2)||θ - θ_t||² and update their gradient memory g_i; "
            "the server subtracts h/α (α = 0: uniform FedAvg)"),)
