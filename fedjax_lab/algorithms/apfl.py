"""APFL: each client mixes a personal model with the global one, alpha_i learned or fixed.

Reference:
    Deng, Kamani, Mahdavi. "Adaptive Personalized Federated Learning." arXiv 2003.13461, 2020
    (Algorithm 1).

Update: a sampled client trains its copy w_i of the global model as FedAvg does and, on the same
minibatches, its personal model v_i through the mixture vbar_i = alpha_i v_i + (1 - alpha_i) w_i:
    w_i <- w_i - eta grad f_i(w_i)
    v_i <- v_i - eta grad_v f_i(vbar_i) = v_i - eta alpha_i grad f_i(vbar_i)
    alpha_i <- alpha_i - eta_alpha <v_i - w_i, grad f_i(vbar_i)>     (adaptive alpha only)
The server averages the w_i as FedAvg; a client predicts with vbar_i = alpha_i v_i +
(1 - alpha_i) w, with the latest global model w. alpha = 0 is FedAvg's global model, alpha = 1
trains each v_i alone (Local).

Built by composition: one `local_train` over (w_i, v_i, alpha_i) with the loss
f(w_i) + f(alpha_i v_i + (1 - alpha_i) sg(w_i)), whose gradient in w_i is FedAvg's alone (sg: stop
gradient), and FedAvg's weights, reduction and server step. v_i and alpha_i live in
`client_states`, stacked over the whole population (v_i starting at w_0, alpha_i at `alpha`).

Learned alpha can collapse to FedAvg: within a round w_i trains at the full rate and v_i at alpha
times it, so the mixture's gradient tends to favour w_i. Measured on the default digits job (seed
0, 60 rounds): the participants' mean alpha fell from 0.25 to 0.046 with E = 1 and to 0.002 with
E = 5, and in experiments/personalization_table.py APFL ends equal to FedAvg. `alpha_lr 0` holds
a chosen mix.

Pitfalls avoided: the personal step is the gradient at the mixture, not at v_i; w_i's steps never
see v_i (so the global model is FedAvg's bit for bit); alpha is projected back to [0, 1] after each
round's local training (it is a mixing weight); the personal model predicts with the latest global
model, not the client's stale copy.
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.algorithms.fedavg import predict_with
from fedjax_lab.algorithms.spec import AlgorithmSpec, ClientTraining
from fedjax_lab.core import (Algorithm, ClientBatch, ClientExecution, client_weights,
                             gather_clients, local_train, model_loss, scatter_clients,
                             server_update)
from fedjax_lab.core.aggregation import WEIGHTINGS, check_weighting
from fedjax_lab.core.communication import model_exchange_bytes
from fedjax_lab.core.metrics import initial_metrics, round_metrics
from fedjax_lab.core.personal_models import check_num_clients, replicate
from fedjax_lab.core.types import DataInfo
from fedjax_lab.core.validation import check_number, check_positive_int
from fedjax_lab.models import Model
from fedjax_lab.options import fraction, non_negative, one_of, option

PyTree = Any


@dataclasses.dataclass(frozen=True)
class APFLConfig:
    """APFL's options: alpha starting at 0.25 and learned at rate 0.01 (the paper's adaptive
    setting starts alpha at 0.01-0.5 and tunes its rate); FedAvg's default local job (SGD 0.05,
    E = 5, B = 10) and sample weights."""

    client: ClientTraining = option(ClientTraining(lr=0.05, epochs=5, batch_size=10),
                                    "local training (plain SGD for w, v and alpha)")
    alpha: float = option(0.25, "initial (or fixed) mixing weight alpha_i", fraction,
                          sweepable=True)
    alpha_lr: float = option(0.01, "alpha's learning rate eta_alpha; 0: alpha fixed",
                             non_negative, sweepable=True)
    weighting: str = option("num_examples", "weights p_i of the global average",
                            one_of(*WEIGHTINGS))


def build(config: APFLConfig, model: Model, data: DataInfo,
          execution: ClientExecution = ClientExecution()) -> Algorithm:
    return apfl(model, config.client.lr, num_clients=data.num_clients, alpha=config.alpha,
                alpha_lr=config.alpha_lr, num_epochs=config.client.epochs,
                batch_size=config.client.batch_size, weighting=config.weighting,
                execution=execution)


class APFLClientState(NamedTuple):
    """Attributes: personal (each client's v_i, leaves `[num_clients, ...]`), alpha
    (`[num_clients]`)."""

    personal: PyTree
    alpha: jax.Array


class APFLState(NamedTuple):
    """Attributes: params (the global model w), round, metrics, client_states."""

    params: PyTree
    round: jax.Array
    metrics: dict[str, jax.Array]
    client_states: APFLClientState


def mixture(alpha, personal: PyTree, global_params: PyTree) -> PyTree:
    """alpha v + (1 - alpha) w, leaf by leaf."""
    return jax.tree.map(lambda v, w: alpha * v + (1 - alpha) * w, personal, global_params)


def apfl(model: Model, learning_rate: float, *, num_clients: int, alpha: float = 0.25,
         alpha_lr: float = 0.01, num_epochs: int = 1, batch_size: int | None = 10,
         weighting: str = "num_examples", execution: ClientExecution = ClientExecution(),
         unroll: int = 1) -> Algorithm:
    """Builds APFL.

    Args:
        model: the `(init, apply)` model trained with softmax cross-entropy.
        learning_rate: the clients' SGD step size eta for w_i and v_i.
        num_clients: the population size (v_i and alpha_i are stacked over it).
        alpha: each client's initial mixing weight, in [0, 1].
        alpha_lr: alpha's step size; 0 keeps alpha fixed.
        num_epochs: local epochs E.
        batch_size: local batch B; None is the full batch.
        weighting: weights of the global average, "num_examples" or "uniform".
        execution: how clients run (vmap, chunked, sequential, unrolled, sharded).
        unroll: unroll factor of the local step loop.

    Returns:
        An `Algorithm` whose state is `APFLState`; `predict` is each client's mixture,
        `predict_global` the global model.
    """
    check_num_clients(num_clients)
    check_positive_int("num_epochs", num_epochs)
    if batch_size is not None:
        check_positive_int("batch_size", batch_size)
    check_number("learning_rate", learning_rate, "> 0", lambda value: value > 0)
    check_number("alpha", alpha, "0 <= alpha <= 1", lambda value: 0 <= value <= 1)
    check_number("alpha_lr", alpha_lr, ">= 0", lambda value: value >= 0)
    check_weighting(weighting)
    base_loss = model_loss(model.apply)
    # One SGD over (w_i, v_i, alpha_i), alpha at its own rate.
    optimizer = optax.multi_transform(
        {"models": optax.sgd(learning_rate), "alpha": optax.sgd(alpha_lr)},
        lambda params: (jax.tree.map(lambda _: "models", params[0]),
                        jax.tree.map(lambda _: "models", params[1]), "alpha"))
    averaging = optax.sgd(1.0)

    def loss_fn(params, x, y, mask, rng):
        own, personal, alpha_i = params
        mixed = mixture(alpha_i, personal, jax.lax.stop_gradient(own))
        return base_loss(own, x, y, mask, rng) + base_loss(mixed, x, y, mask, rng)

    def init(key: jax.Array) -> APFLState:
        params = model.init(key)
        client_states = APFLClientState(replicate(params, num_clients),
                                        jnp.full((num_clients,), alpha, jnp.result_type(float)))
        empty = jnp.zeros(0)
        return APFLState(params, jnp.zeros((), jnp.int32),
                         initial_metrics(_round_metrics, empty, empty, empty, params),
                         client_states)

    def round_fn(state: APFLState, batch: ClientBatch) -> APFLState:
        global_params = state.params
        weights = client_weights(batch.num_examples, weighting=weighting)

        def client_update(client):
            x, y, mask, rng, personal, alpha_i = client
            result = local_train(loss_fn, optimizer, (global_params, personal, alpha_i), x, y,
                                 mask, rng, num_epochs=num_epochs, batch_size=batch_size,
                                 unroll=unroll)
            own, personal, alpha_i = result.params
            return optax.tree.sub(global_params, own), (personal, jnp.clip(alpha_i, 0, 1),
                                                        result.mean_loss)

        cohort = gather_clients(state.client_states, batch.client_ids)
        mean_delta, (personal, alphas, losses) = execution.map_reduce(
            client_update, (batch.x, batch.y, batch.mask, batch.rng, cohort.personal,
                            cohort.alpha), weights)
        params, _ = server_update(global_params, averaging.init(global_params), mean_delta,
                                  averaging)
        client_states = scatter_clients(state.client_states, batch.client_ids,
                                        APFLClientState(personal, alphas),
                                        valid=batch.num_examples > 0)
        return APFLState(params, state.round + 1,
                         _round_metrics(weights, losses, alphas, mean_delta), client_states)

    def predict(state: APFLState, batch: ClientBatch) -> jax.Array:
        cohort = gather_clients(state.client_states, batch.client_ids)
        return execution.map(
            lambda client: model.apply(mixture(client[1], client[0], state.params), client[2]),
            (cohort.personal, cohort.alpha, batch.x))

    def predict_global(state: APFLState, batch: ClientBatch) -> jax.Array:
        return predict_with(model, state.params, batch.x)

    return Algorithm(init=init, round=round_fn, predict=predict, predict_global=predict_global)


def _round_metrics(weights, losses, alphas, mean_delta) -> dict[str, jax.Array]:
    """The round's metrics: `train_loss` is the sum of the global and the mixture's losses,
    `mean_alpha` the participants' mean alpha after the round."""
    dtype = jnp.result_type(float)
    taking_part = (weights > 0).astype(dtype)
    return round_metrics(
        weights, losses, **model_exchange_bytes(weights, mean_delta),
        mean_alpha=(jnp.sum(taking_part * alphas) / jnp.maximum(jnp.sum(taking_part), 1)
                    ).astype(dtype))


SPECS = (AlgorithmSpec(
    "apfl", APFLConfig, build,
    paper="Deng, Kamani, Mahdavi, Adaptive Personalized Federated Learning, arXiv 2003.13461",
    summary="FedAvg's global model plus a personal model per client, predicting with their "
            "mixture alpha_i v_i + (1 - alpha_i) w; alpha_i learned or fixed"),)
