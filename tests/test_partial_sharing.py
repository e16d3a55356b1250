"""Partial sharing invariants (FedPer, LG-FedAvg, FedRep, FedBABU, FedBN as one mechanism):
the degenerate partitions are FedAvg and local training, personal rows are each client's own
training and no one else's, the shared part is the weighted mean, FedRep's phases move only their
part, FedBABU's head never moves in training, FedBN keeps BatchNorm per client, and bytes count
only the shared part."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from common import (NUM_CLASSES, NUM_FEATURES, assert_trees_close, assert_trees_equal,
                    make_clients, stack_clients)
from fedjax_lab.algorithms.fedavg import FedAvgState, fedavg
from fedjax_lab.algorithms.partial_sharing import (_FINETUNE_STREAM, PartialSharingConfig,
                                                   build_fedbn, everything, fedbabu, fedrep,
                                                   is_batch_norm, is_head, nothing,
                                                   partial_sharing, partition)
from fedjax_lab.algorithms.spec import ClientTraining
from fedjax_lab.core import local_train, model_loss
from fedjax_lab.core.communication import tree_bytes
from fedjax_lab.core.types import DataInfo
from fedjax_lab.models import mlp, split_mlp

NUM_CLIENTS = 6
# Cohort rows: clients 4, 0, 2 (padding: no examples), 5; clients 1 and 3 are not sampled.
SIZES, IDS, PADDED, UNSAMPLED = [9, 4, 0, 6], [4, 0, 2, 5], 2, (1, 3)
SPLIT = split_mlp((NUM_FEATURES,), NUM_CLASSES, hidden=(4,))
JOB = dict(num_clients=NUM_CLIENTS, batch_size=3, weighting="num_examples")
SGD = optax.sgd(0.1)
row = lambda tree, i: jax.tree.map(lambda leaf: leaf[i], tree)


def float64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64)
                        if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def batch64(round_index=0):
    xs, ys = make_clients(SIZES, dtype=np.float64)
    return stack_clients(xs, ys, padded_length=12, client_ids=IDS, round_index=round_index)


def state64(algorithm, personal_noise=0.0):
    """`init`'s state in float64; with `personal_noise`, every client's personal part made
    different (so gathering the wrong row would show)."""
    state = float64(jax.jit(algorithm.init)(jax.random.key(0)))
    rng = np.random.default_rng(1)
    personal = jax.tree.map(lambda a: a + personal_noise * rng.normal(size=a.shape),
                            state.client_states.personal_params)
    return jax.device_put(state._replace(
        client_states=state.client_states._replace(personal_params=personal)))


@functools.cache
def _local_sgd(model):
    return jax.jit(lambda params, x, y, mask, rng: local_train(
        model_loss(model.apply), SGD, params, x, y, mask, rng, num_epochs=2,
        batch_size=3).params)


def train_alone(model, params, batch, i):
    """Client row i's 2 epochs of `local_train` from `params`, written apart from the module
    (jitted once per model)."""
    return _local_sgd(model)(params, batch.x[i], batch.y[i], batch.mask[i], batch.rng[i])


@jax.jit
def train_head_alone(body, head, x, y, mask, rng):
    """2 epochs of `local_train` of the head alone, the body closed over (not the module's
    zero-update mask)."""
    base = model_loss(SPLIT.apply)
    return local_train(lambda h, *args: base({"extractor": body, "head": h}, *args), SGD, head,
                       x, y, mask, rng, num_epochs=2, batch_size=3).params


def test_nothing_personal_is_fedavg_bit_for_bit_and_fedbn_without_batch_norm_too():
    """FedPer's mechanism with an empty personal part, and FedBN (from its registry builder) on
    a model without BatchNorm, are FedAvg's round bit for bit."""
    with jax.enable_x64(True):
        batch = batch64()
        reference = fedavg(SPLIT, SGD, num_epochs=2, batch_size=3, dense_update="per_client")
        shared_only = partial_sharing(SPLIT, SGD, is_personal=nothing, phases=((None, 2),),
                                      **JOB)
        fedbn = build_fedbn(PartialSharingConfig(client=ClientTraining(lr=0.1, epochs=2,
                                                                        batch_size=3)),
                            SPLIT, DataInfo(NUM_CLIENTS, NUM_CLASSES, (NUM_FEATURES,), 12))
        state = state64(shared_only)
        expected = jax.jit(reference.round)(
            FedAvgState(state.params, state.opt_state, state.round, {}), batch)
        # Jitted only: the registry contract compares each entry's eager and jitted rounds.
        for new in (jax.jit(shared_only.round)(state, batch), jax.jit(fedbn.round)(state, batch)):
            assert_trees_equal(new.params, expected.params)
            for name in ("train_loss", "bytes_up", "bytes_down", "update_norm"):
                assert float(new.metrics[name]) == float(expected.metrics[name])


def test_nothing_shared_is_local_training():
    """LG-FedAvg's mechanism with everything personal: each sampled client's model is its own
    local training from its own previous model; the server model never moves; no bytes."""
    with jax.enable_x64(True):
        batch = batch64()
        algorithm = partial_sharing(SPLIT, SGD, is_personal=everything, phases=((None, 2),),
                                    **JOB)
        state = state64(algorithm, personal_noise=0.1)
        new = jax.jit(algorithm.round)(state, batch)
        assert_trees_equal(new.params, state.params)
        population = state.client_states.personal_params
        for i, client in enumerate(IDS):
            expected = (row(population, client) if i == PADDED else
                        train_alone(SPLIT, row(population, client), batch, i))
            assert_trees_equal(row(new.client_states.personal_params, client), expected)
        for client in UNSAMPLED:
            assert_trees_equal(row(new.client_states.personal_params, client),
                               row(population, client))
        assert float(new.metrics["bytes_up"]) == float(new.metrics["bytes_down"]) == 0.0


def test_fedper_personal_heads_and_shared_mean_body():
    """FedPer: a sampled client's head after a round is what its training from (global body,
    its own head) produced; padded and unsampled rows keep theirs; the body is the weighted
    mean of the clients' trained bodies; bytes count the body only."""
    with jax.enable_x64(True):
        batch = batch64()
        algorithm = partial_sharing(SPLIT, SGD, is_personal=is_head, phases=((None, 2),), **JOB)
        state = state64(algorithm, personal_noise=0.3)
        new = jax.jit(algorithm.round)(state, batch)
        heads = state.client_states.personal_params
        bodies, weights = [], np.asarray(SIZES, np.float64) / sum(SIZES)
        for i, client in enumerate(IDS):
            own = {"extractor": state.params["extractor"], **row(heads, client)}
            trained = train_alone(SPLIT, own, batch, i)
            bodies.append(trained["extractor"])
            expected_head = row(heads, client) if i == PADDED else {"head": trained["head"]}
            assert_trees_equal(row(new.client_states.personal_params, client), expected_head)
        for client in UNSAMPLED:
            assert_trees_equal(row(new.client_states.personal_params, client),
                               row(heads, client))
        mean_body = jax.tree.map(lambda *b: sum(w * leaf for w, leaf in zip(weights, b)),
                                 *bodies)
        assert_trees_close(new.params["extractor"], mean_body)
        # The global model's head (what a never-sampled client starts from) is the initial one.
        assert_trees_equal(new.params["head"], state.params["head"])
        body_bytes = tree_bytes(state.params["extractor"])
        assert float(new.metrics["bytes_up"]) == 3 * body_bytes
        assert float(new.metrics["bytes_down"]) == len(IDS) * body_bytes
        # predict: each client's own head on the global body.
        logits = jax.jit(algorithm.predict)(new, batch)
        own = {"extractor": new.params["extractor"],
               **row(new.client_states.personal_params, IDS[0])}
        assert_trees_close(logits[0], SPLIT.apply(own, batch.x[0]))


def test_fedrep_moves_the_head_only_in_head_epochs_and_the_body_only_in_body_epochs():
    """With body_epochs = 0 the global body is unchanged while the heads train; adding a body
    epoch changes the body and leaves the heads exactly as the head epochs left them."""
    with jax.enable_x64(True):
        batch = batch64()
        heads_only = fedrep(SPLIT, SGD, head_epochs=2, body_epochs=0, **JOB)
        both = fedrep(SPLIT, SGD, head_epochs=2, body_epochs=1, **JOB)
        state = state64(both, personal_noise=0.3)
        after_heads = jax.jit(heads_only.round)(state, batch)
        after_both = jax.jit(both.round)(state, batch)
        assert_trees_equal(after_heads.params, state.params)
        assert float(after_heads.metrics["update_norm"]) == 0.0
        assert_trees_equal(after_both.client_states, after_heads.client_states)
        assert float(optax.tree.norm(optax.tree.sub(after_both.params["extractor"],
                                                    state.params["extractor"]))) > 0
        assert_trees_equal(after_both.params["head"], state.params["head"])
        moved = optax.tree.sub(row(after_heads.client_states.personal_params, IDS[0]),
                               row(state.client_states.personal_params, IDS[0]))
        assert float(optax.tree.norm(moved)) > 0
        # A head phase from the client's own head: the same head as training the head alone.
        own = {"extractor": state.params["extractor"],
               **row(state.client_states.personal_params, IDS[0])}
        head = train_head_alone(own["extractor"], own["head"], batch.x[0], batch.y[0],
                                batch.mask[0], batch.rng[0])
        assert_trees_close(row(after_both.client_states.personal_params, IDS[0])["head"], head)


def test_fedbabu_never_trains_the_head_and_fine_tunes_it_to_predict():
    """FedBABU: after two rounds the head is its random initialisation bit for bit, the body has
    moved; `adapted_predict` (head fine-tuning) equals training the head alone on the support
    row, then predicting the query row; bytes count the body only."""
    with jax.enable_x64(True):
        algorithm = fedbabu(SPLIT, SGD, num_epochs=1, finetune_epochs=2, finetune="head", **JOB)
        state = state64(algorithm)
        round_fn = jax.jit(algorithm.round)
        new = round_fn(round_fn(state, batch64(0)), batch64(1))
        assert_trees_equal(new.params["head"], state.params["head"])
        assert float(optax.tree.norm(optax.tree.sub(new.params["extractor"],
                                                    state.params["extractor"]))) > 0
        assert float(new.metrics["bytes_up"]) == 3 * tree_bytes(state.params["extractor"])
        support, query = batch64(2), batch64(3)
        adapted = jax.jit(algorithm.adapted_predict)(new, support, query)
        body = new.params["extractor"]
        head = train_head_alone(body, new.params["head"], support.x[0], support.y[0],
                                support.mask[0],
                                jax.random.fold_in(support.rng[0], _FINETUNE_STREAM))
        assert_trees_close(adapted[0], SPLIT.apply({"extractor": body, "head": head},
                                                   query.x[0]))
        plain = jax.jit(algorithm.predict)(new, query)
        assert float(jnp.max(jnp.abs(adapted[0] - plain[0]))) > 1e-3


def test_fedbn_keeps_batch_norm_per_client_and_averages_the_rest():
    """FedBN on an MLP with BatchNorm: each sampled client's BatchNorm scale, bias and running
    statistics are its own training's; the global BatchNorm stays initial; the dense layers are
    the weighted mean; bytes count the dense layers only."""
    with jax.enable_x64(True):
        model = mlp((NUM_FEATURES,), NUM_CLASSES, hidden=(4,), batch_norm=True)
        batch = batch64()
        algorithm = partial_sharing(model, SGD, is_personal=is_batch_norm,
                                    phases=((None, 2),), **JOB)
        state = state64(algorithm, personal_noise=0.2)
        population = state.client_states.personal_params
        assert set(population) == {"params", "batch_stats"}
        new = jax.jit(algorithm.round)(state, batch)
        shared, _ = partition(state.params, is_batch_norm)
        trained_shared, weights = [], np.asarray(SIZES, np.float64) / sum(SIZES)
        for i, client in enumerate(IDS):
            own = _merge_bn(state.params, row(population, client))
            trained = train_alone(model, own, batch, i)
            shared_i, personal_i = partition(trained, is_batch_norm)
            trained_shared.append(shared_i)
            expected = row(population, client) if i == PADDED else personal_i
            assert_trees_equal(row(new.client_states.personal_params, client), expected)
        for client in UNSAMPLED:
            assert_trees_equal(row(new.client_states.personal_params, client),
                               row(population, client))
        new_shared, new_bn = partition(new.params, is_batch_norm)
        assert_trees_close(new_shared, jax.tree.map(
            lambda *s: sum(w * leaf for w, leaf in zip(weights, s)), *trained_shared))
        assert_trees_equal(new_bn, partition(state.params, is_batch_norm)[1])
        assert float(new.metrics["bytes_up"]) == 3 * tree_bytes(shared)


def _merge_bn(params, bn):
    """`params` with its BatchNorm leaves replaced by the client's `bn` (nested dicts)."""
    merged = {collection: dict(params.get(collection, {})) for collection in params}
    for collection, layers in bn.items():
        merged[collection].update(layers)
    return merged
