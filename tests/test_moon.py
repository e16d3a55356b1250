"""MOON invariants (Li, He, Song, CVPR 2021, arXiv 2103.16257): mu = 0 is FedAvg bit for bit, the
model-contrastive loss is its formula (log 2 when z_glob = z_prev) with its gradient only through
the local representation, each sampled client stores the local model it trained and contrasts
with it in its next round, unsampled and padded rows stay untouched, bad options are named."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common import (NUM_CLASSES, NUM_FEATURES, assert_trees_close, assert_trees_equal,
                    make_clients, stack_clients)
from fedjax_lab.algorithms.fedavg import FedAvgState, fedavg
from fedjax_lab.algorithms.moon import (MoonConfig, contrastive_loss_fn, model_contrastive_loss,
                                        moon)
from fedjax_lab.algorithms.spec import ClientTraining
from fedjax_lab.core import local_train
from fedjax_lab.models import mlp, split_mlp
from fedjax_lab.options import OptionError, from_dict

MODEL = split_mlp((NUM_FEATURES,), NUM_CLASSES, hidden=(8, 6))
MU, TAU, LR = 2.0, 0.5, 0.2
POPULATION = 6
OPTIONS = dict(num_epochs=2, batch_size=3)
PADDED_LENGTH = 13
# One configuration and one cohort shape (3 rows of 13) for the float64 round tests, so its init,
# its round and the separate local training each compile once.
ALGORITHM = moon(MODEL, optax.sgd(LR), num_clients=POPULATION, mu=MU, temperature=TAU,
                 **OPTIONS)
ROUND = jax.jit(ALGORITHM.round)


def row(tree, index):
    return jax.tree.map(lambda leaf: leaf[index], tree)


def to_float64(tree):
    return jax.tree.map(lambda leaf: leaf.astype(jnp.float64)
                        if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf, tree)


@jax.jit
def initial_state(key):
    """`ALGORITHM.init`'s state in float64 (call inside `jax.enable_x64`), jitted: eager inits
    compile every small op on its own. Its structure is every MOON state's over POPULATION
    clients of a split MLP of widths (8, 6), with or without dropout."""
    return to_float64(ALGORITHM.init(key))


def random_params(seed, scale=0.5):
    """Float64 parameters of MODEL drawn in numpy (no compile)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(MODEL.init, jax.random.key(0))
    return jax.tree.map(lambda leaf: scale * rng.normal(size=leaf.shape), shapes)


@jax.jit
def separate_local_training(global_params, previous_params, x, y, mask, rng):
    """A client's local training outside the round: `local_train` of the same loss."""
    loss = contrastive_loss_fn(MODEL, MU, TAU, global_params, previous_params)
    return local_train(loss, optax.sgd(LR), global_params, x, y, mask, rng, **OPTIONS).params


def numpy_contrastive_loss(z, z_glob, z_prev, mask, temperature):
    """The paper's l_con, written out in float64 numpy."""
    def cosine(a, b):
        return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    positive = np.exp(cosine(z, z_glob) / temperature)
    negative = np.exp(cosine(z, z_prev) / temperature)
    per_example = -np.log(positive / (positive + negative))
    return np.sum(per_example * mask) / np.sum(mask)


def test_mu_zero_is_fedavg_bit_for_bit_over_two_rounds():
    """The same split model (with dropout: the local representation must come from the logits'
    own training pass and dropout draws), sample weights and client optimiser (momentum and
    weight decay, the paper's). The second round repeats client 2, whose previous model then
    differs from the global one, so 0 * l_con is a real term; client 0 is a padded row in round
    1. FedAvg starts from MOON's initial state: with the suite's XLA optimisations off
    (conftest.py), FedAvg's own init program rounds the same key's weights differently in the
    last bit."""
    with jax.enable_x64(True):
        model = split_mlp((NUM_FEATURES,), NUM_CLASSES, hidden=(8, 6), dropout=0.3)
        xs, ys = make_clients([9, 4, 13, 6], dtype=np.float64)
        optimizer = ClientTraining(lr=0.05, momentum=0.9, weight_decay=1e-5).optimizer()
        contrastive = moon(model, optimizer, num_clients=POPULATION, mu=0.0, **OPTIONS)
        average = fedavg(model, optimizer, weighting="num_examples", dense_update="per_client",
                         **OPTIONS)
        moon_state = initial_state(jax.random.key(0))
        fedavg_state = FedAvgState(moon_state.params, moon_state.opt_state, moon_state.round,
                                   moon_state.metrics)
        moon_round, fedavg_round = jax.jit(contrastive.round), jax.jit(average.round)
        for round_index, (ids, sizes) in enumerate([([3, 2, 5, 0], [9, 4, 13, 0]),
                                                    ([1, 4, 2, 3], [9, 4, 13, 6])]):
            batch = stack_clients([x[:n] for x, n in zip(xs, sizes)],
                                  [y[:n] for y, n in zip(ys, sizes)], padded_length=13,
                                  client_ids=ids, round_index=round_index)
            if round_index == 1:
                assert float(optax.tree.norm(optax.tree.sub(
                    row(moon_state.client_states.previous_params, 2), moon_state.params))) > 1e-3
            moon_state = moon_round(moon_state, batch)
            fedavg_state = fedavg_round(fedavg_state, batch)
            assert_trees_equal(moon_state.params, fedavg_state.params)
            assert_trees_equal(moon_state.metrics, fedavg_state.metrics)


def test_contrastive_loss_is_the_papers_formula_and_log_two_when_the_models_agree():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        z, z_glob, z_prev = (rng.normal(size=(6, 4)) for _ in range(3))
        mask = np.array([True, True, True, True, True, False])
        z[5] = 0.0  # a padded example's ReLU features: finite loss and gradient, no weight
        value_and_grad = jax.jit(jax.value_and_grad(model_contrastive_loss))
        for temperature in (0.5, 2.0):
            value, gradient = value_and_grad(z, z_glob, z_prev, mask, temperature)
            expected = numpy_contrastive_loss(z[:5], z_glob[:5], z_prev[:5], mask[:5],
                                              temperature)
            np.testing.assert_allclose(float(value), expected, rtol=1e-13)
            assert np.all(np.isfinite(gradient)) and not np.any(gradient[5])
        value, gradient = value_and_grad(z, z_glob, z_glob, mask, TAU)
        assert abs(float(value) - np.log(2)) < 1e-15
        # With z_glob = z_prev the two similarities are equal whatever z is: no gradient.
        np.testing.assert_allclose(gradient, 0, atol=1e-15)


def test_gradient_flows_only_through_the_local_representation():
    """The loss has no gradient in the frozen global and previous models, and local_train's one
    full-batch step is w - lr * grad of CE + mu * l_con with z_glob, z_prev held constant."""
    with jax.enable_x64(True):
        w, global_params, previous_params = (random_params(seed) for seed in range(3))
        xs, ys = make_clients([7], dtype=np.float64, seed=4)
        batch = stack_clients(xs, ys, padded_length=9)
        real_x, real_y = xs[0], ys[0]

        @jax.jit
        def check(w, global_params, previous_params, x, y, mask, rng):
            frozen_gradients = jax.grad(
                lambda g, p: contrastive_loss_fn(MODEL, MU, TAU, g, p)(w, x, y, mask, rng),
                argnums=(0, 1))(global_params, previous_params)
            # The frozen models' representations as constants: no gradient can reach them.
            z_glob = MODEL.extract(global_params, real_x)
            z_prev = MODEL.extract(previous_params, real_x)

            def hand_loss(params):
                logits = MODEL.apply(params, real_x)
                log_probabilities = jax.nn.log_softmax(logits)
                supervised = -jnp.mean(log_probabilities[np.arange(len(real_y)), real_y])
                z = MODEL.extract(params, real_x)
                cosine = lambda a, b: jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) *
                                                             jnp.linalg.norm(b, axis=-1))
                positive = jnp.exp(cosine(z, z_glob) / TAU)
                negative = jnp.exp(cosine(z, z_prev) / TAU)
                return supervised + MU * jnp.mean(-jnp.log(positive / (positive + negative)))

            expected = jax.tree.map(lambda p, g: p - LR * g, w, jax.grad(hand_loss)(w))
            step = local_train(contrastive_loss_fn(MODEL, MU, TAU, global_params,
                                                   previous_params),
                               optax.sgd(LR), w, x, y, mask, rng, num_epochs=1,
                               batch_size=None).params
            return frozen_gradients, expected, step

        frozen_gradients, expected, step = check(w, global_params, previous_params, batch.x[0],
                                                 batch.y[0], batch.mask[0], batch.rng[0])
        assert not any(np.any(leaf) for leaf in jax.tree.leaves(frozen_gradients))
        assert_trees_close(step, expected)
        assert float(optax.tree.norm(optax.tree.sub(step, w))) > 1e-3


def test_each_client_stores_its_own_local_model_and_contrasts_with_it_next_round():
    """Round 1 (clients 4 and 1, client 5 a padded row) from w^0: each stored w_i equals a
    separate local_train of the same loss with z_prev from w^0; the global model is their
    sample-weighted mean. Round 2 (clients 1 and 3, client 0 padded): client 1 contrasts with
    ITS round-1 model (not w^1), client 3 with w^0. Unsampled and padded rows stay bit for
    bit."""
    with jax.enable_x64(True):
        xs, ys = make_clients([9, 4, 0, 13], dtype=np.float64, seed=3)
        state = initial_state(jax.random.key(0))
        initial = state.params
        first = stack_clients(xs[:3], ys[:3], padded_length=PADDED_LENGTH, client_ids=[4, 1, 5])
        after_first = ROUND(state, first)

        trained = {}
        for position, client in enumerate([4, 1]):
            trained[client] = separate_local_training(
                initial, initial, first.x[position], first.y[position], first.mask[position],
                first.rng[position])
            assert_trees_close(row(after_first.client_states.previous_params, client),
                               trained[client])
        assert_trees_close(after_first.params, jax.tree.map(
            lambda a, b: (9 * a + 4 * b) / 13, trained[4], trained[1]))
        for client in (0, 2, 3, 5):
            assert_trees_equal(row(after_first.client_states.previous_params, client), initial)

        second = stack_clients([xs[1], xs[3], xs[2]], [ys[1], ys[3], ys[2]],
                               padded_length=PADDED_LENGTH, client_ids=[1, 3, 0],
                               round_index=1)
        after_second = ROUND(after_first, second)
        global_params = after_first.params
        for position, (client, previous) in enumerate([(1, trained[1]), (3, initial)]):
            expected = separate_local_training(
                global_params, previous, second.x[position], second.y[position],
                second.mask[position], second.rng[position])
            assert_trees_close(row(after_second.client_states.previous_params, client), expected)
        # Contrasting with the last global model instead gives another client 1.
        wrong = separate_local_training(global_params, global_params, second.x[0], second.y[0],
                                        second.mask[0], second.rng[0])
        assert float(optax.tree.norm(optax.tree.sub(
            wrong, row(after_second.client_states.previous_params, 1)))) > 1e-6
        for client in (0, 2, 5):
            assert_trees_equal(row(after_second.client_states.previous_params, client), initial)
        assert_trees_equal(row(after_second.client_states.previous_params, 4),
                           row(after_first.client_states.previous_params, 4))
        assert int(after_second.metrics["participants"]) == 2


@pytest.mark.parametrize("field, value", [("mu", -0.5), ("temperature", 0.0),
                                          ("temperature", -1.0)])
def test_bad_options_name_the_field(field, value):
    with pytest.raises(OptionError, match=rf"^{field}={value!r} is invalid"):
        from_dict(MoonConfig, {field: value})


def test_the_factory_refuses_a_model_without_an_extractor_and_bad_numbers():
    with pytest.raises(ValueError, match="SplitModel"):
        moon(mlp((NUM_FEATURES,), NUM_CLASSES), optax.sgd(0.1), num_clients=3)
    with pytest.raises(ValueError, match=r"^temperature=0"):
        moon(MODEL, optax.sgd(0.1), num_clients=3, temperature=0)
    with pytest.raises(ValueError, match=r"^mu=-1"):
        moon(MODEL, optax.sgd(0.1), num_clients=3, mu=-1)
