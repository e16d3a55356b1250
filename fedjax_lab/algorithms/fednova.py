"""FedNova: each client's update normalised by its own amount of local work before averaging.

References:
    Wang, Liu, Liang, Joshi, Poor. "Tackling the Objective Inconsistency Problem in Heterogeneous
    Federated Optimization." NeurIPS 2020, arXiv 2007.07481 (reference code: JYWa/FedNova).

Update: client i runs τ_i local steps from x (more for clients with more examples, fewer for
stragglers) to y_i and sends d_i = (x - y_i) / ||a_i||_1, where ||a_i||_1 = τ_i for plain SGD and
[τ_i - ρ(1 - ρ^τ_i)/(1 - ρ)]/(1 - ρ) with heavy-ball momentum ρ (the sum of the coefficients
each local gradient carries into x - y_i); the server steps on τ_eff Σ_i p_i d_i with
τ_eff = Σ_i p_i τ_i and p_i = n_i / Σ_j n_j, so with `optax.sgd(1.0)` x <- x - τ_eff Σ_i p_i d_i.

Built by composition: `local_train` (its `num_steps` is τ_i), FedProx's straggler draw
(`sample_stragglers`, partial work kept), `execution.map_reduce` summing the d_i as clients finish
(chunked cohorts never hold every update, as in FedAvg) and `server_update` with FedAvg's server
optimisers. With equal τ_i and plain SGD it is FedAvg up to rounding ((x - y_i)/τ τ).

τ_eff: "steps" is the paper's Σ p_i τ_i; "normalizer" is Σ p_i ||a_i||_1, what the reference code
uses with local momentum (its FedNova.average). They coincide for plain SGD; with momentum ρ the
paper's choice shrinks the server step by about 1 - ρ relative to the reference's.

Pitfalls avoided: each client is normalised by its OWN τ_i (never the cohort's largest or the
nominal E ceil(n_i/B), which stragglers do not reach); τ_eff weights the steps with the same p_i
as the average; a client without steps (a padded row) sends d_i = 0, never 0/0, and has p_i = 0.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.algorithms.fedavg import FedAvgState, _round_metrics, predict_with
from fedjax_lab.algorithms.spec import AlgorithmSpec, ClientTraining, ServerOptimizer
from fedjax_lab.core import (Algorithm, ClientBatch, ClientExecution, client_weights,
                             local_train, model_loss, sample_stragglers, server_update)
from fedjax_lab.core.aggregation import WEIGHTINGS, check_weighting
from fedjax_lab.core.metrics import initial_metrics
from fedjax_lab.core.types import DataInfo
from fedjax_lab.core.validation import check_number, check_positive_int, is_zero
from fedjax_lab.models import Model
from fedjax_lab.options import OptionError, fraction, one_of, option

PyTree = Any
TAU_EFFS = ("steps", "normalizer")


@dataclasses.dataclass(frozen=True)
class FedNovaConfig:
    """FedNova's options; local training and weighting are FedAvg's defaults (E = 5, B = 10,
    SGD 0.05, p_i proportional to n_i), the comparison the paper makes; stragglers' partial work
    is kept, which is what FedNova normalises."""

    client: ClientTraining = option(ClientTraining(lr=0.05, epochs=5, batch_size=10),
                                    "local training (momentum: the normaliser follows it)")
    server: ServerOptimizer = option(ServerOptimizer(), "server optimiser on tau_eff * the "
                                     "mean normalised update")
    weighting: str = option("num_examples", "client weights p_i", one_of(*WEIGHTINGS))
    stragglers: float = option(0.0, "fraction of each cohort running 1..E-1 epochs (kept, "
                               "normalised by their own steps)", fraction)
    tau_eff: str = option("steps", "tau_eff: sum p_i tau_i (the paper) or sum p_i ||a_i||_1 "
                          "(the reference code with momentum)", one_of(*TAU_EFFS))

    def check(self) -> None:
        if self.stragglers > 0 and self.client.epochs < 2:
            raise OptionError("stragglers", self.stragglers,
                              "stragglers run 1..E-1 epochs, so they need client.epochs >= 2")


def build(config: FedNovaConfig, model: Model, data: DataInfo,
          execution: ClientExecution = ClientExecution()) -> Algorithm:
    del data
    return fednova(model, config.client.optimizer(), client_momentum=config.client.momentum,
                   server_optimizer=config.server.build(), num_epochs=config.client.epochs,
                   batch_size=config.client.batch_size, weighting=config.weighting,
                   straggler_fraction=config.stragglers, tau_eff=config.tau_eff,
                   execution=execution)


def fednova(model: Model, client_optimizer: optax.GradientTransformation, *,
            client_momentum: float = 0.0,
            server_optimizer: optax.GradientTransformation | None = None,
            num_epochs: int = 1, batch_size: int | None = 10, weighting: str = "num_examples",
            straggler_fraction: float = 0.0, tau_eff: str = "steps",
            execution: ClientExecution = ClientExecution(), unroll: int = 1) -> Algorithm:
    """Builds FedNova.

    Args:
        model: the `(init, apply)` model trained with softmax cross-entropy.
        client_optimizer: optax optimiser of local training: SGD, with heavy-ball momentum
            `client_momentum` if any (`optax.sgd(lr, momentum=rho)`).
        client_momentum: the momentum ρ in [0, 1] of `client_optimizer`; it sets ||a_i||_1, so
            it must match the optimiser's.
        server_optimizer: optax optimiser on tau_eff Σ p_i d_i; default `optax.sgd(1.0)`.
        num_epochs: local epochs E of a full-work client.
        batch_size: local batch; None is the full batch.
        weighting: "num_examples" (p_i proportional to n_i, the paper's) or "uniform".
        straggler_fraction: fraction of each cohort running 1..E-1 epochs (FedProx's protocol).
        tau_eff: "steps" (Σ p_i τ_i, the paper) or "normalizer" (Σ p_i ||a_i||_1, the reference
            code's with momentum).
        execution: how clients run (vmap, chunked, sequential, unrolled).
        unroll: unroll factor of the local step loop.

    Returns:
        An `Algorithm` whose state is FedAvg's `FedAvgState` (FedNova keeps no other state).
    """
    check_number("client_momentum", client_momentum, "0 <= momentum <= 1",
                 lambda value: 0 <= value <= 1)
    check_positive_int("num_epochs", num_epochs)
    if batch_size is not None:
        check_positive_int("batch_size", batch_size)
    if tau_eff not in TAU_EFFS:
        raise ValueError(f"tau_eff {tau_eff!r} is unknown; allowed: {', '.join(TAU_EFFS)}")
    check_weighting(weighting)
    check_number("straggler_fraction", straggler_fraction, "0 <= s <= 1",
                 lambda value: 0 <= value <= 1)
    if straggler_fraction > 0 and num_epochs < 2:
        raise ValueError(f"straggler_fraction > 0 needs num_epochs >= 2 (stragglers run "
                         f"1..E-1 epochs); got num_epochs={num_epochs}")
    server_optimizer = optax.sgd(1.0) if server_optimizer is None else server_optimizer
    loss_fn = model_loss(model.apply)

    def init(key: jax.Array) -> FedAvgState:
        params = model.init(key)
        metrics = initial_metrics(_metrics, jnp.zeros(0), jnp.zeros(0), jnp.zeros(0, jnp.int32),
                                  optax.tree.zeros_like(params), jnp.zeros(()))
        return FedAvgState(params, server_optimizer.init(params), jnp.zeros((), jnp.int32),
                           metrics)

    def client_update(global_params, client):
        x, y, mask, rng, epochs = client
        result = local_train(loss_fn, client_optimizer, global_params, x, y, mask, rng,
                             num_epochs=num_epochs, batch_size=batch_size,
                             active_epochs=epochs, unroll=unroll)
        norm = local_normalizer(result.num_steps, client_momentum)
        # No steps: x - y_i is exactly 0, divided by 1 instead of 0.
        divisor = jnp.where(result.num_steps > 0, norm, 1)
        normalized = jax.tree.map(lambda x_leaf, y_leaf: (x_leaf - y_leaf) / divisor.astype(
            x_leaf.dtype), global_params, result.params)
        return normalized, (result.mean_loss, result.num_steps, norm)

    def round_fn(state: FedAvgState, batch: ClientBatch) -> FedAvgState:
        global_params = state.params
        stragglers = sample_stragglers(batch.rng, num_epochs=num_epochs,
                                       fraction=straggler_fraction)
        weights = client_weights(batch.num_examples, weighting=weighting)
        mean_normalized, (losses, steps, norms) = execution.map_reduce(
            lambda client: client_update(global_params, client),
            (batch.x, batch.y, batch.mask, batch.rng, stragglers.epochs), weights)
        work = steps.astype(weights.dtype) if tau_eff == "steps" else norms.astype(weights.dtype)
        effective_steps = jnp.sum(weights * work)
        pseudo_gradient = jax.tree.map(lambda leaf: effective_steps.astype(leaf.dtype) * leaf,
                                       mean_normalized)
        params, opt_state = server_update(global_params, state.opt_state, pseudo_gradient,
                                          server_optimizer)
        return FedAvgState(params, opt_state, state.round + 1,
                           _metrics(weights, losses, steps, pseudo_gradient, effective_steps))

    def predict(state: FedAvgState, batch: ClientBatch) -> jax.Array:
        return predict_with(model, state.params, batch.x)

    return Algorithm(init=init, round=round_fn, predict=predict)


def local_normalizer(num_steps: jax.Array, momentum: float) -> jax.Array:
    """||a_i||_1 after `num_steps` local steps with heavy-ball momentum ρ (v <- ρ v + g,
    y <- y - η v): the gradient of step k reaches x - y_i with weight η (1 - ρ^(τ-k)) / (1 - ρ),
    and these sum to [τ - ρ(1 - ρ^τ)/(1 - ρ)]/(1 - ρ); τ for plain SGD, τ(τ + 1)/2 at ρ = 1."""
    tau = jnp.asarray(num_steps).astype(jnp.result_type(float))
    if is_zero(momentum):
        return tau
    if momentum == 1:
        return tau * (tau + 1) / 2
    return (tau - momentum * (1 - momentum ** tau) / (1 - momentum)) / (1 - momentum)


def _metrics(weights, losses, steps, pseudo_gradient, effective_steps) -> dict[str, jax.Array]:
    """FedAvg's metrics (the model travels both ways; τ_i rides along, a few bytes) plus τ_eff."""
    return _round_metrics(weights, losses, steps, pseudo_gradient,
                          tau_eff=jnp.asarray(effective_steps).astype(jnp.result_type(float)))


SPECS = (AlgorithmSpec(
    "fednova", FedNovaConfig, build,
    paper="Wang et al., Tackling the Objective Inconsistency Problem in Heterogeneous Federated "
          "Optimization, NeurIPS 2020, arXiv 2007.07481",
    summary="each client's update divided by its own local work ||a_i||_1 (tau_i for SGD), the "
            "average rescaled by tau_eff = sum p_i tau_i"),)
