"""IFCA: k cluster models; each client trains the one that fits its data best.

Reference:
    Ghosh, Chung, Yin, Ramchandran. "An Efficient Framework for Clustered Federated Learning."
    NeurIPS 2020, arXiv 2006.04088 (Algorithm 1, IFCA with model averaging).

Update: the server sends all k models theta_1..theta_k; client i picks
j_i = argmin_j F_i(theta_j), its loss over its own data, runs local SGD from theta_{j_i}, and
returns the model and j_i; the server averages each cluster's returned models,
theta_j <- sum_{i: j_i = j} p_i theta_i / sum_{i: j_i = j} p_i (the paper: p uniform), and keeps a
cluster no client chose. With k = 1 this is FedAvg.

Evaluation: `predict` uses the cluster each client chose the last time it trained (a client never
sampled takes the cluster most clients chose), and `adapted_predict` makes the paper's choice
afresh, by the loss on the client's training examples (its support row), never on the examples it
scores.

Pitfalls avoided: the cluster is chosen by the loss of the models at the round's start (before
any local step), over all of the client's real examples and none of its padding; the clusters are
initialised from independent keys (k copies of one model would never separate); a cluster no
client chose this round keeps its model instead of being averaged to zero.
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.algorithms.spec import AlgorithmSpec, ClientTraining
from fedjax_lab.core import (Algorithm, ClientBatch, ClientExecution, client_weights,
                             local_train, model_loss, server_update, weighted_mean)
from fedjax_lab.core.aggregation import WEIGHTINGS, check_weighting
from fedjax_lab.core.communication import participants_bytes, tree_bytes
from fedjax_lab.core.losses import cross_entropy
from fedjax_lab.core.metrics import initial_metrics, round_metrics
from fedjax_lab.core.personal_models import check_num_clients
from fedjax_lab.core.types import DataInfo, gather_clients, scatter_clients
from fedjax_lab.core.validation import check_positive_int
from fedjax_lab.models import Model
from fedjax_lab.options import one_of, option, positive_int

PyTree = Any
# A client's cluster before it ever trained.
UNKNOWN_CLUSTER = -1


@dataclasses.dataclass(frozen=True)
class IFCAConfig:
    """IFCA's options: k = 2 clusters, the paper's uniform average within a cluster, FedAvg's
    default local job (SGD 0.05, E = 5, B = 10); the paper tunes k and the rate per task."""

    client: ClientTraining = option(ClientTraining(lr=0.05, epochs=5, batch_size=10),
                                    "local training")
    num_clusters: int = option(2, "cluster models k", positive_int)
    weighting: str = option("uniform", "weights p_i within a cluster (the paper: uniform)",
                            one_of(*WEIGHTINGS))


def build(config: IFCAConfig, model: Model, data: DataInfo,
          execution: ClientExecution = ClientExecution()) -> Algorithm:
    return ifca(model, config.client.optimizer(), num_clusters=config.num_clusters,
                num_clients=data.num_clients, num_epochs=config.client.epochs,
                batch_size=config.client.batch_size, weighting=config.weighting,
                execution=execution)


class IFCAClientState(NamedTuple):
    """Attributes: cluster, the cluster each client last chose (`[num_clients]` int32,
    `UNKNOWN_CLUSTER` before it trained)."""

    cluster: jax.Array


class IFCAState(NamedTuple):
    """Attributes: params (the k cluster models, leaves `[k, ...]`), round, metrics,
    client_states (an `IFCAClientState`)."""

    params: PyTree
    round: jax.Array
    metrics: dict[str, jax.Array]
    client_states: IFCAClientState


def ifca(model: Model, client_optimizer: optax.GradientTransformation, *, num_clusters: int,
         num_clients: int, num_epochs: int = 1, batch_size: int | None = 10,
         weighting: str = "uniform", execution: ClientExecution = ClientExecution(),
         unroll: int = 1) -> Algorithm:
    """Builds IFCA (model averaging).

    Args:
        model: the `(init, apply)` model trained with softmax cross-entropy.
        client_optimizer: optax optimiser of local training.
        num_clusters: the number of cluster models k.
        num_clients: the population size (each client's last cluster is kept).
        num_epochs: local epochs E.
        batch_size: local batch B; None is the full batch.
        weighting: "uniform" (the paper) or "num_examples", within each cluster.
        execution: how clients run (vmap, chunked, sequential, unrolled, sharded).
        unroll: unroll factor of the local step loop.

    Returns:
        An `Algorithm` whose state is `IFCAState`.
    """
    check_positive_int("num_clusters", num_clusters)
    check_num_clients(num_clients)
    check_positive_int("num_epochs", num_epochs)
    if batch_size is not None:
        check_positive_int("batch_size", batch_size)
    check_weighting(weighting)
    base_loss = model_loss(model.apply)
    averaging = optax.sgd(1.0)

    def choose(clusters: PyTree, x: jax.Array, y: jax.Array, mask: jax.Array) -> jax.Array:
        losses = jax.vmap(lambda params: cross_entropy(model.apply(params, x), y, mask))(clusters)
        return jnp.argmin(losses).astype(jnp.int32)

    def init(key: jax.Array) -> IFCAState:
        # Cluster 0 from the key itself, so k = 1 starts where FedAvg does.
        keys = [key] + [jax.random.fold_in(key, j) for j in range(1, num_clusters)]
        clusters = jax.tree.map(lambda *leaves: jnp.stack(leaves), *map(model.init, keys))
        empty = jnp.zeros(0)
        return IFCAState(clusters, jnp.zeros((), jnp.int32),
                         initial_metrics(_round_metrics, empty, empty, jnp.zeros(0, jnp.int32),
                                         jnp.zeros(0, bool), jnp.zeros(num_clusters, bool),
                                         clusters),
                         IFCAClientState(jnp.full((num_clients,), UNKNOWN_CLUSTER, jnp.int32)))

    def round_fn(state: IFCAState, batch: ClientBatch) -> IFCAState:
        clusters = state.params
        chosen = jax.vmap(lambda x, y, mask: choose(clusters, x, y, mask))(
            batch.x, batch.y, batch.mask)
        # Cluster j's weights: its members' FedAvg weights, summing to 1 over them (k = 1 gives
        # FedAvg's own weights, and so its average bit for bit).
        weights = [client_weights(batch.num_examples, weighting=weighting,
                                  participating=chosen == j) for j in range(num_clusters)]

        def client_update(client):
            x, y, mask, rng, cluster = client
            start = jax.tree.map(lambda leaf: leaf[cluster], clusters)
            result = local_train(base_loss, client_optimizer, start, x, y, mask, rng,
                                 num_epochs=num_epochs, batch_size=batch_size, unroll=unroll)
            return optax.tree.sub(start, result.params), (result.mean_loss, result.num_steps)

        deltas, (losses, steps) = execution.map(
            client_update, (batch.x, batch.y, batch.mask, batch.rng, chosen))
        # A cluster no client chose has all weights 0: its mean delta is 0 and its model stays.
        mean_deltas = jax.tree.map(lambda *leaves: jnp.stack(leaves),
                                   *[weighted_mean(deltas, w) for w in weights])
        params, _ = server_update(clusters, averaging.init(clusters), mean_deltas, averaging)
        has_data = batch.num_examples > 0
        client_states = scatter_clients(state.client_states, batch.client_ids,
                                        IFCAClientState(chosen), valid=has_data)
        return IFCAState(params, state.round + 1,
                         _round_metrics(client_weights(batch.num_examples, weighting=weighting),
                                        losses, steps, has_data,
                                        jnp.stack([jnp.any(w > 0) for w in weights]), params),
                         client_states)

    def cluster_params(clusters: PyTree, ids: jax.Array) -> PyTree:
        return jax.tree.map(lambda leaf: leaf[ids], clusters)

    def predict_with_clusters(state: IFCAState, ids: jax.Array, x: jax.Array) -> jax.Array:
        return execution.map(lambda client: model.apply(*client),
                             (cluster_params(state.params, ids), x))

    def predict(state: IFCAState, batch: ClientBatch) -> jax.Array:
        known = state.client_states.cluster
        counts = jnp.sum(jax.nn.one_hot(known, num_clusters, dtype=jnp.int32), axis=0)
        last = gather_clients(known, batch.client_ids)
        ids = jnp.where(last == UNKNOWN_CLUSTER, jnp.argmax(counts), last)
        return predict_with_clusters(state, ids, batch.x)

    def adapted_predict(state: IFCAState, support: ClientBatch,
                        query: ClientBatch) -> jax.Array:
        ids = jax.vmap(lambda x, y, mask: choose(state.params, x, y, mask))(
            support.x, support.y, support.mask)
        return predict_with_clusters(state, ids, query.x)

    return Algorithm(init=init, round=round_fn, predict=predict,
                     adapted_predict=adapted_predict)


def _round_metrics(weights, losses, steps, has_data, cluster_chosen,
                   clusters) -> dict[str, jax.Array]:
    """The round's metrics (`weights`: the clients' weights over the whole cohort). Each real
    client receives the k models and sends one back."""
    cluster_bytes = tree_bytes(clusters)
    return round_metrics(
        weights, losses, bytes_down=participants_bytes(has_data, cluster_bytes),
        bytes_up=participants_bytes(weights, cluster_bytes // len(cluster_chosen)),
        local_steps=jnp.sum(jnp.where(weights > 0, steps, 0)).astype(jnp.int32),
        clusters_chosen=jnp.sum(cluster_chosen).astype(jnp.int32))


SPECS = (AlgorithmSpec(
    "ifca", IFCAConfig, build,
    paper="Ghosh, Chung, Yin, Ramchandran, An Efficient Framework for Clustered Federated "
          "Learning, NeurIPS 2020, arXiv 2006.04088",
    summary="k cluster models; each client trains the one with its lowest loss, each cluster "
            "averages its own clients' models"),)
