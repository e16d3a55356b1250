"""pFedHN invariants (ALGORITHMS.md section 9e): the VJP update is the gradient of
1/2 ||h - sg(theta~)||^2, one SGD step makes it alpha times the end-to-end gradient, only sampled
clients' embeddings and heads change, the generated tree is the target's, a frozen hypernetwork
fits a new client through its embedding alone, and only generated weights travel."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common import NUM_CLASSES, NUM_FEATURES, assert_trees_close, assert_trees_equal, \
    make_clients, stack_clients
from fedjax_lab.algorithms.pfedhn import PFedHNConfig, build, hypernetwork_generator, pfedhn
from fedjax_lab.core.types import DataInfo
from fedjax_lab.options import OptionError, from_dict
from fedjax_lab.core import client_weights, local_train, model_loss
from fedjax_lab.models import mlp
from fedjax_lab.models.split import split_mlp

TARGET = split_mlp((NUM_FEATURES,), NUM_CLASSES, hidden=(6, 4))
HN = dict(hidden=8, num_hidden=1, embedding_dim=3)
SIZES = [9, 4, 13, 6]
COHORT = [3, 0, 2]


def to_float64(tree):
    return jax.tree.map(lambda leaf: leaf.astype(jnp.float64)
                        if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf, tree)


def float64_state(algorithm):
    return to_float64(algorithm.init(jax.random.key(1)))


def cohort_batch(xs, ys):
    return stack_clients([xs[i] for i in COHORT], [ys[i] for i in COHORT], padded_length=16,
                         client_ids=COHORT, seed=2)


def split_grads(state, new):
    """With server SGD of rate 1 the server's step is minus its pseudo-gradient."""
    return jax.tree.map(lambda old, updated: old - updated, state.hypernetwork, new.hypernetwork)


@pytest.mark.parametrize("personal_head", [False, True])
def test_vjp_update_is_the_gradient_of_regressing_onto_the_trained_weights(personal_head):
    with jax.enable_x64(True):
        xs, ys = make_clients(SIZES, dtype=np.float64)
        batch = cohort_batch(xs, ys)
        client_optimizer = optax.sgd(0.1, momentum=0.9)
        algorithm = pfedhn(TARGET, client_optimizer, num_clients=4, **HN,
                           server_optimizer=optax.sgd(1.0), personal_head=personal_head,
                           num_epochs=2, batch_size=3, weighting="num_examples")
        state = float64_state(algorithm)
        new = jax.jit(algorithm.round)(state, batch)
        grads = split_grads(state, new)

        generate, _ = hypernetwork_generator(TARGET, personal_head=personal_head,
                                             hidden=HN["hidden"], num_hidden=HN["num_hidden"])
        network, embeddings = state.hypernetwork.network, state.hypernetwork.embeddings
        train = jax.jit(lambda params, k: local_train(
            model_loss(TARGET.apply), client_optimizer, params, batch.x[k], batch.y[k],
            batch.mask[k], batch.rng[k], num_epochs=2, batch_size=3).params)
        trained, heads = [], []
        for k, i in enumerate(COHORT):
            theta = generate(network, embeddings[i])
            if personal_head:
                result = train({"extractor": theta, "head": jax.tree.map(
                    lambda h: h[i], state.client_states.head)}, k)
                trained.append(result["extractor"])
                heads.append(result["head"])
            else:
                trained.append(train(theta, k))
        weights = client_weights(batch.num_examples)

        def regression(network, embedding, target):
            return 0.5 * optax.tree.norm(optax.tree.sub(generate(network, embedding), target),
                                         squared=True)

        @jax.jit
        def expected(network, embeddings, trained):
            network_grad = jax.grad(lambda phi: sum(
                w * regression(phi, embeddings[i], target)
                for w, i, target in zip(weights, COHORT, trained)))(network)
            return network_grad, [jax.grad(regression, 1)(network, embeddings[i], target)
                                  for i, target in zip(COHORT, trained)]

        expected_network, expected_embeddings = expected(network, embeddings, trained)
        assert_trees_close(grads.network, expected_network, rtol=1e-10, atol=1e-12)
        for i, expected_embedding in zip(COHORT, expected_embeddings):
            np.testing.assert_allclose(grads.embeddings[i], expected_embedding, rtol=1e-10,
                                       atol=1e-12)
        # Plain server SGD: client 1 (not sampled) keeps its embedding and its head.
        np.testing.assert_array_equal(new.hypernetwork.embeddings[1],
                                      state.hypernetwork.embeddings[1])
        assert np.all(np.asarray(grads.embeddings)[COHORT] != 0)
        if personal_head:
            for i, head in zip(COHORT, heads):
                assert_trees_close(jax.tree.map(lambda h: h[i], new.client_states.head), head)
            assert_trees_equal(jax.tree.map(lambda h: h[1], new.client_states.head),
                               jax.tree.map(lambda h: h[1], state.client_states.head))
        else:
            assert new.client_states == ()

        # Each cohort client downloads its generated weights and uploads Delta of the same size
        # (float64 here); the hypernetwork and the private heads never travel.
        extractor_size = 5 * 6 + 6 + 6 * 4 + 4
        size = 8 * (extractor_size if personal_head else extractor_size + 4 * 3 + 3)
        assert float(new.metrics["bytes_down"]) == float(new.metrics["bytes_up"]) == 3 * size


@pytest.mark.parametrize("personal_head, jit", [(False, False), (True, True)])
def test_one_sgd_step_is_alpha_times_the_end_to_end_gradient(personal_head, jit):
    with jax.enable_x64(True):
        alpha = 0.3
        xs, ys = make_clients(SIZES, dtype=np.float64)
        batch = cohort_batch(xs, ys)
        algorithm = pfedhn(TARGET, optax.sgd(alpha), num_clients=4, **HN,
                           server_optimizer=optax.sgd(1.0), personal_head=personal_head,
                           num_epochs=1, batch_size=None)
        state = float64_state(algorithm)
        round_fn = jax.jit(algorithm.round) if jit else algorithm.round
        grads = split_grads(state, round_fn(state, batch))

        generate, _ = hypernetwork_generator(TARGET, personal_head=personal_head,
                                             hidden=HN["hidden"], num_hidden=HN["num_hidden"])
        loss = model_loss(TARGET.apply)

        def client_loss(network, embedding, k):
            params = generate(network, embedding)
            if personal_head:
                params = {"extractor": params,
                          "head": jax.tree.map(lambda h: h[COHORT[k]], state.client_states.head)}
            return loss(params, batch.x[k], batch.y[k], batch.mask[k], None)

        @jax.jit
        def end_to_end(network, embeddings):
            network_grad = jax.grad(lambda phi: sum(
                client_loss(phi, embeddings[i], k) for k, i in enumerate(COHORT)) / 3)(network)
            return network_grad, [jax.grad(client_loss, 1)(network, embeddings[i], k)
                                  for k, i in enumerate(COHORT)]

        expected_network, expected_embeddings = end_to_end(state.hypernetwork.network,
                                                            state.hypernetwork.embeddings)
        assert_trees_close(grads.network, jax.tree.map(lambda g: alpha * g, expected_network),
                           rtol=1e-8, atol=1e-10)
        for i, expected_embedding in zip(COHORT, expected_embeddings):
            np.testing.assert_allclose(grads.embeddings[i], alpha * expected_embedding,
                                       rtol=1e-8, atol=1e-10)


def test_generated_tree_is_the_target_tree():
    for personal_head in (False, True):
        generate, module = hypernetwork_generator(TARGET, personal_head=personal_head,
                                                  hidden=8, num_hidden=2)
        generated = jax.eval_shape(lambda: generate(
            module.init(jax.random.key(0), jnp.zeros(3))["params"], jnp.ones(3)))
        expected = jax.eval_shape(TARGET.init, jax.random.key(0))
        expected = expected["extractor"] if personal_head else expected
        assert jax.tree.structure(generated) == jax.tree.structure(expected)
        assert jax.tree.map(lambda a: (a.shape, a.dtype), generated) == \
            jax.tree.map(lambda a: (a.shape, a.dtype), expected)


def test_frozen_hypernetwork_fits_a_new_client_through_its_embedding_only():
    xs, ys = make_clients([30, 30], seed=4)
    frozen = pfedhn(TARGET, optax.sgd(0.1), num_clients=2, **HN, batch_size=8,
                    freeze_network=True, server_optimizer=optax.sgd(0.5))
    # The network another run trained; here, one drawn from another key.
    network = frozen.init(jax.random.key(0)).hypernetwork.network
    state = frozen.init(jax.random.key(1))
    state = state._replace(hypernetwork=state.hypernetwork._replace(network=network))
    round_fn = jax.jit(frozen.round)
    losses = []
    for t in range(8):
        state = round_fn(state, stack_clients(xs, ys, round_index=t))
        losses.append(float(state.metrics["train_loss"]))
    assert_trees_equal(state.hypernetwork.network, network)
    assert losses[-1] < losses[0]


def test_bad_hyperparameters_are_refused_in_one_line():
    with pytest.raises(ValueError, match="embedding_dim=0 is invalid"):
        pfedhn(TARGET, optax.sgd(0.1), num_clients=4, embedding_dim=0)
    with pytest.raises(ValueError, match="num_hidden=-1 is invalid"):
        pfedhn(TARGET, optax.sgd(0.1), num_clients=4, num_hidden=-1)
    with pytest.raises(ValueError, match="personal_head=True needs a SplitModel"):
        pfedhn(mlp((NUM_FEATURES,), NUM_CLASSES), optax.sgd(0.1), num_clients=4,
               personal_head=True)
    with pytest.raises(ValueError, match="weighting 'size' is unknown"):
        pfedhn(TARGET, optax.sgd(0.1), num_clients=4, weighting="size")


def test_the_registry_builder_refuses_pfedhn_pc_on_a_model_without_a_head():
    info = DataInfo(4, NUM_CLASSES, (NUM_FEATURES,), 12)
    config = from_dict(PFedHNConfig, {"personal_head": True})
    with pytest.raises(OptionError, match=r"algorithm.personal_head=True .*needs a split model"):
        build(config, mlp((NUM_FEATURES,), NUM_CLASSES), info)
    algorithm = build(from_dict(PFedHNConfig, {"personal_head": True, "client": {"epochs": 2}}),
                      TARGET, info)
    state = algorithm.init(jax.random.key(0))
    assert state.hypernetwork.embeddings.shape == (4, 2)  # the reference's m = 1 + N // 4
    assert jax.tree.leaves(state.client_states.head)[0].shape[0] == 4
