"""IFCA invariants: k = 1 is FedAvg; each client takes the cluster with its lowest loss at the
round's start; each cluster averages its own members' local models and a cluster nobody chose
keeps its model; evaluation never chooses by the examples it scores."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from common import (NUM_CLASSES, NUM_FEATURES, assert_trees_close, assert_trees_equal,
                    make_clients, small_model, stack_clients)
from fedjax_lab.algorithms import REGISTRY
from fedjax_lab.algorithms.fedavg import FedAvgConfig
from fedjax_lab.algorithms.ifca import UNKNOWN_CLUSTER, IFCAConfig
from fedjax_lab.core import ClientExecution, local_train, model_loss
from fedjax_lab.core.losses import cross_entropy
from fedjax_lab.core.types import DataInfo

SIZES = [9, 4, 13, 6]
NUM_CLIENTS = 10


def _build(name, config):
    info = DataInfo(NUM_CLIENTS, NUM_CLASSES, (NUM_FEATURES,), max(SIZES))
    return REGISTRY[name].build(config, small_model(), info, ClientExecution("vmap"))


def _float64(tree):
    return jax.tree.map(lambda leaf: leaf.astype(jnp.float64)
                        if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf, tree)


def test_one_cluster_is_fedavg_bit_for_bit():
    xs, ys = make_clients(SIZES)
    batches = [stack_clients(xs, ys, round_index=r, client_ids=[0, 3, 5, 7]) for r in range(2)]
    ifca = _build("ifca", IFCAConfig(num_clusters=1))
    fedavg = _build("fedavg", FedAvgConfig(weighting="uniform", dense_update="per_client"))
    clustered, plain = ifca.init(jax.random.key(0)), fedavg.init(jax.random.key(0))
    for batch in batches:
        clustered, plain = jax.jit(ifca.round)(clustered, batch), jax.jit(fedavg.round)(plain,
                                                                                         batch)
        assert_trees_equal(jax.tree.map(lambda leaf: leaf[0], clustered.params), plain.params)
    np.testing.assert_array_equal(np.asarray(clustered.client_states.cluster)[[0, 3, 5, 7]], 0)


def test_clients_take_their_lowest_loss_cluster_and_each_cluster_averages_its_members():
    with jax.enable_x64(True):
        xs, ys = make_clients(SIZES + [0], dtype=np.float64)
        batch = stack_clients(xs, ys, client_ids=[1, 2, 4, 6, 8])
        config = IFCAConfig(num_clusters=3)
        algorithm = _build("ifca", config)
        state = _float64(algorithm.init(jax.random.key(0)))
        model = small_model()
        # Cluster 1 fits clients 0 and 2 after a few of their own steps; cluster 2 is far off
        # and nobody takes it.
        fitted = jax.jit(local_train, static_argnums=(0, 1), static_argnames=(
            "num_epochs", "batch_size"))(model_loss(model.apply), optax.sgd(0.5),
                             jax.tree.map(lambda leaf: leaf[1], state.params),
                             np.concatenate([xs[0], xs[2]]), np.concatenate([ys[0], ys[2]]),
                             np.ones(SIZES[0] + SIZES[2], bool), batch.rng[0], num_epochs=20,
                             batch_size=None).params
        far = jax.tree.map(lambda leaf: -20.0 * leaf, fitted)
        clusters = jax.tree.map(lambda a, b, c: jnp.stack([a[0], b, c]), state.params, fitted,
                                far)
        state = state._replace(params=clusters)
        after = jax.jit(algorithm.round)(state, batch)

        def loss(j, i):
            """Client i's mean cross-entropy under cluster j, in numpy."""
            dense = jax.tree.map(lambda leaf: np.asarray(leaf[j]), clusters)["Dense_0"]
            logits = xs[i] @ dense["kernel"] + dense["bias"]
            log_z = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
            return np.mean(log_z - logits[np.arange(SIZES[i]), ys[i]])

        expected = [int(np.argmin([loss(j, i) for j in range(3)])) for i in range(len(SIZES))]
        assert 2 not in expected and len(set(expected)) == 2
        stored = np.asarray(after.client_states.cluster)
        np.testing.assert_array_equal(stored[[1, 2, 4, 6]], expected)
        # The padded row (id 8) and the clients never sampled keep UNKNOWN_CLUSTER.
        np.testing.assert_array_equal(stored[[0, 3, 5, 7, 8, 9]], UNKNOWN_CLUSTER)

        train = jax.jit(lambda start, x, y, mask, rng: local_train(
            model_loss(model.apply), config.client.optimizer(), start, x, y, mask, rng,
            num_epochs=config.client.epochs, batch_size=config.client.batch_size).params)
        for j in range(3):
            start = jax.tree.map(lambda leaf: leaf[j], clusters)
            members = [i for i in range(len(SIZES)) if expected[i] == j]
            local = [train(start, batch.x[i], batch.y[i], batch.mask[i], batch.rng[i])
                     for i in members]
            mean = start if not local else jax.tree.map(
                lambda *ws: sum(ws) / len(ws), *local)
            assert_trees_close(jax.tree.map(lambda leaf: leaf[j], after.params), mean)
        assert int(after.metrics["clusters_chosen"]) == 2
        assert int(after.metrics["participants"]) == 4
        model_bytes = 8 * (NUM_FEATURES * NUM_CLASSES + NUM_CLASSES)
        assert float(after.metrics["bytes_down"]) == 4 * 3 * model_bytes
        assert float(after.metrics["bytes_up"]) == 4 * model_bytes


def test_prediction_uses_the_last_chosen_cluster_and_adaptation_chooses_by_support_loss():
    xs, ys = make_clients(SIZES)
    algorithm = _build("ifca", IFCAConfig(num_clusters=2))
    state = algorithm.init(jax.random.key(0))
    known = jnp.array([1, UNKNOWN_CLUSTER, 0, 1] + [UNKNOWN_CLUSTER] * (NUM_CLIENTS - 4))
    state = state._replace(client_states=state.client_states._replace(cluster=known))
    batch = stack_clients(xs, ys, client_ids=[0, 1, 2, 3])
    logits = jax.jit(algorithm.predict)(state, batch)
    model = small_model()
    # Client 1 never trained: it takes the cluster most clients chose (1: two against one).
    for row, cluster in enumerate([1, 1, 0, 1]):
        np.testing.assert_allclose(
            logits[row], model.apply(jax.tree.map(lambda leaf: leaf[cluster], state.params),
                                     batch.x[row]), rtol=1e-6)
    support, query = batch, stack_clients(xs[::-1], ys[::-1], client_ids=[0, 1, 2, 3])
    adapted = jax.jit(algorithm.adapted_predict)(state, support, query)
    for row in range(len(SIZES)):
        losses = [cross_entropy(model.apply(jax.tree.map(lambda leaf: leaf[j], state.params),
                                            support.x[row]), support.y[row], support.mask[row])
                  for j in range(2)]
        cluster = int(np.argmin(losses))
        np.testing.assert_allclose(
            adapted[row], model.apply(jax.tree.map(lambda leaf: leaf[cluster], state.params),
                                      query.x[row]), rtol=1e-6)


def test_clusters_start_from_independent_keys():
    state = _build("ifca", IFCAConfig(num_clusters=3)).init(jax.random.key(0))
    kernels = np.asarray(state.params["Dense_0"]["kernel"])
    assert not np.allclose(kernels[0], kernels[1]) and not np.allclose(kernels[1], kernels[2])
    fedavg = _build("fedavg", FedAvgConfig()).init(jax.random.key(0))
    assert_trees_equal(jax.tree.map(lambda leaf: leaf[0], state.params), fedavg.params)
