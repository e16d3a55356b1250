"""FedAvg invariants (ALGORITHMS.md §1e): GD equivalence, loop equivalence, padding, weights."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common import (assert_trees_close, assert_trees_equal, float64_params, make_clients,
                    small_model, stack_clients)
from fedjax_lab.algorithms import FedAvgState, fedavg
from fedjax_lab.core import ClientExecution, local_train, model_loss, weighted_mean

SIZES = [9, 4, 13, 6]


def state_from(algorithm, params):
    """The algorithm's initial state with the given global parameters."""
    state = algorithm.init(jax.random.key(0))
    return state._replace(params=params, opt_state=optax.sgd(1.0).init(params))


def test_one_full_batch_step_is_a_gradient_step_on_the_weighted_objective():
    with jax.enable_x64(True):
        xs, ys = make_clients(SIZES, dtype=np.float64)
        batch = stack_clients(xs, ys, padded_length=16)
        model = small_model()
        params = float64_params(model)
        algorithm = fedavg(model, optax.sgd(0.5), num_epochs=1, batch_size=None)
        new = jax.jit(algorithm.round)(state_from(algorithm, params), batch).params

        def objective(w):
            total = sum(SIZES)
            return sum(n / total * model_loss(model.apply)(w, x, y, np.ones(n, bool), None)
                       for n, x, y in zip(SIZES, xs, ys))

        expected = jax.tree.map(lambda w, g: w - 0.5 * g, params, jax.grad(objective)(params))
        assert_trees_close(new, expected, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("jit", [False, True])
def test_round_equals_a_python_loop_over_the_same_clients(jit):
    with jax.enable_x64(True):
        xs, ys = make_clients(SIZES, dtype=np.float64)
        batch = stack_clients(xs, ys)
        model = small_model()
        params = float64_params(model)
        algorithm = fedavg(model, optax.sgd(0.1), num_epochs=3, batch_size=4)
        round_fn = jax.jit(algorithm.round) if jit else algorithm.round
        new = round_fn(state_from(algorithm, params), batch).params

        train = jax.jit(lambda x, y, rng: local_train(
            model_loss(model.apply), optax.sgd(0.1), params, x, y, jnp.ones(len(y), bool), rng,
            num_epochs=3, batch_size=4).params)
        client_models = [train(x, y, batch.rng[i]) for i, (x, y) in enumerate(zip(xs, ys))]
        p = np.array(SIZES) / sum(SIZES)
        expected = jax.tree.map(lambda *ws: sum(pi * w for pi, w in zip(p, ws)), *client_models)
        assert_trees_close(new, expected)


def test_jitted_round_equals_unjitted_round():
    with jax.enable_x64(True):
        xs, ys = make_clients(SIZES, dtype=np.float64)
        batch = stack_clients(xs, ys)
        model = small_model()
        algorithm = fedavg(model, optax.sgd(0.1), num_epochs=2, batch_size=3)
        state = state_from(algorithm, float64_params(model))
        assert_trees_close(jax.jit(algorithm.round)(state, batch), algorithm.round(state, batch))


def test_padding_and_an_empty_client_change_nothing():
    xs, ys = make_clients(SIZES)
    model = small_model()
    algorithm = fedavg(model, optax.sgd(0.1), num_epochs=2, batch_size=4)
    state = algorithm.init(jax.random.key(1))
    round_fn = jax.jit(algorithm.round)
    tight = round_fn(state, stack_clients(xs, ys))
    padded = round_fn(state, stack_clients(xs, ys, padded_length=40))
    assert_trees_equal(tight.params, padded.params)
    assert_trees_equal(tight.metrics, padded.metrics)
    empty_x, empty_y = make_clients([0], seed=5)
    with_empty = round_fn(state, stack_clients(xs + empty_x, ys + empty_y))
    assert int(with_empty.metrics["participants"]) == len(SIZES)
    np.testing.assert_allclose(with_empty.params["Dense_0"]["kernel"],
                               tight.params["Dense_0"]["kernel"], rtol=1e-6, atol=1e-7)


def test_clients_with_identical_data_and_order_reproduce_single_client_training():
    with jax.enable_x64(True):
        xs, ys = make_clients([10], dtype=np.float64)
        single = stack_clients(xs, ys)
        many = single._replace(**{name: jnp.repeat(getattr(single, name), 3, axis=0)
                                  for name in ("x", "y", "mask", "num_examples", "rng")},
                               client_ids=jnp.arange(3))
        model = small_model()
        algorithm = fedavg(model, optax.sgd(0.1), num_epochs=2, batch_size=3)
        state = state_from(algorithm, float64_params(model))
        round_fn = jax.jit(algorithm.round)
        assert_trees_close(round_fn(state, many).params, round_fn(state, single).params,
                           rtol=1e-14, atol=1e-15)


def test_uniform_weighting_differs_from_sample_weighting_when_sizes_differ():
    xs, ys = make_clients(SIZES)
    batch = stack_clients(xs, ys)
    model = small_model()
    state = fedavg(model, optax.sgd(0.1)).init(jax.random.key(0))
    weighted = fedavg(model, optax.sgd(0.1)).round(state, batch).params
    uniform = fedavg(model, optax.sgd(0.1), weighting="uniform").round(state, batch).params
    assert not np.allclose(weighted["Dense_0"]["kernel"], uniform["Dense_0"]["kernel"])


def test_server_optimizer_steps_on_the_mean_delta():
    """A server optimiser steps on the mean delta: optax's Adam's first step moves each weight by
    about lr (Reddi et al.'s own forms: tests/test_fedopt.py)."""
    xs, ys = make_clients(SIZES)
    batch = stack_clients(xs, ys)
    model = small_model()
    plain = fedavg(model, optax.sgd(0.1))
    adam = fedavg(model, optax.sgd(0.1), server_optimizer=optax.adam(0.01))
    start = plain.init(jax.random.key(0))
    averaged = plain.round(start, batch)
    adapted = adam.round(adam.init(jax.random.key(0)), batch)
    mean_delta = jax.tree.map(jnp.subtract, start.params, averaged.params)
    expected = jax.tree.map(lambda w, d: w - 0.01 * jnp.sign(d), start.params, mean_delta)
    assert_trees_close(adapted.params, expected, rtol=1e-4, atol=1e-4)


def test_predict_gives_logits_per_client_and_example():
    xs, ys = make_clients(SIZES)
    batch = stack_clients(xs, ys, padded_length=16)
    algorithm = fedavg(small_model(), optax.sgd(0.1))
    logits = algorithm.predict(algorithm.init(jax.random.key(0)), batch)
    assert logits.shape == (len(SIZES), 16, 3)


def test_state_type_and_round_counter():
    xs, ys = make_clients(SIZES)
    algorithm = fedavg(small_model(), optax.sgd(0.1), execution=ClientExecution("chunked", 3))
    state = algorithm.init(jax.random.key(0))
    assert isinstance(state, FedAvgState) and int(state.round) == 0
    state = algorithm.round(state, stack_clients(xs, ys))
    assert int(state.round) == 1 and int(state.metrics["participants"]) == 4
    assert int(state.metrics["local_steps"]) == sum(-(-n // 10) for n in SIZES)


@pytest.mark.parametrize("options, message", [
    (dict(num_epochs=0), "num_epochs=0 is invalid; expected a positive integer"),
    (dict(batch_size=-3), "batch_size=-3 is invalid; expected a positive integer"),
    (dict(weighting="size"), "weighting 'size' is unknown"),
    (dict(straggler_policy="wait"), "straggler_policy 'wait' is unknown; allowed: drop, keep"),
    (dict(straggler_fraction=2.0), "straggler_fraction=2.0 is invalid"),
    (dict(straggler_fraction=0.5, num_epochs=1), "needs num_epochs >= 2"),
])
def test_bad_hyperparameters_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        fedavg(small_model(), optax.sgd(0.1), **options)


def test_robust_aggregation_and_attacks_plug_into_fedavg():
    from fedjax_lab.core.attacks import Attack
    from fedjax_lab.core.robust import coordinate_median, trimmed_mean

    with jax.enable_x64(True):
        xs, ys = make_clients(SIZES + [7, 11], dtype=np.float64)
        batch = stack_clients(xs, ys)
        model = small_model()
        state = state_from(fedavg(model, optax.sgd(0.1)), float64_params(model))
        plain = jax.jit(fedavg(model, optax.sgd(0.1)).round)(state, batch)
        no_attack = fedavg(model, optax.sgd(0.1), attack=Attack(), aggregator=weighted_mean)
        assert_trees_equal(jax.jit(no_attack.round)(state, batch).params, plain.params)
        untrimmed = fedavg(model, optax.sgd(0.1), aggregator=trimmed_mean(0.0))
        assert_trees_close(jax.jit(untrimmed.round)(state, batch).params, plain.params,
                           rtol=1e-14, atol=1e-14)

        attack = Attack("scaled", fraction=0.34, num_clients=len(SIZES) + 2, boost=1e6, seed=1)
        distance = {}
        for name, aggregator in (("mean", weighted_mean), ("median", coordinate_median)):
            attacked = fedavg(model, optax.sgd(0.1), aggregator=aggregator, attack=attack)
            new = jax.jit(attacked.round)(state, batch).params
            distance[name] = float(optax.tree.norm(optax.tree.sub(new, state.params)))
        assert distance["median"] < 1.0 < 1e3 < distance["mean"]
