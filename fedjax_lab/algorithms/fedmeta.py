"""FedMeta: federated meta-learning with MAML, first-order MAML and Meta-SGD.

References:
    Chen, Luo, Dong, Li, He. "Federated Meta-Learning with Fast Convergence and Efficient
    Communication." arXiv 1802.07876.
    Finn, Abbeel, Levine. "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks."
    ICML 2017, arXiv 1703.03400. Li, Zhou, Chen, Li. "Meta-SGD." arXiv 1707.09835.

Update: each sampled client splits its examples into a support set S and a query set Q, adapts
theta' = theta - alpha (*) grad L_S(theta) (K steps) and returns g_i = d L_Q(theta') / d theta
(and d / d alpha for Meta-SGD); the server steps (theta, alpha) with its optax optimiser (Adam in
the Flower reproduction) on the mean of the g_i. A client is evaluated by adapting on its support
set with the same inner rule and predicting its query set: `adapted_predict`, which the
evaluation feeds a client's training data as support and its test data as query (or an unseen
client's support and query sets); `predict` is the meta-model theta itself, never adapted on the
examples it scores.

Variants: "maml" differentiates through the inner steps (exact second order, `jax.grad` of the
composed function); "fomaml" is the same function with the inner gradients stop-gradiented;
"meta_sgd" learns a per-parameter alpha, initialised to `inner_lr`. `remat=True` recomputes the
inner steps in the meta-backward pass instead of storing their activations, and a chunked
`execution` bounds how many clients' meta-gradients are in memory at once (benchmarks/
META_MEMORY.md: MAML with 5 inner steps, 8 clients, 74.8 MiB of XLA scratch with vmap, 36.1 MiB
rematerialised, 11.4 MiB rematerialised in chunks of 2 clients; FOMAML 13.6 MiB).

Pitfalls avoided (ALGORITHMS.md section 10f): silently first-order MAML; the same batch for
support and query (one permutation cut in two); evaluating on clients seen in meta-training
(`core.meta.split_clients` holds clients out; `predict` never adapts on the batch it
scores); no BatchNorm statistics in the inner loop (the
models here have none).
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.algorithms.fedavg import FedAvgConfig, fedavg, fedavg_options, predict_with
from fedjax_lab.algorithms.spec import AlgorithmSpec, ServerOptimizer
from fedjax_lab.core import Algorithm, ClientBatch, ClientExecution, client_weights
from fedjax_lab.core import server_update, weighted_mean
from fedjax_lab.core.aggregation import WEIGHTINGS, check_weighting
from fedjax_lab.core.communication import model_exchange_bytes
from fedjax_lab.core.meta import (adapted_predictor, check_fraction, inner_adapt, meta_gradient,
                                  model_data_loss, split_support_query, with_adaptation)
from fedjax_lab.core.metrics import initial_metrics, round_metrics
from fedjax_lab.core.types import DataInfo, PyTree
from fedjax_lab.core.validation import check_number, check_positive_int, is_scalar
from fedjax_lab.models import Model
from fedjax_lab.options import non_negative, one_of, open_fraction, option, positive_int

VARIANTS = ("maml", "fomaml", "meta_sgd")


@dataclasses.dataclass(frozen=True)
class FedMetaConfig:
    """FedMeta's options. The Flower reproduction of Chen et al.'s Shakespeare setting takes one
    inner step, Adam on the server and a 20 % support set; its (alpha, beta) = (0.1, 0.01) stay
    here, and its FEMNIST setting is (0.001, 0.0001) with 5 inner steps. Over its 400-2000
    rounds either works; the outer rate beta = 0.01 also moves the digits MLP within a few
    rounds, where 1e-4 would not."""

    variant: str = option("maml", "maml (second order), fomaml (first order) or meta_sgd "
                          "(learned per-parameter alpha)", one_of(*VARIANTS))
    inner_lr: float = option(0.1, "inner step alpha (meta_sgd: its initial value)", non_negative,
                             sweepable=True)
    num_inner_steps: int = option(1, "inner steps K, in training and adaptation", positive_int)
    support_fraction: float = option(0.2, "share of a training client's examples in its support "
                                     "set each round", open_fraction)
    server: ServerOptimizer = option(ServerOptimizer(optimizer="adam", lr=0.01),
                                     "server optimiser on the mean meta-gradient (lr is beta)")
    weighting: str = option("uniform", "weights of the clients' meta-gradients",
                            one_of(*WEIGHTINGS))
    remat: bool = option(False, "recompute the inner steps in the meta-backward pass")


def build(config: FedMetaConfig, model: Model, data: DataInfo,
          execution: ClientExecution = ClientExecution()) -> Algorithm:
    del data
    return fedmeta(model, config.server.build(), variant=config.variant,
                   inner_lr=config.inner_lr, num_inner_steps=config.num_inner_steps,
                   support_fraction=config.support_fraction, weighting=config.weighting,
                   remat=config.remat, execution=execution)


@dataclasses.dataclass(frozen=True)
class FedAvgMetaConfig(FedAvgConfig):
    """FedAvg's options and defaults (`FedAvgConfig`) plus FedMeta's adaptation before
    scoring, with `FedMetaConfig`'s alpha and K (FedMeta compares the two at equal alpha, K)."""

    inner_lr: float = option(0.1, "adaptation step alpha", non_negative, sweepable=True)
    num_inner_steps: int = option(1, "adaptation steps K", positive_int)


def build_fedavg_meta(config: FedAvgMetaConfig, model: Model, data: DataInfo,
                      execution: ClientExecution = ClientExecution()) -> Algorithm:
    return config.dp.sampled(fedavg_meta(model, config.client.optimizer(),
                                         inner_lr=config.inner_lr,
                                         num_inner_steps=config.num_inner_steps,
                                         **fedavg_options(config, execution)), data)


class FedMetaState(NamedTuple):
    """Attributes: params (theta), inner_lrs (Meta-SGD's alpha like params; None otherwise),
    opt_state (server optimiser over theta, or over (theta, alpha)), round, metrics."""

    params: PyTree
    inner_lrs: PyTree
    opt_state: PyTree
    round: jax.Array
    metrics: dict[str, jax.Array]


def fedmeta(model: Model, server_optimizer: optax.GradientTransformation, *,
            variant: str = "maml", inner_lr: float = 0.01, num_inner_steps: int = 1,
            support_fraction: float = 0.2, weighting: str = "uniform", remat: bool = False,
            execution: ClientExecution = ClientExecution()) -> Algorithm:
    """Builds FedMeta.

    Args:
        model: the `(init, apply)` model trained with softmax cross-entropy.
        server_optimizer: optax optimiser of the meta-parameters, stepped on the mean
            meta-gradient, e.g. `optax.adam(1e-3)` (outer learning rate beta).
        variant: "maml", "fomaml" or "meta_sgd".
        inner_lr: alpha of the inner steps (Meta-SGD: the initial value of every alpha).
        num_inner_steps: inner steps K, in training and in adaptation.
        support_fraction: share of each training client's examples in its support set (the
            Flower reproduction uses 0.2); the split is redrawn every round from the client's key.
        weighting: "uniform" (the mean of the clients' meta-gradients) or "num_examples".
        remat: rematerialise the inner loop (`jax.checkpoint` per inner step).
        execution: how clients run; "chunked" bounds the clients in memory at once.

    Returns:
        An `Algorithm` whose state is `FedMetaState`; `predict` uses theta as it is and
        `adapted_predict` adapts theta on each client's support row with the inner rule first.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is unknown; allowed: {', '.join(VARIANTS)}")
    check_number("inner_lr", inner_lr, "a number >= 0", lambda lr: is_scalar(lr) and lr >= 0)
    check_positive_int("num_inner_steps", num_inner_steps)
    check_fraction("support_fraction", support_fraction)
    check_weighting(weighting)
    learn_inner_lrs = variant == "meta_sgd"
    loss_fn = model_data_loss(model.apply)
    inner_options = dict(num_steps=num_inner_steps, first_order=variant == "fomaml", remat=remat)

    def meta_params(state: FedMetaState) -> PyTree:
        return (state.params, state.inner_lrs) if learn_inner_lrs else state.params

    def inner_lrs_of(state: FedMetaState):
        return state.inner_lrs if learn_inner_lrs else inner_lr

    def init(key: jax.Array) -> FedMetaState:
        params = model.init(key)
        inner_lrs = (jax.tree.map(lambda p: jnp.full_like(p, inner_lr), params)
                     if learn_inner_lrs else None)
        state = FedMetaState(params, inner_lrs, None, jnp.zeros((), jnp.int32), {})
        zeros = optax.tree.zeros_like(meta_params(state))
        return state._replace(opt_state=server_optimizer.init(meta_params(state)),
                              metrics=initial_metrics(_round_metrics, jnp.zeros(0),
                                                      jnp.zeros(0), zeros))

    def round_fn(state: FedMetaState, batch: ClientBatch) -> FedMetaState:
        inner_lrs = inner_lrs_of(state)

        def client_update(client):
            x, y, mask, rng = client
            split = split_support_query(rng, mask, support_fraction)
            query_loss, grads = meta_gradient(
                loss_fn, state.params, inner_lrs, split.support(x, y), split.query(x, y),
                learn_inner_lrs=learn_inner_lrs, **inner_options)
            return grads, query_loss, split.num_query > 0

        grads, query_losses, has_query = execution.map(
            client_update, (batch.x, batch.y, batch.mask, batch.rng))
        weights = client_weights(batch.num_examples, weighting=weighting, participating=has_query)
        mean_grad = weighted_mean(grads, weights)
        new_meta, opt_state = server_update(meta_params(state), state.opt_state, mean_grad,
                                            server_optimizer)
        params, new_inner_lrs = new_meta if learn_inner_lrs else (new_meta, None)
        return FedMetaState(params, new_inner_lrs, opt_state, state.round + 1,
                            _round_metrics(weights, query_losses, mean_grad))

    def adapt_client(state: FedMetaState, support: tuple) -> PyTree:
        return inner_adapt(loss_fn, state.params, inner_lrs_of(state), support,
                           num_steps=num_inner_steps)

    def predict(state: FedMetaState, batch: ClientBatch) -> jax.Array:
        return predict_with(model, state.params, batch.x)

    return Algorithm(init=init, round=round_fn, predict=predict,
                     adapted_predict=adapted_predictor(adapt_client, model.apply, execution))


def fedavg_meta(model: Model, client_optimizer: optax.GradientTransformation, *,
                inner_lr: float = 0.01, num_inner_steps: int = 1,
                execution: ClientExecution = ClientExecution(), **fedavg_options) -> Algorithm:
    """FedMeta's "FedAvg(Meta)" baseline: FedAvg training, then FedMeta's local adaptation.

    Args:
        model, client_optimizer, execution, **fedavg_options: as in `fedavg`.
        inner_lr, num_inner_steps: the adaptation, as in `fedmeta` (plain SGD steps on the
            support set from the FedAvg model).

    Returns:
        An `Algorithm` whose state is `FedAvgState`: FedAvg's, with `adapted_predict`.
    """
    check_positive_int("num_inner_steps", num_inner_steps)
    return with_adaptation(fedavg(model, client_optimizer, execution=execution, **fedavg_options),
                           model, inner_lr=inner_lr, num_inner_steps=num_inner_steps,
                           execution=execution)


def _round_metrics(weights, query_losses, mean_grad) -> dict[str, jax.Array]:
    """The round's metrics; `init` calls it on an empty cohort so the structure never changes.

    `train_loss` is the participants' query loss after adaptation (the meta-objective).
    """
    return round_metrics(weights, query_losses, **model_exchange_bytes(weights, mean_grad),
                         meta_gradient_norm=optax.tree.norm(mean_grad).astype(
                             jnp.result_type(float)))


SPECS = (
    AlgorithmSpec(
        "fedmeta", FedMetaConfig, build,
        paper="Chen, Luo, Dong, Li, He, Federated Meta-Learning with Fast Convergence and "
              "Efficient Communication, arXiv 1802.07876",
        summary="clients return the meta-gradient of their query loss after adapting on a "
                "support set (MAML, FOMAML, Meta-SGD); scored after adapting on local data"),
    AlgorithmSpec(
        "fedavg_meta", FedAvgMetaConfig, build_fedavg_meta,
        paper="Chen et al., FedMeta, arXiv 1802.07876 (its FedAvg(Meta) baseline)",
        summary="FedAvg training, scored after FedMeta's local adaptation steps"),
)
