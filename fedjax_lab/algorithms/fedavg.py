"""Federated Averaging, with FedOpt's server optimisers and FedProx's straggler protocol.

References:
    McMahan, Moore, Ramage, Hampson, Agüera y Arcas. "Communication-Efficient Learning of Deep
    Networks from Decentralized Data." AISTATS 2017, arXiv 1602.05629.
    Reddi et al. "Adaptive Federated Optimization." ICLR 2021, arXiv 2003.00295 (server optimiser).

Update: each sampled client starts from w_t and runs E epochs of minibatch SGD (batch B, shuffled
every epoch) to w_i; the server steps on the pseudo-gradient sum_i p_i (w_t - w_i) with its optax
optimiser; with `optax.sgd(1.0)` that is w_{t+1} = sum_i p_i w_i, p_i = n_i / sum_j n_j.
FedSGD is `num_epochs=1, batch_size=None` (one full-batch gradient per client).

`local_regularizer` and `straggler_policy` are the seams other algorithms compose: FedProx is
FedAvg with a proximal term that keeps stragglers' partial work (fedprox.py). `dp` makes the
aggregation user-level differentially private (DP-FedAvg, McMahan et al., ICLR 2018, arXiv
1710.06963; `fedjax_lab.privacy`): each delta clipped, the sum noised and divided by the expected
cohort, whatever the weighting; the config's `dp` options also choose Poisson cohorts.

Pitfalls avoided: clients with fewer examples do fewer effective steps under vmap (a per-step
active mask, never a fixed step count over padding); every epoch is reshuffled; sample-weighted vs
uniform averaging is an explicit option.
"""

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lab import privacy
from fedjax_lab.algorithms.spec import AlgorithmSpec, ClientTraining, ServerOptimizer
from fedjax_lab.core import (Algorithm, ClientBatch, ClientExecution, client_weights,
                             local_train, model_loss, sample_stragglers, server_update,
                             weighted_mean)
from fedjax_lab.core.aggregation import WEIGHTINGS, check_weighting
from fedjax_lab.core.attacks import Attack
from fedjax_lab.core.communication import model_exchange_bytes
from fedjax_lab.core.factored import factored_local_sgd, unsupported_reason
from fedjax_lab.core.metrics import initial_metrics, round_metrics
from fedjax_lab.core.robust import Aggregator
from fedjax_lab.core.validation import check_positive_int
from fedjax_lab.core.types import DataInfo, server_key
from fedjax_lab.models import Model
from fedjax_lab.options import OptionError, fraction, one_of, option
from fedjax_lab.privacy import DPAggregator, DPOptions, PrivateServerState

PyTree = Any
# local_regularizer(client_params, global_params) -> scalar added to every local minibatch loss.
LocalRegularizer = Callable[[PyTree, PyTree], jax.Array]
STRAGGLER_POLICIES = ("drop", "keep")
DENSE_UPDATES = ("auto", "factored", "per_client")


@dataclasses.dataclass(frozen=True)
class FedAvgConfig:
    """FedAvg's options; defaults are McMahan et al.'s E = 5 local epochs of B = 10 examples, with
    the client rate (0.05) and plain averaging of the library's default job."""

    client: ClientTraining = option(ClientTraining(lr=0.05, epochs=5, batch_size=10),
                                    "local training")
    server: ServerOptimizer = option(ServerOptimizer(), "server optimiser on the mean delta")
    weighting: str = option("num_examples", "client weights p_i", one_of(*WEIGHTINGS))
    stragglers: float = option(0.0, "fraction of each cohort running 1..E-1 epochs (FedProx's "
                               "protocol; FedAvg drops them)", fraction)
    dense_update: str = option("auto", "factored low-rank dense update where exact",
                               one_of(*DENSE_UPDATES))
    dp: DPOptions = option(DPOptions(), "user-level differential privacy (DP-FedAvg); off "
                           "unless dp.clip is set")

    def check(self) -> None:
        if self.stragglers > 0 and self.client.epochs < 2:
            raise OptionError("stragglers", self.stragglers,
                              "stragglers run 1..E-1 epochs, so they need client.epochs >= 2")
        if self.dp.enabled and self.dense_update == "factored":
            raise OptionError("dense_update", self.dense_update, "the factored update never "
                              "forms the per-client deltas DP clips; use auto or per_client")


def fedavg_options(config: FedAvgConfig, execution: ClientExecution) -> dict:
    """The `fedavg` keyword arguments that a `FedAvgConfig` sets (also FedProx's and Ditto's)."""
    return dict(server_optimizer=config.server.build(), num_epochs=config.client.epochs,
                batch_size=config.client.batch_size, weighting=config.weighting,
                straggler_fraction=config.stragglers, execution=execution,
                dense_update=config.dense_update, dp=config.dp.aggregator())


def build(config: FedAvgConfig, model: Model, data: DataInfo,
          execution: ClientExecution = ClientExecution()) -> Algorithm:
    return config.dp.sampled(
        fedavg(model, config.client.optimizer(), **fedavg_options(config, execution)), data)


class FedAvgState(NamedTuple):
    """Attributes: params (global model), opt_state (server optimiser; under DP a
    `PrivateServerState` holding the clip norm beside it), round, metrics."""

    params: PyTree
    opt_state: PyTree
    round: jax.Array
    metrics: dict[str, jax.Array]


def fedavg(model: Model, client_optimizer: optax.GradientTransformation, *,
           server_optimizer: optax.GradientTransformation | None = None,
           num_epochs: int = 1, batch_size: int | None = 10,
           weighting: str = "num_examples", straggler_fraction: float = 0.0,
           straggler_policy: str = "drop", local_regularizer: LocalRegularizer | None = None,
           aggregator: Aggregator = weighted_mean, attack: Attack | None = None,
           execution: ClientExecution = ClientExecution(), unroll: int = 1,
           dense_update: str = "auto", dp: DPAggregator | None = None) -> Algorithm:
    """Builds FedAvg.

    Args:
        model: the `(init, apply)` model trained with softmax cross-entropy.
        client_optimizer: optax optimiser of local training, e.g. `optax.sgd(0.01)`.
        server_optimizer: optax optimiser applied to the mean client delta; default
            `optax.sgd(1.0)`, plain averaging.
        num_epochs: local epochs E.
        batch_size: local batch B; None is the full batch (B = infinity in McMahan et al.).
        weighting: "num_examples" (p_i proportional to n_i) or "uniform".
        straggler_fraction: fraction s of each cohort that straggles (FedProx's protocol).
        straggler_policy: "drop" aggregates only full-work clients (FedAvg in FedProx's
            experiments); "keep" aggregates stragglers' partial work too.
        local_regularizer: optional term added to each local minibatch loss.
        aggregator: `aggregate(stacked_deltas, weights) -> delta`; the weighted mean, or a robust
            aggregator of `fedjax_lab.core.robust` (coordinate median, trimmed or clipped mean).
        attack: optional simulated malicious clients (`fedjax_lab.core.attacks.Attack`) that
            poison their labels and/or corrupt the updates they send.
        execution: how clients run (vmap, chunked, sequential, unrolled).
        unroll: unroll factor of the local step loop.
        dense_update: "factored" trains a model's large dense layer as low-rank factors
            (`fedjax_lab.core.factored`: exact for plain SGD clients, `factored.sgd`, the
            proximal term and the weighted mean; the fast path for the FEMNIST CNN); "per_client"
            runs `local_train` on each client; "auto" factors wherever that is exact.
        dp: the private aggregation (`fedjax_lab.privacy.dp_aggregator`) that replaces the
            weighted mean: each participating client's delta clipped, the sum noised and divided
            by the expected cohort; its state (the clip norm) sits beside the server
            optimiser's in `opt_state` (a `PrivateServerState`).

    Returns:
        An `Algorithm` whose state is `FedAvgState`.
    """
    check_positive_int("num_epochs", num_epochs)
    if batch_size is not None:
        check_positive_int("batch_size", batch_size)
    if straggler_policy not in STRAGGLER_POLICIES:
        raise ValueError(f"straggler_policy {straggler_policy!r} is unknown; "
                         f"allowed: {', '.join(STRAGGLER_POLICIES)}")
    if not 0.0 <= straggler_fraction <= 1.0:
        raise ValueError(f"straggler_fraction={straggler_fraction!r} is invalid; "
                         "expected 0 <= s <= 1")
    if straggler_fraction > 0 and num_epochs < 2:
        raise ValueError(f"straggler_fraction > 0 needs num_epochs >= 2 (stragglers run "
                         f"1..E-1 epochs); got num_epochs={num_epochs}")
    check_weighting(weighting)
    if dp is not None and aggregator is not weighted_mean:
        raise ValueError(f"dp with aggregator {getattr(aggregator, '__name__', aggregator)!r}: "
                         "DP's sensitivity bound holds for the clipped sum, which a robust "
                         "aggregator replaces; use one or the other")
    factored = _use_factored(dense_update, model, client_optimizer, local_regularizer,
                             aggregator, attack, dp)
    server_optimizer = optax.sgd(1.0) if server_optimizer is None else server_optimizer
    base_loss = model_loss(model.apply)

    def init(key: jax.Array) -> FedAvgState:
        params = model.init(key)
        opt_state = server_optimizer.init(params)
        dp_metrics = {}
        if dp is not None:
            opt_state = PrivateServerState(dp.init(), opt_state)
            dp_metrics = privacy.initial_metrics(dp)
        return FedAvgState(params, opt_state, jnp.zeros((), jnp.int32),
                           initial_metrics(_empty_round_metrics, params, dp_metrics))

    def round_fn(state: FedAvgState, batch: ClientBatch) -> FedAvgState:
        global_params = state.params
        if attack is not None:
            batch = attack.poison_batch(batch)
        if local_regularizer is None:
            loss_fn = base_loss
        else:
            def loss_fn(params, x, y, mask, rng):
                return base_loss(params, x, y, mask, rng) + local_regularizer(params, global_params)

        stragglers = sample_stragglers(batch.rng, num_epochs=num_epochs,
                                       fraction=straggler_fraction)
        participating = ~stragglers.is_straggler if straggler_policy == "drop" else None
        weights = client_weights(batch.num_examples, weighting=weighting,
                                 participating=participating)

        def client_update(client):
            x, y, mask, rng, epochs = client
            result = local_train(loss_fn, client_optimizer, global_params, x, y, mask, rng,
                                 num_epochs=num_epochs, batch_size=batch_size,
                                 active_epochs=epochs, unroll=unroll)
            delta = optax.tree.sub(global_params, result.params)
            return delta, (result.mean_loss, result.num_steps)

        per_client = (batch.x, batch.y, batch.mask, batch.rng, stragglers.epochs)
        opt_state, dp_metrics = state.opt_state, {}
        if factored:
            mean_delta, losses, steps = factored_local_sgd(
                model.dense_split, client_optimizer.learning_rate, global_params, batch.x,
                batch.y, batch.mask, batch.rng, weights, num_epochs=num_epochs,
                batch_size=batch_size, active_epochs=stragglers.epochs,
                mu=getattr(local_regularizer, "mu", 0.0), execution=execution)
        elif dp is not None:
            corrupt = None if attack is None else (
                lambda deltas: attack.corrupt_updates(deltas, batch))
            mean_delta, (losses, steps), dp_state, dp_metrics = dp.aggregate(
                client_update, per_client, weights > 0, opt_state.aggregator, server_key(batch),
                execution=execution, corrupt=corrupt)
            opt_state = opt_state._replace(aggregator=dp_state)
        elif aggregator is weighted_mean and attack is None:
            # The mean is accumulated as clients finish, so chunked cohorts never stack deltas.
            mean_delta, (losses, steps) = execution.map_reduce(client_update, per_client,
                                                               weights)
        else:
            deltas, (losses, steps) = execution.map(client_update, per_client)
            if attack is not None:
                deltas = attack.corrupt_updates(deltas, batch)
            mean_delta = aggregator(deltas, weights)
        if dp is None:
            params, opt_state = server_update(global_params, opt_state, mean_delta,
                                              server_optimizer)
        else:
            params, optimizer_state = server_update(global_params, opt_state.optimizer,
                                                    mean_delta, server_optimizer)
            opt_state = opt_state._replace(optimizer=optimizer_state)
        return FedAvgState(params, opt_state, state.round + 1,
                           _round_metrics(weights, losses, steps, mean_delta, **dp_metrics))

    def predict(state: FedAvgState, batch: ClientBatch) -> jax.Array:
        return predict_with(model, state.params, batch.x)

    return Algorithm(init=init, round=round_fn, predict=predict)


def _use_factored(dense_update, model, client_optimizer, local_regularizer, aggregator,
                  attack, dp) -> bool:
    if dense_update not in DENSE_UPDATES:
        raise ValueError(f"dense_update {dense_update!r} is unknown; "
                         f"allowed: {', '.join(DENSE_UPDATES)}")
    if dense_update == "per_client":
        return False
    reason = unsupported_reason(model, client_optimizer, local_regularizer)
    if reason is None and (aggregator is not weighted_mean or attack is not None):
        reason = "the server aggregates with a robust aggregator or under attack"
    if reason is None and dp is not None:
        reason = "DP clips each client's delta, which the factored update never forms"
    if dense_update == "factored" and reason is not None:
        raise ValueError(f"dense_update='factored' cannot run exactly here: {reason}")
    return reason is None


def predict_with(model: Model, params: PyTree, x: jax.Array) -> jax.Array:
    """Logits `[C, N, classes]` (`[C, N, T, classes]` for sequences) of one shared model on
    every client's examples `[C, N, ...]`."""
    num_clients, num_examples = x.shape[:2]
    logits = model.apply(params, x.reshape((num_clients * num_examples,) + x.shape[2:]))
    return logits.reshape((num_clients, num_examples) + logits.shape[1:])


def _empty_round_metrics(params, dp_metrics: dict) -> dict[str, jax.Array]:
    """The metrics of a round without clients, the initial state's."""
    return _round_metrics(jnp.zeros(0), jnp.zeros(0), jnp.zeros(0, jnp.int32),
                          optax.tree.zeros_like(params), **dp_metrics)


def _round_metrics(weights, losses, steps, mean_delta, **dp_metrics) -> dict[str, jax.Array]:
    """The round's metrics plus the aggregated clients' `local_steps`, the `update_norm` and,
    under DP, the aggregation's (`fedjax_lab.privacy.aggregation.METRICS`).

    Every cohort client downloads the model; only aggregated clients' models count as uploaded
    (a dropped straggler's work never arrives).
    """
    return round_metrics(
        weights, losses, **model_exchange_bytes(weights, mean_delta),
        local_steps=jnp.sum(jnp.where(weights > 0, steps, 0)).astype(jnp.int32),
        update_norm=optax.tree.norm(mean_delta).astype(jnp.result_type(float)), **dp_metrics)


SPECS = (AlgorithmSpec(
    "fedavg", FedAvgConfig, build,
    paper="McMahan et al., Communication-Efficient Learning of Deep Networks from Decentralized "
          "Data, AISTATS 2017, arXiv 1602.05629",
    summary="local SGD, server averages the deltas (FedSGD: client.epochs 1, batch_size none; "
            "FedAdam/FedYogi: server.optimizer)",
    trains_model_state=True),)
