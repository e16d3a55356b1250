"""Noisy signSGD / medianSGD (algorithms/median_mean.py): ALGORITHMS.md §3e unit tests."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import erf

from common import float64_params, make_clients, small_model, stack_clients
from experiments.median_mean_bridge import (expected_median, expected_vote, fixed_point,
                                            one_dimensional_batch, quadratic_loss, scalar_model)
from fedjax_lab.algorithms import REGISTRY
from fedjax_lab.algorithms.median_mean import median_sgd, sign_sgd
from fedjax_lab.core import ClientBatch, client_keys, experiment_key, model_loss
from fedjax_lab.core.attacks import Attack
from fedjax_lab.core.types import DataInfo
from fedjax_lab.models import Model

SIZES = [7, 3, 9, 5, 4]


def state_with(algorithm, params):
    return algorithm.init(jax.random.key(0))._replace(params=params)


def full_gradients(model, params, xs, ys):
    loss = model_loss(model.apply)
    return [jax.grad(loss)(params, x, y, np.ones(len(y), bool), None) for x, y in zip(xs, ys)]


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("noise", ["gaussian", "uniform"])
def test_b_zero_is_the_noiseless_vote_and_median(jit, noise):
    with jax.enable_x64(True):
        xs, ys = make_clients(SIZES, dtype=np.float64)
        batch = stack_clients(xs, ys, padded_length=12)
        model = small_model()
        params = float64_params(model)
        gradients = full_gradients(model, params, xs, ys)
        for make, rule in ((sign_sgd, lambda g: np.sign(np.sign(g).sum(0))),
                           (median_sgd, lambda g: np.median(g, axis=0))):
            algorithm = make(model, learning_rate=0.1, noise_scale=0.0, noise=noise)
            round_fn = jax.jit(algorithm.round) if jit else algorithm.round
            new = round_fn(state_with(algorithm, params), batch).params
            expected = jax.tree.map(
                lambda w, *g: w - 0.1 * rule(np.stack([np.asarray(gi) for gi in g])),
                params, *gradients)
            jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-13),
                         new, expected)


def vector_problem(targets):
    """One node holding the vector a; f(x) = ||x - a||^2 / 2, so g = x - a at x."""
    def loss(params, x, y, mask, rng):
        del y, mask, rng
        return 0.5 * jnp.sum((params["x"] - x[0]) ** 2)

    dim = len(targets)
    model = Model(init=lambda key: {"x": jnp.zeros(dim, jnp.float64)}, apply=None,
                  feature_shape=(dim,), num_classes=2)
    return model, loss


def mean_step_over_rounds(algorithm, params, batches):
    """Monte Carlo mean of (x_t - x_{t+1}) over independent rounds (vmapped round keys)."""
    state = state_with(algorithm, params)
    step = jax.jit(jax.vmap(lambda batch: algorithm.round(state, batch).params["x"]))
    moved = params["x"] - np.asarray(step(batches))
    return moved.mean(axis=0), moved.std(axis=0) / np.sqrt(len(moved))


def independent_rounds(examples, num_rounds):
    """`num_rounds` copies of one round whose node i holds `examples[i]` as its only example,
    each with the node keys of a different round index (built in one vectorised call)."""
    examples = jnp.asarray(examples, jnp.float64)
    num_nodes = examples.shape[0]
    ids = jnp.arange(num_nodes, dtype=jnp.int32)
    rng = jax.vmap(lambda t: client_keys(experiment_key(0), t, ids))(jnp.arange(num_rounds))
    batch = ClientBatch(x=examples.reshape(num_nodes, 1, -1),
                        y=jnp.zeros((num_nodes, 1), jnp.int32),
                        mask=jnp.ones((num_nodes, 1), bool),
                        num_examples=jnp.ones(num_nodes, jnp.int32), client_ids=ids, rng=rng[0])
    stacked = jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, (num_rounds,) + leaf.shape), batch)
    return stacked._replace(rng=rng)


@pytest.mark.parametrize("noise", ["gaussian", "uniform"])
def test_monte_carlo_mean_of_a_noisy_sign_matches_its_expectation(noise):
    with jax.enable_x64(True):
        b, num_rounds = 2.0, 20_000
        targets = jnp.asarray([-3.0, -1.0, -0.2, 0.0, 0.5, 1.5, 4.0])  # g = 0 - a = -targets
        model, loss = vector_problem(targets)
        algorithm = sign_sgd(model, learning_rate=1.0, noise_scale=b, noise=noise, loss=loss)
        mean, standard_error = mean_step_over_rounds(
            algorithm, {"x": jnp.zeros(len(targets))}, independent_rounds([targets], num_rounds))
        g = -np.asarray(targets)
        expected = (erf(g / (b * np.sqrt(2))) if noise == "gaussian"
                    else np.clip(g / b, -1, 1))
        # Guard the zero-variance coordinates (|expected| = 1) with a tiny floor.
        assert np.all(np.abs(mean - expected) <= 4 * np.maximum(standard_error, 1e-3))


@pytest.mark.parametrize("b, sign_point, median_point", [
    (1.0, 0.539, 0.549), (3.0, 0.921, 0.915), (10.0, 0.9925, 0.9918), (30.0, 0.9992, 0.9991)])
def test_fixed_points_of_the_expected_update_match_the_table(b, sign_point, median_point):
    with jax.enable_x64(True):
        assert abs(fixed_point(expected_vote, b) - sign_point) < 1e-3
        assert abs(fixed_point(expected_median, b) - median_point) < 1e-3


@pytest.mark.parametrize("make, expected_update", [(sign_sgd, expected_vote),
                                                   (median_sgd, expected_median)])
def test_the_algorithms_expected_step_is_the_analysed_one(make, expected_update):
    """The round's Monte Carlo mean step matches the expectation whose root the table lists,
    so the table's fixed points are those of this implementation (noise per node, before the
    vote or median); at b = 1 the mean step at x = 0.2 is far from 0."""
    with jax.enable_x64(True):
        b, num_rounds = 1.0, 20_000
        algorithm = make(scalar_model(), learning_rate=1.0, noise_scale=b, loss=quadratic_loss)
        stacked = independent_rounds([[0.0], [0.0], [3.0]], num_rounds)
        for x in (0.2, fixed_point(expected_update, b)):
            params = {"x": jnp.asarray(x, jnp.float64)}
            state = state_with(algorithm, params)
            moved = x - np.asarray(jax.jit(jax.vmap(
                lambda batch: algorithm.round(state, batch).params["x"]))(stacked))
            standard_error = moved.std() / np.sqrt(num_rounds)
            assert abs(moved.mean() - float(expected_update(x, (0.0, 0.0, 3.0), b))) \
                <= 4 * standard_error


def test_tied_vote_does_not_move_and_even_median_is_the_middle_mean():
    with jax.enable_x64(True):
        targets = ((1.0, -2.0), (-1.0, -5.0))  # node gradients x - a: (-1, 2) and (1, 5)

        def loss(params, x, y, mask, rng):
            del y, mask, rng
            return 0.5 * jnp.sum((params["x"] - x[0]) ** 2)

        model = Model(init=lambda key: {"x": jnp.zeros(2, jnp.float64)}, apply=None,
                      feature_shape=(2,), num_classes=2)
        batch = one_dimensional_batch(0, targets=(0.0, 0.0))._replace(
            x=jnp.asarray(targets).reshape(2, 1, 2))
        for make, step in ((sign_sgd, [0.0, 1.0]), (median_sgd, [0.0, 3.5])):
            algorithm = make(model, learning_rate=1.0, loss=loss)
            new = algorithm.round(algorithm.init(jax.random.key(0)), batch).params["x"]
            np.testing.assert_array_equal(new, -np.asarray(step))


def test_relative_noise_is_measured_once_on_the_first_round():
    with jax.enable_x64(True):
        xs, ys = make_clients(SIZES, dtype=np.float64)
        model = small_model()
        params = float64_params(model)
        algorithm = sign_sgd(model, learning_rate=0.1, noise_scale=2.0,
                             noise_reference="median_gradient")
        state = state_with(algorithm, params)
        round_fn = jax.jit(algorithm.round)
        first = round_fn(state, stack_clients(xs, ys, round_index=0))
        flat = np.concatenate([np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(g)])
                               for g in full_gradients(model, params, xs, ys)])
        np.testing.assert_allclose(first.metrics["noise_scale"], 2.0 * np.median(np.abs(flat)),
                                   rtol=1e-12)
        second = round_fn(first, stack_clients(xs, ys, round_index=1))
        assert second.metrics["noise_scale"] == first.metrics["noise_scale"]


def test_communication_is_one_bit_per_coordinate_for_signs_and_a_float_for_medians():
    xs, ys = make_clients(SIZES)
    model = small_model()
    num_params = 5 * 3 + 3
    for make, per_node in ((sign_sgd, num_params / 8), (median_sgd, 4 * num_params)):
        algorithm = make(model, learning_rate=0.1)
        metrics = jax.jit(algorithm.round)(algorithm.init(jax.random.key(0)),
                                           stack_clients(xs, ys)).metrics
        assert float(metrics["bytes_up"]) == len(SIZES) * per_node
        assert float(metrics["bytes_down"]) == len(SIZES) * 4 * num_params
        assert metrics["bytes_up"].dtype == jnp.result_type(float)


def test_majority_vote_is_immune_to_a_boosting_attacker():
    with jax.enable_x64(True):
        xs, ys = make_clients(SIZES, dtype=np.float64)
        batch = stack_clients(xs, ys)
        model = small_model()
        params = float64_params(model)
        attack = Attack("scaled", fraction=0.2, num_clients=len(SIZES), boost=1e6, seed=0)
        clean = sign_sgd(model, learning_rate=0.1)
        attacked = sign_sgd(model, learning_rate=0.1, attack=attack)
        assert attack.num_malicious == 1
        jax.tree.map(np.testing.assert_array_equal,
                     clean.round(state_with(clean, params), batch).params,
                     attacked.round(state_with(attacked, params), batch).params)


def test_bad_options_are_named():
    model = small_model()
    with pytest.raises(ValueError, match="noise_scale=-1 is invalid"):
        sign_sgd(model, learning_rate=0.1, noise_scale=-1)
    with pytest.raises(ValueError, match="noise 'laplace' is unknown"):
        median_sgd(model, learning_rate=0.1, noise="laplace")
    with pytest.raises(ValueError, match="noise_reference 'relative' is unknown"):
        median_sgd(model, learning_rate=0.1, noise_reference="relative")
    with pytest.raises(ValueError, match="learning_rate=0 is invalid"):
        sign_sgd(model, learning_rate=0)


@pytest.mark.parametrize("name", ["sign_sgd", "median_sgd"])
def test_registry_defaults_build_and_train(name):
    """The default config (b = 3 median |g|) builds and trains two rounds with finite metrics."""
    spec = REGISTRY[name]
    algorithm = spec.build(spec.config(), small_model(), DataInfo(5, 3, (5,), 12))
    xs, ys = make_clients(SIZES)
    state = algorithm.init(jax.random.key(0))
    round_fn = jax.jit(algorithm.round)
    for t in range(2):
        state = round_fn(state, stack_clients(xs, ys, padded_length=12, round_index=t))
    assert all(np.isfinite(float(value)) for value in state.metrics.values())
    assert int(state.metrics["participants"]) == len(SIZES)
    assert float(state.metrics["noise_scale"]) > 0
    assert algorithm.predict(state, stack_clients(xs, ys)).shape == (len(SIZES), 9, 3)
