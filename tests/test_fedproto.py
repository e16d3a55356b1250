"""FedProto invariants (ALGORITHMS.md section 4e): lambda = 0 is local training, the prototypes'
weighted mean with absent classes masked, the per-sample regulariser, nearest-prototype
inference, and clients of two architectures in one round."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common import NUM_CLASSES, NUM_FEATURES, assert_trees_close, assert_trees_equal, \
    make_clients, stack_clients
from fedjax_lab.algorithms.fedproto import (aggregate_prototypes, fedproto, local_prototypes,
                                            prototype_logits, prototype_loss)
from fedjax_lab.algorithms.fedproto import FedProtoConfig, build
from fedjax_lab.core import client_key, experiment_key, local_train, model_loss
from fedjax_lab.core.types import DataInfo
from fedjax_lab.options import from_dict
from fedjax_lab.models.split import split_mlp

SIZES = [9, 4, 13, 6]
NARROW = split_mlp((NUM_FEATURES,), NUM_CLASSES, hidden=(6, 4))
WIDE = split_mlp((NUM_FEATURES,), NUM_CLASSES, hidden=(10, 8, 4))


@functools.cache
def single_architecture():
    """FedProto (lambda = 1) over the four SIZES clients and its jitted round, compiled once."""
    algorithm = fedproto(NARROW, optax.sgd(0.1), num_clients=4, lam=1.0, batch_size=3)
    return algorithm, jax.jit(algorithm.round)


def to_float64(tree):
    return jax.tree.map(lambda leaf: leaf.astype(jnp.float64)
                        if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf, tree)


def row(population, i):
    return jax.tree.map(lambda leaf: leaf[i], population)


def noisy_client_1(xs):
    """The clients' inputs with client 1's replaced by noise."""
    noisy = [x.copy() for x in xs]
    noisy[1] = np.random.default_rng(9).normal(size=noisy[1].shape).astype(noisy[1].dtype)
    return noisy


def test_lambda_zero_is_independent_local_training():
    with jax.enable_x64(True):
        xs, ys = make_clients(SIZES, dtype=np.float64)
        optimizer = optax.sgd(0.1, momentum=0.5)
        algorithm = fedproto(NARROW, optimizer, num_clients=4, lam=0.0, num_epochs=2,
                             batch_size=3)
        init_key = jax.random.key(5)
        round_fn = jax.jit(algorithm.round)
        cohorts = ([0, 1, 2, 3], [2, 0])
        finals = []
        for data in (xs, noisy_client_1(xs)):
            state = to_float64(algorithm.init(init_key))
            for t, ids in enumerate(cohorts):
                state = round_fn(state, stack_clients([data[i] for i in ids],
                                                      [ys[i] for i in ids], padded_length=16,
                                                      round_index=t, client_ids=ids))
            finals.append(state.client_states.models[0])
        others = np.array([0, 2, 3])
        assert_trees_equal(row(finals[0], others), row(finals[1], others))

        alone = stack_clients(xs, ys, padded_length=16)
        train = jax.jit(lambda params, i, rng: local_train(
            model_loss(NARROW.apply), optimizer, params, alone.x[i], alone.y[i], alone.mask[i],
            rng, num_epochs=2, batch_size=3).params)
        for i in range(4):
            expected = to_float64(NARROW.init(jax.random.fold_in(init_key, i)))
            for t, ids in enumerate(cohorts):
                if i in ids:
                    expected = train(expected, i, client_key(experiment_key(0), t, i))
            assert_trees_close(row(finals[0], i), expected, rtol=1e-12, atol=1e-13)


def test_positive_lambda_couples_clients_through_the_prototypes():
    xs, ys = make_clients(SIZES)
    algorithm, round_fn = single_architecture()
    finals = []
    for data in (xs, noisy_client_1(xs)):
        state = algorithm.init(jax.random.key(0))
        for t in range(2):
            state = round_fn(state, stack_clients(data, ys, round_index=t))
        finals.append(state.client_states.models[0])
    others = np.array([0, 2, 3])
    changed = jax.tree.map(lambda a, b: not np.array_equal(a[others], b[others]), *finals)
    assert any(jax.tree.leaves(changed))


def test_aggregation_is_the_chosen_weighted_mean_masks_absent_classes_and_ignores_order():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        prototypes = rng.normal(size=(3, 4, 2))
        counts = np.array([[5, 0, 2, 0], [1, 3, 0, 0], [2, 2, 0, 0]])
        expected_uniform = np.stack([prototypes[:, 0].mean(0), prototypes[1:, 1].mean(0),
                                     prototypes[0, 2], np.zeros(2)])
        expected_sized = np.stack([(5 * prototypes[0, 0] + prototypes[1, 0]
                                    + 2 * prototypes[2, 0]) / 8,
                                   (3 * prototypes[1, 1] + 2 * prototypes[2, 1]) / 5,
                                   prototypes[0, 2], np.zeros(2)])
        for weighting, expected in (("uniform", expected_uniform),
                                    ("num_examples", expected_sized)):
            for order in ([0, 1, 2], [2, 0, 1]):
                aggregated, present = aggregate_prototypes(jnp.asarray(prototypes[order]),
                                                           jnp.asarray(counts[order]),
                                                           weighting=weighting)
                np.testing.assert_allclose(aggregated, expected, rtol=1e-14, atol=1e-15)
                np.testing.assert_array_equal(present, [True, True, True, False])


def test_local_prototypes_are_class_means_of_real_examples():
    features = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 0.0], [9.0, 9.0]])
    labels = jnp.array([0, 0, 2, 1])
    mask = jnp.array([True, True, True, False])
    prototypes, counts = local_prototypes(features, labels, mask, 3)
    np.testing.assert_allclose(prototypes, [[2.0, 3.0], [0.0, 0.0], [5.0, 0.0]])
    np.testing.assert_array_equal(counts, [2, 0, 1])


def test_round_prototypes_come_from_trained_embeddings_jitted_or_not_in_any_order():
    xs, ys = make_clients(SIZES)
    algorithm, round_fn = single_architecture()
    state = algorithm.init(jax.random.key(2))
    batch = stack_clients(xs, ys)
    new = round_fn(state, batch)
    assert_trees_close(algorithm.round(state, batch), new, rtol=1e-5, atol=1e-6)
    order = [3, 1, 0, 2]
    shuffled = round_fn(state, stack_clients([xs[i] for i in order], [ys[i] for i in order],
                                             client_ids=order))
    np.testing.assert_allclose(new.prototypes, shuffled.prototypes, rtol=1e-6, atol=1e-6)
    assert_trees_equal(new.client_states, shuffled.client_states)

    # Uniform weighting: the mean over clients of each client's class mean of its embeddings
    # under its trained model.
    trained = new.client_states.models[0]
    features = [np.asarray(NARROW.extract(row(trained, i), batch.x[i]))[:len(y)]
                for i, y in enumerate(ys)]
    for c in range(NUM_CLASSES):
        class_means = [f[y == c].mean(0) for f, y in zip(features, ys) if c in y]
        np.testing.assert_allclose(new.prototypes[c], np.mean(class_means, 0), rtol=1e-5,
                                   atol=1e-6)
    assert bool(np.all(new.prototype_mask))
    np.testing.assert_array_equal(new.client_states.classes,
                                  [[c in y for c in range(NUM_CLASSES)] for y in ys])

    # Nearest-prototype inference over all classes vs over the client's own classes only.
    only_class_0 = new._replace(client_states=new.client_states._replace(
        classes=new.client_states.classes.at[0].set([True, False, False])))
    predictions = {inference: np.argmax(jax.jit(fedproto(
        NARROW, optax.sgd(0.1), num_clients=4, inference=inference).predict)(
            only_class_0, batch)[0, :SIZES[0]], -1)
        for inference in ("prototype", "local_prototype")}
    assert np.any(predictions["prototype"] != 0)
    np.testing.assert_array_equal(predictions["local_prototype"], 0)


def test_prototype_loss_is_per_sample_and_zero_at_the_prototypes():
    prototypes = jnp.array([[1.0, -1.0], [0.0, 2.0], [5.0, 5.0]])
    present = jnp.array([True, True, False])
    labels = jnp.array([0, 1, 2])
    mask = jnp.ones(3, bool)
    assert float(prototype_loss(prototypes[labels], labels, mask, prototypes, present)) == 0.0
    # Two class-0 samples whose mean is the prototype: a class-mean regulariser would give 0.
    features = jnp.array([[2.0, -1.0], [0.0, -1.0]])
    loss = prototype_loss(features, jnp.array([0, 0]), jnp.ones(2, bool), prototypes, present)
    np.testing.assert_allclose(loss, 0.5)
    # A class without a global prototype adds nothing, but counts in the mean (the reference's).
    features = jnp.array([[2.0, -1.0], [40.0, 7.0]])
    loss = prototype_loss(features, jnp.array([0, 2]), jnp.ones(2, bool), prototypes, present)
    np.testing.assert_allclose(loss, 0.25)


def test_nearest_prototype_separates_blobs_and_restricts_to_allowed_classes():
    rng = np.random.default_rng(1)
    centres = 10.0 * rng.normal(size=(4, 3))
    labels = np.repeat(np.arange(4), 25)
    features = jnp.asarray(centres[labels] + rng.normal(size=(100, 3)), jnp.float32)
    prototypes, _ = local_prototypes(features, jnp.asarray(labels), jnp.ones(100, bool), 4)
    logits = prototype_logits(features, prototypes, jnp.ones(4, bool))
    np.testing.assert_array_equal(np.argmax(logits, -1), labels)
    allowed = jnp.array([False, True, True, False])
    restricted = np.argmax(prototype_logits(features, prototypes, allowed), -1)
    assert set(restricted.tolist()) <= {1, 2}
    np.testing.assert_array_equal(restricted[(labels == 1) | (labels == 2)],
                                  labels[(labels == 1) | (labels == 2)])


def test_two_architectures_train_in_one_round_and_share_prototypes():
    xs, ys = make_clients([8, 5, 11, 7, 9])
    architecture_of = [0, 1, 0, 1, 1]
    models = (NARROW, WIDE)
    algorithm = fedproto(models, optax.sgd(0.1), num_clients=5, architecture_of=architecture_of,
                         batch_size=4)
    state = algorithm.init(jax.random.key(3))
    # Each architecture's stack spans the population; rows are client ids.
    assert [jax.tree.leaves(s)[0].shape[0] for s in state.client_states.models] == [5, 5]
    ids = [4, 0, 1, 3]
    batch = stack_clients([xs[i] for i in ids], [ys[i] for i in ids], client_ids=ids)
    new = jax.jit(algorithm.round)(state, batch)
    # Client 2 (architecture 0) was not sampled; every other client was.
    assert_trees_equal(row(state.client_states.models[0], 2), row(new.client_states.models[0], 2))
    for g, rows in ((0, [0]), (1, [1, 3, 4])):
        for r in rows:
            head_bias = lambda s: row(s.client_states.models[g], r)["head"]["Dense_0"]["bias"]
            assert not np.array_equal(head_bias(state), head_bias(new))
    assert int(new.metrics["participants"]) == 4 and int(new.metrics["num_prototypes"]) == 3

    reports = [local_prototypes(models[architecture_of[i]].extract(
        row(new.client_states.models[architecture_of[i]], i), batch.x[k]), batch.y[k],
        batch.mask[k], NUM_CLASSES) for k, i in enumerate(ids)]
    expected, _ = aggregate_prototypes(jnp.stack([p for p, _ in reports]),
                                       jnp.stack([c for _, c in reports]))
    np.testing.assert_allclose(new.prototypes, expected, rtol=1e-5, atol=1e-6)

    # Evaluation batches may repeat a client (the evaluator's last chunk does).
    evaluation = stack_clients([xs[1], xs[0], xs[1]], [ys[1], ys[0], ys[1]], client_ids=[1, 0, 1])
    head_logits = jax.jit(algorithm.predict)(new, evaluation)
    np.testing.assert_allclose(head_logits[:2],
                               [WIDE.apply(row(new.client_states.models[1], 1), evaluation.x[0]),
                                NARROW.apply(row(new.client_states.models[0], 0), evaluation.x[1])],
                               rtol=1e-6)
    prototype_predict = fedproto(models, optax.sgd(0.1), num_clients=5,
                                 architecture_of=architecture_of,
                                 inference="local_prototype").predict
    for logits in (head_logits, jax.jit(prototype_predict)(new, evaluation)):
        assert logits.shape == (3, 8, NUM_CLASSES)
        np.testing.assert_array_equal(logits[0], logits[2])


def test_communication_counts_prototypes_not_weights():
    xs, ys = make_clients(SIZES)
    algorithm, round_fn = single_architecture()
    metrics = round_fn(algorithm.init(jax.random.key(0)), stack_clients(xs, ys)).metrics
    dim = NARROW.latent_dim
    assert float(metrics["bytes_up"]) == 4 * (NUM_CLASSES * dim * 4 + NUM_CLASSES * 4)
    assert float(metrics["bytes_down"]) == 4 * (NUM_CLASSES * dim * 4 + NUM_CLASSES)


def test_bad_hyperparameters_are_refused_in_one_line():
    with pytest.raises(ValueError, match="lam=-1 is invalid"):
        fedproto(NARROW, optax.sgd(0.1), num_clients=2, lam=-1)
    with pytest.raises(ValueError, match="inference 'knn' is unknown"):
        fedproto(NARROW, optax.sgd(0.1), num_clients=2, inference="knn")
    with pytest.raises(ValueError, match="one embedding size"):
        fedproto([NARROW, split_mlp((NUM_FEATURES,), NUM_CLASSES, hidden=(5,))],
                 optax.sgd(0.1), num_clients=2, architecture_of=[0, 1])
    with pytest.raises(ValueError, match="unused \\[1\\]"):
        fedproto([NARROW, WIDE], optax.sgd(0.1), num_clients=2, architecture_of=[0, 0])
    with pytest.raises(ValueError, match="architecture_of has shape"):
        fedproto(NARROW, optax.sgd(0.1), num_clients=3, architecture_of=[0, 0])


def test_the_registry_builder_runs_a_round_on_one_architecture():
    xs, ys = make_clients(SIZES)
    config = from_dict(FedProtoConfig, {"lam": 0.5, "inference": "prototype"})
    algorithm = build(config, NARROW, DataInfo(6, NUM_CLASSES, (NUM_FEATURES,), 16))
    state = jax.jit(algorithm.round)(algorithm.init(jax.random.key(0)),
                                     stack_clients(xs, ys, client_ids=[5, 0, 2, 3]))
    assert int(state.metrics["participants"]) == 4
    assert np.asarray(state.client_states.classes)[[1, 4]].sum() == 0
    logits = algorithm.predict(state, stack_clients(xs, ys, client_ids=[5, 0, 2, 3]))
    assert logits.shape == (4, max(SIZES), NUM_CLASSES) and bool(jnp.all(jnp.isfinite(logits)))
