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
`client_states`; a round gathers the cohort's rows, computes its cloud models from ALL rows, and
scatters the trained models back, so unsampled clients' models never change.

Pitfalls avoided (ALGORITHMS.md section 8f): the proximal term is squared and differentiated
(PFLlib takes a detached, unsquared norm, so it has no gradient); cloud models use every client's
latest model, as the paper does (PFLlib uses only this round's uploads); a step alpha_k that could
make xi_ii negative is refused up front: since A' <= 1 / sigma, alpha_k <= sigma / (N - 1) keeps
every self-weight >= 0.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.algorithms.fedprox import proximal_term
from fedjax_lab.core import (Algorithm, ClientBatch, ClientExecution, client_weights,
                             gather_clients, local_train, model_loss, scatter_clients,
                             tree_bytes, weighted_mean)
from fedjax_lab.core.personal_models import check_num_clients, predict_per_client, replicate
from fedjax_lab.models import Model

PyTree = Any
ATTENTIONS = ("exponential", "heuristic")


class FedAMPState(NamedTuple):
    """Attributes: client_states (every client's latest model w_i, leaves `[num_clients, ...]`),
    round, metrics. There is no global model."""

    client_states: PyTree
    round: jax.Array
    metrics: dict[str, jax.Array]


def fedamp(model: Model, client_optimizer: optax.GradientTransformation, *, num_clients: int,
           lam: float = 1.0, sigma: float = 1.0, alpha_k: float | None = None,
           attention: str = "exponential", self_weight: float | None = None,
           num_epochs: int = 1, batch_size: int | None = 10,
           execution: ClientExecution = ClientExecution(), unroll: int = 1) -> Algorithm:
    """Builds FedAMP (or HeurFedAMP).

    Args:
        model: the `(init, apply)` model; every client starts from the same initial parameters.
        client_optimizer: optax optimiser of local training.
        num_clients: the population size N (client models are stacked over it).
        lam: lam >= 0; the client's proximal coefficient is lam / alpha_k (lam = 0 is local
            training).
        sigma: sigma > 0, the scale of A(x) = 1 - exp(-x / sigma); with the heuristic attention,
            the scale of the cosine similarities in the softmax.
        alpha_k: the message-passing step; default sigma / (N - 1), the largest step the
            self-weight condition allows. With the heuristic attention it only scales the
            proximal term.
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
    if not lam >= 0:
        raise ValueError(f"lam={lam!r} is invalid; expected lam >= 0")
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma={sigma!r} is invalid; expected a finite sigma > 0")
    largest_step = sigma / max(num_clients - 1, 1)
    alpha_k = largest_step if alpha_k is None else alpha_k
    if not alpha_k > 0:
        raise ValueError(f"alpha_k={alpha_k!r} is invalid; expected alpha_k > 0")
    if attention == "exponential" and alpha_k > largest_step:
        raise ValueError(f"alpha_k={alpha_k!r} can make the self-weight xi_ii = 1 - sum_j xi_ij "
                         f"negative; expected alpha_k <= sigma / (num_clients - 1) = "
                         f"{largest_step:g}")
    if attention == "heuristic":
        if self_weight is None or not 0.0 <= self_weight <= 1.0:
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
        return FedAMPState(replicate(params, num_clients), jnp.zeros((), jnp.int32),
                           _round_metrics(jnp.zeros(0), jnp.zeros(0), jnp.zeros(0, jnp.int32),
                                          jnp.zeros(0), tree_bytes(params)))

    def round_fn(state: FedAMPState, batch: ClientBatch) -> FedAMPState:
        xi = attend(state.client_states, batch.client_ids)
        cloud_models = weighted_mean(state.client_states, xi)  # weights [C, N]: one mean per row
        own_models = gather_clients(state.client_states, batch.client_ids)

        def client_update(client):
            w_i, u_i, x, y, mask, rng = client

            def loss_fn(params, xb, yb, mb, key):
                return base_loss(params, xb, yb, mb, key) + pull(params, u_i)

            result = local_train(loss_fn, client_optimizer, w_i, x, y, mask, rng,
                                 num_epochs=num_epochs, batch_size=batch_size, unroll=unroll)
            return result.params, result.mean_loss, result.num_steps

        trained, losses, steps = execution.map(
            client_update, (own_models, cloud_models, batch.x, batch.y, batch.mask, batch.rng))
        has_data = batch.num_examples > 0
        client_states = scatter_clients(state.client_states, batch.client_ids, trained,
                                        valid=has_data)
        self_weights = jnp.take_along_axis(xi, batch.client_ids[:, None], axis=1)[:, 0]
        metrics = _round_metrics(client_weights(batch.num_examples), losses, steps, self_weights,
                                 tree_bytes(state.client_states) // num_clients)
        return FedAMPState(client_states, state.round + 1, metrics)

    def predict(state: FedAMPState, batch: ClientBatch) -> jax.Array:
        return predict_per_client(model.apply, execution, state.client_states, batch)

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


def _round_metrics(weights, losses, steps, self_weights, model_bytes: int) -> dict[str, jax.Array]:
    """The round's scalars; `init` calls it on an empty cohort so the structure never changes.

    Each cohort client downloads its cloud model u_i and each client with data uploads its w_i.
    """
    dtype = jnp.result_type(float)
    taking_part = weights > 0
    return {
        "bytes_down": jnp.asarray(weights.shape[0] * model_bytes, dtype),
        "bytes_up": (jnp.sum(taking_part) * model_bytes).astype(dtype),
        "train_loss": jnp.sum(weights * losses).astype(dtype),
        "participants": jnp.sum(taking_part).astype(jnp.int32),
        "local_steps": jnp.sum(jnp.where(taking_part, steps, 0)).astype(jnp.int32),
        "self_weight": (jnp.sum(jnp.where(taking_part, self_weights, 0))
                        / jnp.maximum(jnp.sum(taking_part), 1)).astype(dtype),
    }
