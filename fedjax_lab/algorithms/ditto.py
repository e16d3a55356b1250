"""Ditto: FedAvg's global model plus a personal model per client, pulled toward the global one.

References:
    Li, Hu, Beirami, Smith. "Ditto: Fair and Robust Federated Learning Through
    Personalization." ICML 2021, arXiv 2012.04221 (reference code: litian96/ditto).

Update: the global model is trained exactly as FedAvg (sampled client i trains w_i from w_t; the
server averages). Each sampled client also updates its personal model, anchored at the round-start
global model w_t:
    v_i <- v_i - eta (grad l(v_i; batch) + lam (v_i - w_t)),   v_i starting at w_0.

Built by composition: the round is `fedavg`'s round for w, plus a personal `local_train` whose
loss closure adds FedProx's `proximal_term(lam)` anchored at w_t. Personal models live in
`client_states`, stacked over the whole population and gathered/scattered by client id.

Schedules. The reference interleaves, for each local iteration, one personal step and one global
step on the same minibatch. Neither step reads the other's parameters, so the interleaving is
fully described by the minibatches: "interleaved" trains the personal model with the client's
round key itself (the global training's shuffles, step count and straggler epochs); "sequential"
(FedRep-style phases, plato PR #320) gives it an independent key stream and `personal_epochs`.

Per-client lam: given a sequence, each sampled client trains one candidate personal model per
value and keeps the one with the lowest loss on its validation examples (the reference's grid
{0.1, 1, 2}). As in the reference, the first int((1 - f) n_i) training examples train the
personal model and the rest validate it; the global model still sees all of them, so FedAvg is
unchanged. The reference picks lam greedily at every step; here it is picked once per round.

Pitfalls avoided (ALGORITHMS.md section 7f): the anchor is w_t, not the client's in-progress
global copy (PFLlib#57); lam has no silent 0 default (PFLlib's `mu`); personal models never
influence w, which the tests check as "Ditto's global trajectory equals FedAvg's bit for bit".
"""

import dataclasses
from fractions import Fraction
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.algorithms.fedavg import (FedAvgConfig, FedAvgState, fedavg, fedavg_options,
                                          predict_with)
from fedjax_lab.algorithms.fedprox import proximal_term
from fedjax_lab.algorithms.spec import AlgorithmSpec
from fedjax_lab.core import (Algorithm, ClientBatch, ClientExecution, client_weights,
                             gather_clients, local_train, model_loss, sample_stragglers,
                             scatter_clients)
from fedjax_lab.core.personal_models import check_num_clients, predict_per_client, replicate
from fedjax_lab.core.types import DataInfo
from fedjax_lab.core.validation import check_number, check_positive_int, is_scalar
from fedjax_lab.models import Model
from fedjax_lab.options import (OptionError, non_negative, one_of, open_fraction, option,
                                optional_positive_int)

PyTree = Any
SCHEDULES = ("interleaved", "sequential")
REFERENCE_LAMBDA_GRID = (0.1, 1.0, 2.0)
# Sub-stream of a client's round key for the sequential schedule's personal shuffles; the global
# training uses the key's own ClientStream sub-streams, so the two never coincide.
_PERSONAL_STREAM = 101


def _non_negative_entries(grid) -> str | None:
    return None if all(value >= 0 for value in grid) else "expected lams >= 0"


@dataclasses.dataclass(frozen=True)
class DittoConfig(FedAvgConfig):
    """FedAvg's options for the global model plus Ditto's. lam = 1, SGD 0.05 and the interleaved
    schedule are the reference's (litian96/ditto, Fashion-MNIST script). Local training is FedAvg's
    default job (E = 5, B = 10), not the reference's 2 iterations of 16 examples, which barely move
    a model in a default run's 5 rounds (digits, 5 rounds: train loss 2.06 against 0.76), so the
    default Ditto's global model is the default FedAvg. The reference samples clients in
    proportion to n_i and averages uniformly; the library samples uniformly, so the global model
    averages with p_i proportional to n_i (FedAvg's default), the same in expectation."""

    lam: float = option(1.0, "lam of the personal proximal term (0 = local training)",
                        non_negative, sweepable=True)
    lam_grid: tuple[float, ...] = option((), "per-client lam: candidates each client picks from "
                                         "by validation loss (reference 0.1, 1, 2); replaces lam "
                                         "when set", _non_negative_entries)
    validation_fraction: float = option(0.1, "fraction of each client's examples that "
                                        "validates the lam_grid candidates", open_fraction)
    schedule: str = option("interleaved", "interleaved (the reference: personal and global "
                           "steps share minibatches) or sequential (a separate personal phase)",
                           one_of(*SCHEDULES))
    personal_epochs: int | None = option(None, "epochs of the sequential personal phase; none = "
                                         "client.epochs", optional_positive_int)

    def check(self) -> None:
        super().check()
        if self.personal_epochs is not None and self.schedule != "sequential":
            raise OptionError("personal_epochs", self.personal_epochs,
                              "only the sequential schedule has a personal phase of its own; "
                              "the interleaved personal model runs client.epochs")


def build(config: DittoConfig, model: Model, data: DataInfo,
          execution: ClientExecution = ClientExecution()) -> Algorithm:
    # Poisson cohorts wrap the whole round: unsampled clients train no personal model either.
    return config.dp.sampled(ditto(model, config.client.optimizer(), num_clients=data.num_clients,
                                   lam=config.lam_grid or config.lam, schedule=config.schedule,
                                   personal_epochs=config.personal_epochs,
                                   validation_fraction=config.validation_fraction,
                                   **fedavg_options(config, execution)), data)


class DittoClientState(NamedTuple):
    """Attributes: personal_params (v_i); lam, the lam of each client's latest personal update."""

    personal_params: PyTree
    lam: jax.Array


class DittoState(NamedTuple):
    """FedAvg's fields for the global model, plus `client_states` over the whole population.

    Attributes: params (global w), opt_state (server optimiser), round, metrics, client_states
    (a `DittoClientState` with leaves `[num_clients, ...]`).
    """

    params: PyTree
    opt_state: PyTree
    round: jax.Array
    metrics: dict[str, jax.Array]
    client_states: DittoClientState


def ditto(model: Model, client_optimizer: optax.GradientTransformation, *, num_clients: int,
          lam: float | Sequence[float] = 1.0, schedule: str = "interleaved",
          personal_optimizer: optax.GradientTransformation | None = None,
          personal_epochs: int | None = None, validation_fraction: float = 0.1,
          num_epochs: int = 1, batch_size: int | None = 10, straggler_fraction: float = 0.0,
          execution: ClientExecution = ClientExecution(), unroll: int = 1,
          **fedavg_options) -> Algorithm:
    """Builds Ditto.

    Args:
        model: the `(init, apply)` model, shared by the global and the personal models.
        client_optimizer: optax optimiser of the global model's local training.
        num_clients: the population size (personal models are stacked over it).
        lam: lam >= 0 of the personal proximal term (lam = 0 is local training), or a sequence
            of candidates each client chooses from by validation loss (`REFERENCE_LAMBDA_GRID`).
        schedule: "interleaved" (the reference: personal and global steps share minibatches) or
            "sequential" (a separate personal phase with its own shuffles).
        personal_optimizer: optax optimiser of the personal model; default `client_optimizer`.
        personal_epochs: epochs of the sequential personal phase; default `num_epochs`.
        validation_fraction: fraction f of each client's examples held out to choose lam
            (only with a sequence of lam), in (0, 1); the reference uses 0.1.
        num_epochs: local epochs E of the global model (and of the interleaved personal model).
        batch_size: local batch B; None is the full batch.
        straggler_fraction: FedProx's stragglers; an interleaved personal model runs the same
            epochs as its global copy, a sequential one its full `personal_epochs`.
        execution: how clients run (vmap, chunked, sequential, unrolled).
        unroll: unroll factor of the local step loops.
        **fedavg_options: the rest of `fedavg`'s options for the global model (server_optimizer,
            weighting, straggler_policy, local_regularizer).

    Returns:
        An `Algorithm` whose state is `DittoState`; `predict` uses each client's personal model,
        `predict_global` the global one.
    """
    check_num_clients(num_clients)
    lam_grid = _check_lam(lam)
    global_algorithm = fedavg(model, client_optimizer, num_epochs=num_epochs,
                              batch_size=batch_size, straggler_fraction=straggler_fraction,
                              execution=execution, unroll=unroll, **fedavg_options)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is unknown; allowed: {', '.join(SCHEDULES)}")
    if personal_epochs is not None and schedule != "sequential":
        raise ValueError(f"personal_epochs={personal_epochs!r} is only for schedule='sequential'"
                         "; the interleaved personal model runs the global model's epochs")
    personal_epochs = num_epochs if personal_epochs is None else personal_epochs
    check_positive_int("personal_epochs", personal_epochs)
    if lam_grid is not None and not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction={validation_fraction!r} is invalid; "
                         "expected 0 < f < 1")
    personal_optimizer = client_optimizer if personal_optimizer is None else personal_optimizer
    train_fraction = Fraction(1.0 - validation_fraction).limit_denominator(1000)
    base_loss = model_loss(model.apply)
    initial_lam = lam_grid[0] if lam_grid is not None else lam

    def init(key: jax.Array) -> DittoState:
        global_state = global_algorithm.init(key)
        dtype = jnp.result_type(float)
        # Personal models start at w_0, as in the reference.
        client_states = DittoClientState(replicate(global_state.params, num_clients),
                                         jnp.full((num_clients,), initial_lam, dtype))
        metrics = {**global_state.metrics, "personal_train_loss": jnp.zeros((), dtype),
                   "lam_mean": jnp.zeros((), dtype)}
        return DittoState(global_state.params, global_state.opt_state, global_state.round,
                          metrics, client_states)

    def personal_train(v, anchor, lam_value, x, y, mask, rng, epochs):
        def loss_fn(params, xb, yb, mb, key):
            return base_loss(params, xb, yb, mb, key) + proximal_term(lam_value)(params, anchor)

        if schedule == "interleaved":
            return local_train(loss_fn, personal_optimizer, v, x, y, mask, rng,
                               num_epochs=num_epochs, batch_size=batch_size,
                               active_epochs=epochs, unroll=unroll)
        return local_train(loss_fn, personal_optimizer, v, x, y, mask,
                           jax.random.fold_in(rng, _PERSONAL_STREAM), num_epochs=personal_epochs,
                           batch_size=batch_size, unroll=unroll)

    def personal_update(anchor, client):
        v, lam_i, x, y, mask, rng, epochs = client
        if lam_grid is None:
            result = personal_train(v, anchor, lam, x, y, mask, rng, epochs)
            return result.params, result.mean_loss, lam_i
        train_mask, validation_mask = _validation_split(mask, train_fraction)

        def candidate(lam_value):
            result = personal_train(v, anchor, lam_value, x, y, train_mask, rng, epochs)
            return result, base_loss(result.params, x, y, validation_mask, None)

        # lax.map, not vmap: candidates run one after another, like clients under "sequential".
        results, validation_losses = jax.lax.map(candidate, jnp.asarray(lam_grid, lam_i.dtype))
        best = jnp.argmin(validation_losses)
        chosen = jax.tree.map(lambda leaf: leaf[best], results)
        return chosen.params, chosen.mean_loss, jnp.asarray(lam_grid, lam_i.dtype)[best]

    def round_fn(state: DittoState, batch: ClientBatch) -> DittoState:
        anchor = state.params
        global_state = global_algorithm.round(
            FedAvgState(state.params, state.opt_state, state.round, {}), batch)
        # The same per-client draw FedAvg made, so interleaved personal steps match its epochs.
        stragglers = sample_stragglers(batch.rng, num_epochs=num_epochs,
                                       fraction=straggler_fraction)
        cohort = gather_clients(state.client_states, batch.client_ids)
        personal, losses, lams = execution.map(
            lambda client: personal_update(anchor, client),
            (cohort.personal_params, cohort.lam, batch.x, batch.y, batch.mask, batch.rng,
             stragglers.epochs))
        has_data = batch.num_examples > 0
        client_states = scatter_clients(state.client_states, batch.client_ids,
                                        DittoClientState(personal, lams), valid=has_data)
        weights = client_weights(batch.num_examples)
        dtype = jnp.result_type(float)
        metrics = {
            **global_state.metrics,
            "personal_train_loss": jnp.sum(weights * losses).astype(dtype),
            "lam_mean": (jnp.sum(jnp.where(has_data, lams, 0))
                         / jnp.maximum(jnp.sum(has_data), 1)).astype(dtype),
        }
        return DittoState(global_state.params, global_state.opt_state, global_state.round,
                          metrics, client_states)

    def predict(state: DittoState, batch: ClientBatch) -> jax.Array:
        return predict_per_client(model.apply, execution, state.client_states.personal_params,
                                  batch)

    def predict_global(state: DittoState, batch: ClientBatch) -> jax.Array:
        return predict_with(model, state.params, batch.x)

    return Algorithm(init=init, round=round_fn, predict=predict, predict_global=predict_global)


def _check_lam(lam) -> tuple[float, ...] | None:
    """The grid of candidates when `lam` is a sequence, None when it is one value."""
    if is_scalar(lam):
        check_number("lam", lam, "lam >= 0 or a sequence of them", lambda value: value >= 0)
        return None
    grid = tuple(lam) if isinstance(lam, Sequence) else ()
    if not grid or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0
                       for v in grid):
        raise ValueError(f"lam={lam!r} is invalid; expected lam >= 0 or a non-empty sequence "
                         "of them")
    return tuple(float(v) for v in grid)


def _validation_split(mask: jax.Array, train_fraction: Fraction):
    """(train mask, validation mask): the first max(1, int(p n)) real examples train.

    A client with a single example validates on it (it has nothing to hold out).
    """
    rank = jnp.cumsum(mask) - 1
    num_real = jnp.sum(mask, dtype=jnp.int32)
    num_train = jnp.maximum(num_real * train_fraction.numerator // train_fraction.denominator, 1)
    held_out = mask & (rank >= num_train)
    has_held_out = jnp.any(held_out)
    return mask & ~held_out, jnp.where(has_held_out, held_out, mask)


SPECS = (AlgorithmSpec(
    "ditto", DittoConfig, build,
    paper="Li, Hu, Beirami, Smith, Ditto: Fair and Robust Federated Learning Through "
          "Personalization, ICML 2021, arXiv 2012.04221",
    summary="FedAvg's global model plus a personal model per client pulled to it by "
            "(lam/2)||v - w_t||^2",
    trains_model_state=True),)
