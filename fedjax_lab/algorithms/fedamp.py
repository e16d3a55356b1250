"""FedAMP: federated attentive message passing, one personalised cloud model per client.

References:
    Huang, Chu, Zhou, Wang, Liu, Pei, Zhang. "Personalized Cross-Silo Federated Learning on
    Non-IID Data." AAAI 2021, arXiv 2007.03797.

Update, round k, for each sampled client i (all clients' latest models w_j on the server):
    xi_ij = alpha_k A'(||w_i - w_j||^2) (j != i),  xi_ii = 1 - sum_{j != i} xi_ij,
    u_i = sum_j xi_ij w_j,   A(x) = 1 - exp(-x / sigma),  A'(x) = exp(-x / sigma) / sigma;
then client i trains w_i <- argmin F_i(w) + lam / (2 alpha_k) ||w - u_i||^2 by local SGD from its
own latest w_i and uploads it. Similar models attend to each other; each w_i is personalised.
HeurFedAMP (`attention="heuristic"`) fixes xi_ii and spreads 1 - xi_ii over the others by a
softmax of sigma * cos(w_i, w_j).

The server state is every client's latest model, stacked over the population in
`client_states.models`; a round gathers the cohort's rows, computes its cloud models from ALL
rows, and scatters the trained models back, so unsampled clients' models never change.

Step sizes. The two steps are one proximal-gradient step on the paper's objective, so they share
alpha_k: the attention step moves u_i by alpha_k, the client is pulled to u_i with coefficient
lam / alpha_k. With the exponential attention the self-weight condition alpha_k <= sigma / (N - 1)
shrinks alpha_k with the population, so a fixed lam makes the pull lam (N - 1) / sigma grow with
N (at lam = sigma = 1, N = 60 and SGD 0.05 every local step overshoots u_i and the models blow up).
The defaults therefore fix the pull, not lam: alpha_k = sigma / (N - 1) (the largest step the
condition allows; 1 for the heuristic attention, whose self-weight is fixed, so its temperature
sigma never touches the pull) and lam = alpha_k, a proximal coefficient of 1 at any N, the scale
of the paper's cross-silo setting and of PFLlib's alphaK = lam = 1. `resolve_steps` says what a
choice implies.

Pitfalls avoided (ALGORITHMS.md section 8f): the proximal term is squared and differentiated
(PFLlib takes a detached, unsquared norm, so it has no gradient); cloud models use every client's
latest model, as the paper does (PFLlib uses only this round's uploads); a step alpha_k that could
make xi_ii negative is refused up front: since A' <= 1 / sigma, alpha_k <= sigma / (N - 1) keeps
every self-weight >= 0.
"""

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.algorithms.fedprox import proximal_term
from fedjax_lab.algorithms.spec import AlgorithmSpec, ClientTraining
from fedjax_lab.core import (Algorithm, ClientBatch, ClientExecution, client_weights,
                             gather_clients, local_train, model_loss, scatter_clients,
                             weighted_mean)
from fedjax_lab.core.communication import model_exchange_bytes
from fedjax_lab.core.metrics import initial_metrics, round_metrics
from fedjax_lab.core.personal_models import check_num_clients, predict_per_client, replicate
from fedjax_lab.core.types import DataInfo
from fedjax_lab.core.validation import check_number, is_traced
from fedjax_lab.models import Model
from fedjax_lab.options import (OptionError, fraction, non_negative, one_of, option, optional,
                                positive)

PyTree = Any
ATTENTIONS = ("exponential", "heuristic")
# HeurFedAMP's xi_ii when the config leaves it unset: half of the weight on the client's own model
# (the paper tunes it; this is the repository's FedAMP experiment's value).
DEFAULT_SELF_WEIGHT = 0.5
# Plain SGD on (c / 2) ||w - u||^2 scales w - u by (1 - lr c) each step: it diverges at lr c >= 2.
_STABLE_STEP = 2.0


@dataclasses.dataclass(frozen=True)
class FedAMPConfig:
    """FedAMP's options. The paper tunes lam, sigma and alpha_k per data set; the defaults are
    PFLlib's sigma = 1 with the population-independent steps of the module docstring (alpha_k =
    sigma / (N - 1), lam = alpha_k: a client proximal coefficient of 1 at any N). Local training
    is the library's default job (SGD 0.05, E = 5, B = 10): the paper's cross-silo clients hold
    far more data than the ~29 examples of the embedded digits clients."""

    client: ClientTraining = option(ClientTraining(lr=0.05, epochs=5, batch_size=10),
                                    "local training")
    attention: str = option("exponential", "exponential (FedAMP) or heuristic (HeurFedAMP)",
                            one_of(*ATTENTIONS))
    sigma: float = option(1.0, "scale sigma of A(x) = 1 - exp(-x / sigma); the heuristic's "
                          "softmax temperature", positive, sweepable=True)
    lam: float | None = option(None, "lam; the client's proximal coefficient is lam / alpha_k; "
                               "none = alpha_k (coefficient 1)", optional(non_negative),
                               sweepable=True)
    alpha_k: float | None = option(None, "message-passing step; none = sigma / (N - 1) "
                                   "(exponential) or 1 (heuristic)", optional(positive),
                                   sweepable=True)
    self_weight: float | None = option(None, f"HeurFedAMP's xi_ii; none = "
                                       f"{DEFAULT_SELF_WEIGHT} (heuristic only)",
                                       optional(fraction), sweepable=True)

    def check(self) -> None:
        if self.self_weight is not None and self.attention != "heuristic":
            raise OptionError("self_weight", self.self_weight,
                              "only the heuristic attention has a fixed self-weight; set "
                              "attention = heuristic or leave self_weight unset")


def build(config: FedAMPConfig, model: Model, data: DataInfo,
          execution: ClientExecution = ClientExecution()) -> Algorithm:
    lam, alpha_k = resolve_steps(data.num_clients, sigma=config.sigma,
                                 attention=config.attention, lam=config.lam,
                                 alpha_k=config.alpha_k)
    if not any(map(is_traced, (config.client.lr, lam, alpha_k))) and \
            config.client.lr * lam / alpha_k >= _STABLE_STEP:
        raise OptionError("algorithm.lam", lam,
                          f"the client proximal coefficient lam / alpha_k = {lam / alpha_k:g} "
                          f"(alpha_k = {alpha_k:g} with {data.num_clients} clients) times "
                          f"client.lr = {config.client.lr:g} is >= {_STABLE_STEP:g}, so local "
                          "SGD diverges; lower lam (or leave it unset) or client.lr")
    self_weight = config.self_weight
    if config.attention == "heuristic" and self_weight is None:
        self_weight = DEFAULT_SELF_WEIGHT
    return fedamp(model, config.client.optimizer(), num_clients=data.num_clients, lam=lam,
                  sigma=config.sigma, alpha_k=alpha_k, attention=config.attention,
                  self_weight=self_weight, num_epochs=config.client.epochs,
                  batch_size=config.client.batch_size, execution=execution)


def resolve_steps(num_clients: int, *, sigma: float, attention: str = "exponential",
                  lam: float | None = None, alpha_k: float | None = None) -> tuple[float, float]:
    """`(lam, alpha_k)` with the defaults filled in; the client's pull is lam / alpha_k.

    alpha_k defaults to sigma / (N - 1) with the exponential attention (the largest step keeping
    every xi_ii >= 0) and to 1 with the heuristic one (its self-weight is fixed, so alpha_k only
    scales the pull, and the temperature sigma must not); lam defaults to alpha_k, a proximal
    coefficient of 1 whatever N and sigma.
    """
    if alpha_k is None:
        alpha_k = sigma / max(num_clients - 1, 1) if attention == "exponential" else 1.0
    return (alpha_k if lam is None else lam), alpha_k


class FedAMPClientState(NamedTuple):
    """Attributes: models, every client's latest model w_i (leaves `[num_clients, ...]`)."""

    models: PyTree


class FedAMPState(NamedTuple):
    """Attributes: client_states (a `FedAMPClientState`), round, metrics. There is no global
    model."""

    client_states: FedAMPClientState
    round: jax.Array
    metrics: dict[str, jax.Array]


def fedamp(model: Model, client_optimizer: optax.GradientTransformation, *, num_clients: int,
           lam: float | None = None, sigma: float = 1.0, alpha_k: float | None = None,
           attention: str = "exponential", self_weight: float | None = None,
           num_epochs: int = 1, batch_size: int | None = 10,
           execution: ClientExecution = ClientExecution(), unroll: int = 1) -> Algorithm:
    """Builds FedAMP (or HeurFedAMP).

    Args:
        model: the `(init, apply)` model; every client starts from the same initial parameters.
        client_optimizer: optax optimiser of local training.
        num_clients: the population size N (client models are stacked over it).
        lam: lam >= 0; the client's proximal coefficient is lam / alpha_k (lam = 0 is local
            training). Default alpha_k: a coefficient of 1 at any N (`resolve_steps`).
        sigma: sigma > 0, the scale of A(x) = 1 - exp(-x / sigma); with the heuristic attention,
            the scale of the cosine similarities in the softmax.
        alpha_k: the message-passing step; default sigma / (N - 1), the largest step the
            self-weight condition allows. With the heuristic attention it only scales the
            proximal term, and defaults to 1.
        attention: "exponential" (FedAMP) or "heuristic" (HeurFedAMP).
        self_weight: xi_ii in [0, 1], required by (and only for) the heuristic attention.
        num_epochs: local epochs.
        batch_size: local batch; None is the full batch.
        execution: how clients run (vmap, chunked, sequential, unrolled).
        unroll: unroll factor of the local step loop.

    Returns:
        An `Algorithm` whose state is `FedAMPState`; `predict` uses each client's own model.
    """
    check_num_clients(num_clients)
    if attention not in ATTENTIONS:
        raise ValueError(f"attention {attention!r} is unknown; allowed: {', '.join(ATTENTIONS)}")
    check_number("sigma", sigma, "a finite sigma > 0", lambda s: s > 0 and math.isfinite(s))
    if alpha_k is not None:
        check_number("alpha_k", alpha_k, "alpha_k > 0", lambda step: step > 0)
    if lam is not None:
        check_number("lam", lam, "lam >= 0", lambda value: value >= 0)
    lam, alpha_k = resolve_steps(num_clients, sigma=sigma, attention=attention, lam=lam,
                                 alpha_k=alpha_k)
    largest_step = sigma / max(num_clients - 1, 1)
    if attention == "exponential" and not is_traced(alpha_k) and not is_traced(sigma) and \
            alpha_k > largest_step:
        raise ValueError(f"alpha_k={alpha_k!r} can make the self-weight xi_ii = 1 - sum_j xi_ij "
                         f"negative; expected alpha_k <= sigma / (num_clients - 1) = "
                         f"{largest_step:g}")
    if attention == "heuristic":
        if self_weight is None or not is_traced(self_weight) and not 0.0 <= self_weight <= 1.0:
            raise ValueError(f"self_weight={self_weight!r} is invalid; the heuristic attention "
                             "needs 0 <= self_weight <= 1")
    elif self_weight is not None:
        raise ValueError("self_weight is only for attention='heuristic'; FedAMP's xi_ii is "
                         "1 - sum_j xi_ij")
    base_loss = model_loss(model.apply)
    pull = proximal_term(lam / alpha_k)

    def attend(models: PyTree, ids: jax.Array) -> jax.Array:
        if attention == "exponential":
            return attention_weights(models, ids, alpha_k=alpha_k, sigma=sigma)
        return heuristic_attention_weights(models, ids, self_weight=self_weight, sigma=sigma)

    def init(key: jax.Array) -> FedAMPState:
        params = model.init(key)
        empty = jnp.zeros(0)
        return FedAMPState(FedAMPClientState(replicate(params, num_clients)),
                           jnp.zeros((), jnp.int32),
                           initial_metrics(_round_metrics, empty, empty,
                                           jnp.zeros(0, jnp.int32), empty, params))

    def round_fn(state: FedAMPState, batch: ClientBatch) -> FedAMPState:
        population = state.client_states.models
        xi = attend(population, batch.client_ids)
        cloud_models = weighted_mean(population, xi)  # weights [C, N]: one mean per row
        own_models = gather_clients(population, batch.client_ids)

        def client_update(client):
            w_i, u_i, x, y, mask, rng = client

            def loss_fn(params, xb, yb, mb, key):
                return base_loss(params, xb, yb, mb, key) + pull(params, u_i)

            result = local_train(loss_fn, client_optimizer, w_i, x, y, mask, rng,
                                 num_epochs=num_epochs, batch_size=batch_size, unroll=unroll)
            return result.params, result.mean_loss, result.num_steps

        trained, losses, steps = execution.map(
            client_update, (own_models, cloud_models, batch.x, batch.y, batch.mask, batch.rng))
        models = scatter_clients(population, batch.client_ids, trained,
                                 valid=batch.num_examples > 0)
        self_weights = jnp.take_along_axis(xi, batch.client_ids[:, None], axis=1)[:, 0]
        metrics = _round_metrics(client_weights(batch.num_examples), losses, steps, self_weights,
                                 jax.tree.map(lambda leaf: leaf[0], population))
        return FedAMPState(FedAMPClientState(models), state.round + 1, metrics)

    def predict(state: FedAMPState, batch: ClientBatch) -> jax.Array:
        return predict_per_client(model.apply, execution, state.client_states.models, batch)

    return Algorithm(init=init, round=round_fn, predict=predict)


def attention_weights(client_models: PyTree, client_ids: jax.Array, *, alpha_k: float,
                      sigma: float) -> jax.Array:
    """FedAMP's rows xi `[C, N]` for clients `client_ids` against all N clients' models.

    xi_ij = alpha_k exp(-||w_i - w_j||^2 / sigma) / sigma for j != i, xi_ii = 1 - sum of the rest.
    """
    squared_distances = _squared_distances(client_models, client_ids)
    others = _others(client_ids, squared_distances.shape[1])
    xi = jnp.where(others, alpha_k * jnp.exp(-squared_distances / sigma) / sigma, 0)
    return xi + jnp.where(others, 0, 1 - jnp.sum(xi, axis=1, keepdims=True))


def heuristic_attention_weights(client_models: PyTree, client_ids: jax.Array, *,
                                self_weight: float, sigma: float) -> jax.Array:
    """HeurFedAMP's rows xi `[C, N]`: xi_ii = self_weight, the rest by softmax(sigma cos)."""
    inner, norms, _ = _gram(client_models, client_ids)
    cosine = inner / jnp.maximum(norms[client_ids][:, None] * norms[None, :], 1e-12)
    others = _others(client_ids, inner.shape[1])
    if inner.shape[1] == 1:
        return jnp.ones_like(inner)
    spread = jax.nn.softmax(jnp.where(others, sigma * cosine, -jnp.inf), axis=1)
    return jnp.where(others, (1 - self_weight) * spread, self_weight)


def _others(client_ids: jax.Array, num_clients: int) -> jax.Array:
    """`[C, N]` True where column j is not the row's own client."""
    return jnp.arange(num_clients)[None, :] != client_ids[:, None]


def _gram(client_models: PyTree, client_ids: jax.Array):
    """<w_i, w_j> `[C, N]`, ||w_j|| `[N]` and ||w_j||^2 `[N]`, summed over the model's leaves.

    Leaf by leaf, so no `[N, d]` copy of the population is made.
    """
    leaves = jax.tree.leaves(client_models)
    num_clients = leaves[0].shape[0]
    flat = [leaf.reshape(num_clients, -1) for leaf in leaves]
    inner = sum(leaf[client_ids] @ leaf.T for leaf in flat)
    squared_norms = sum(jnp.sum(leaf * leaf, axis=1) for leaf in flat)
    return inner, jnp.sqrt(squared_norms), squared_norms


def _squared_distances(client_models: PyTree, client_ids: jax.Array) -> jax.Array:
    """||w_i - w_j||^2 `[C, N]` from the Gram matrix (clipped at 0 against rounding)."""
    inner, _, squared_norms = _gram(client_models, client_ids)
    distances = squared_norms[client_ids][:, None] + squared_norms[None, :] - 2 * inner
    return jnp.maximum(distances, 0)


def _round_metrics(weights, losses, steps, self_weights, one_model) -> dict[str, jax.Array]:
    """The round's scalars; `init` calls it on an empty cohort so the structure never changes.

    Each cohort client downloads its cloud model u_i and each client with data uploads its w_i.
    """
    taking_part = weights > 0
    return round_metrics(
        weights, losses, **model_exchange_bytes(weights, one_model),
        local_steps=jnp.sum(jnp.where(taking_part, steps, 0)).astype(jnp.int32),
        self_weight=(jnp.sum(jnp.where(taking_part, self_weights, 0))
                     / jnp.maximum(jnp.sum(taking_part), 1)).astype(jnp.result_type(float)))


SPECS = (AlgorithmSpec(
    "fedamp", FedAMPConfig, build,
    paper="Huang et al., Personalized Cross-Silo Federated Learning on Non-IID Data, AAAI 2021, "
          "arXiv 2007.03797",
    summary="one model per client, pulled to a cloud model that attends to similar clients' "
            "models (HeurFedAMP: attention heuristic)",
    trains_model_state=True),)
