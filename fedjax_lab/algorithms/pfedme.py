"""pFedMe: personal models as Moreau envelopes of the clients' losses around the global model.

Reference:
    T. Dinh, Tran, Nguyen. "Personalized Federated Learning with Moreau Envelopes." NeurIPS 2020,
    arXiv 2006.08848 (Algorithm 1; reference code CharlieDinh/pFedMe).

Update: a sampled client copies the global model into its local model w_i and its personal model
theta_i; for each local step on a minibatch D it solves the personal problem approximately by K
gradient steps of rate `personal_lr`,
    theta_i <- theta_i - personal_lr (grad f_i(theta_i; D) + lam (theta_i - w_i))   (K times),
then moves its local model toward it, w_i <- w_i - eta lam (w_i - theta_i) (the gradient of the
Moreau envelope at w_i). The server steps w <- (1 - beta) w + beta sum_i p_i w_i. A client
predicts with its personal model theta_i from the last round it trained (the initial model before).

Built on local training's minibatch schedule (`batch_schedule`: every epoch reshuffled, padded
examples never drawn, a short client takes fewer effective steps), with the inner solver in the
step; FedAvg's weights and reduction average the w_i.

Pitfalls avoided: theta carries over from step to step within a round (the reference's
personalised model), starting from the global model each round; the inner solver keeps the
minibatch of its outer step; the server's beta mixes with the previous global model (beta = 1 is
plain averaging of the local models); the personal model the clients predict with is theta_i,
not w_i.
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_lab.algorithms.fedavg import predict_with
from fedjax_lab.algorithms.spec import AlgorithmSpec
from fedjax_lab.core import (Algorithm, ClientBatch, ClientExecution, client_weights,
                             model_loss, scatter_clients)
from fedjax_lab.core.aggregation import WEIGHTINGS, check_weighting
from fedjax_lab.core.communication import model_exchange_bytes
from fedjax_lab.core.local_training import batch_schedule
from fedjax_lab.core.losses import split_loss
from fedjax_lab.core.metrics import initial_metrics, round_metrics
from fedjax_lab.core.personal_models import check_num_clients, predict_per_client, replicate
from fedjax_lab.core.types import DataInfo
from fedjax_lab.core.validation import check_number, check_positive_int
from fedjax_lab.models import Model
from fedjax_lab.options import (non_negative, one_of, option, optional_positive_int, positive,
                                positive_int)

PyTree = Any


@dataclasses.dataclass(frozen=True)
class PFedMeConfig:
    """pFedMe's options: the paper's MNIST setting (lam 15, K = 5, personal rate 0.09, local rate
    0.005, 20 local rounds of batch 20, beta 1)."""

    lr: float = option(0.005, "local rate eta of w_i", positive, sweepable=True)
    personal_lr: float = option(0.09, "inner solver's rate on theta_i", positive, sweepable=True)
    lam: float = option(15.0, "Moreau-envelope coefficient lambda", non_negative, sweepable=True)
    inner_steps: int = option(5, "inner solver's steps K per local step", positive_int)
    beta: float = option(1.0, "server mixing beta (1: the average of the local models)",
                         positive, sweepable=True)
    local_steps: int = option(20, "local steps R (epochs of minibatches, as E)", positive_int)
    batch_size: int | None = option(20, "examples per local step; none = full batch",
                                    optional_positive_int)
    weighting: str = option("num_examples", "weights p_i of the average", one_of(*WEIGHTINGS))


def build(config: PFedMeConfig, model: Model, data: DataInfo,
          execution: ClientExecution = ClientExecution()) -> Algorithm:
    return pfedme(model, num_clients=data.num_clients, lr=config.lr,
                  personal_lr=config.personal_lr, lam=config.lam, inner_steps=config.inner_steps,
                  beta=config.beta, num_epochs=config.local_steps, batch_size=config.batch_size,
                  weighting=config.weighting, execution=execution)


class PFedMeClientState(NamedTuple):
    """Attributes: personal, each client's theta_i (leaves `[num_clients, ...]`)."""

    personal: PyTree


class PFedMeState(NamedTuple):
    """Attributes: params (the global model w), round, metrics, client_states."""

    params: PyTree
    round: jax.Array
    metrics: dict[str, jax.Array]
    client_states: PFedMeClientState


def pfedme(model: Model, *, num_clients: int, lr: float = 0.005, personal_lr: float = 0.09,
           lam: float = 15.0, inner_steps: int = 5, beta: float = 1.0, num_epochs: int = 20,
           batch_size: int | None = 20, weighting: str = "num_examples",
           execution: ClientExecution = ClientExecution()) -> Algorithm:
    """Builds pFedMe.

    Args:
        model: the `(init, apply)` model trained with softmax cross-entropy.
        num_clients: the population size (personal models are stacked over it).
        lr: the local model's rate eta.
        personal_lr: the inner solver's rate.
        lam: the Moreau-envelope coefficient lambda (>= 0).
        inner_steps: the inner solver's gradient steps K per local step.
        beta: the server's mixing weight (> 0).
        num_epochs: passes over the client's minibatches per round (the paper's R local rounds
            are `num_epochs * ceil(n_i / B)` steps here).
        batch_size: local batch B; None is the full batch.
        weighting: weights of the average, "num_examples" or "uniform".
        execution: how clients run (vmap, chunked, sequential, unrolled, sharded).

    Returns:
        An `Algorithm` whose state is `PFedMeState`; `predict` uses each client's theta_i,
        `predict_global` the global model.
    """
    check_num_clients(num_clients)
    check_positive_int("inner_steps", inner_steps)
    check_positive_int("num_epochs", num_epochs)
    if batch_size is not None:
        check_positive_int("batch_size", batch_size)
    for name, value in (("lr", lr), ("personal_lr", personal_lr), ("beta", beta)):
        check_number(name, value, "> 0", lambda v: v > 0)
    check_number("lam", lam, ">= 0", lambda v: v >= 0)
    check_weighting(weighting)
    base_loss = model_loss(model.apply)

    def data_loss(theta, x, y, mask, key):
        return split_loss(base_loss(theta, x, y, mask, key))[0]

    def envelope_rate(like):
        # lr * lam as one product in the parameters' dtype: XLA would otherwise fold two
        # Python constants into one before multiplying, and a traced (swept) lr or lam not.
        return jnp.asarray(lr, like.dtype) * jnp.asarray(lam, like.dtype)

    def client_train(global_params, x, y, mask, rng):
        schedule = batch_schedule(mask, rng, num_epochs=num_epochs, batch_size=batch_size)

        def step(carry, step_index):
            local, theta, loss_sum = carry
            indices, batch_mask, key, active = schedule.at(step_index)
            xb, yb = x[indices], y[indices]

            def inner(theta, _):
                # grad of f(theta) + (lam / 2) ||theta - w_i||^2, the envelope's part by hand.
                loss, grads = jax.value_and_grad(data_loss)(theta, xb, yb, batch_mask, key)
                return jax.tree.map(lambda t, g, w: t - personal_lr * (g + lam * (t - w)),
                                    theta, grads, local), loss

            new_theta, losses = jax.lax.scan(inner, theta, None, length=inner_steps)
            new_local = jax.tree.map(lambda w, t: w - envelope_rate(w) * (w - t), local,
                                     new_theta)
            keep = lambda new, old: jnp.where(active, new, old)
            return (jax.tree.map(keep, new_local, local), jax.tree.map(keep, new_theta, theta),
                    loss_sum + jnp.where(active, losses[0], 0)), active

        loss_dtype = jnp.result_type(*jax.tree.leaves(global_params))
        (local, theta, loss_sum), active = jax.lax.scan(
            step, (global_params, global_params, jnp.zeros((), loss_dtype)),
            jnp.arange(schedule.num_steps))
        steps = jnp.sum(active, dtype=jnp.int32)
        return local, theta, loss_sum / jnp.maximum(steps, 1).astype(loss_dtype)

    def init(key: jax.Array) -> PFedMeState:
        params = model.init(key)
        empty = jnp.zeros(0)
        return PFedMeState(params, jnp.zeros((), jnp.int32),
                           initial_metrics(_round_metrics, empty, empty, params),
                           PFedMeClientState(replicate(params, num_clients)))

    def round_fn(state: PFedMeState, batch: ClientBatch) -> PFedMeState:
        global_params = state.params
        weights = client_weights(batch.num_examples, weighting=weighting)

        def client_update(client):
            local, theta, loss = client_train(global_params, *client)
            return local, (theta, loss)

        mean_local, (personal, losses) = execution.map_reduce(
            client_update, (batch.x, batch.y, batch.mask, batch.rng), weights)
        # A cohort with no real client leaves w unchanged (its weights, and so the mean, are 0).
        anyone = jnp.sum(weights) > 0
        params = jax.tree.map(
            lambda w, mean: jnp.where(anyone, (1 - beta) * w + beta * mean, w),
            global_params, mean_local)
        client_states = scatter_clients(state.client_states, batch.client_ids,
                                        PFedMeClientState(personal),
                                        valid=batch.num_examples > 0)
        return PFedMeState(params, state.round + 1,
                           _round_metrics(weights, losses, global_params),
                           client_states)

    def predict(state: PFedMeState, batch: ClientBatch) -> jax.Array:
        return predict_per_client(model.apply, execution, state.client_states.personal, batch)

    def predict_global(state: PFedMeState, batch: ClientBatch) -> jax.Array:
        return predict_with(model, state.params, batch.x)

    return Algorithm(init=init, round=round_fn, predict=predict, predict_global=predict_global)


def _round_metrics(weights, losses, params: PyTree) -> dict[str, jax.Array]:
    """The round's metrics: each cohort client receives w, each participant sends its model."""
    return round_metrics(weights, losses, **model_exchange_bytes(weights, params))


SPECS = (AlgorithmSpec(
    "pfedme", PFedMeConfig, build,
    paper="T. Dinh, Tran, Nguyen, Personalized Federated Learning with Moreau Envelopes, "
          "NeurIPS 2020, arXiv 2006.08848",
    summary="personal models theta_i solving f_i(theta) + (lam/2)||theta - w_i||^2 by K inner "
            "steps; local models move toward them; the server mixes with beta"),)
