"""Ditto invariants (ALGORITHMS.md section 7e): FedAvg's global model, the personal update."""

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common import (NUM_CLASSES, NUM_FEATURES, assert_trees_close, assert_trees_equal,
                    float64_params, make_clients, small_model, stack_clients)
from fedjax_lab.algorithms.ditto import (_PERSONAL_STREAM, DittoClientState, DittoConfig,
                                         _validation_split, build, ditto)
from fedjax_lab.algorithms.fedavg import FedAvgConfig, fedavg
from fedjax_lab.algorithms.fedavg import build as build_fedavg
from fedjax_lab.core import local_train, model_loss
from fedjax_lab.data import fedprox_synthetic
from fedjax_lab.experiment import run_experiment
from fedjax_lab.core.types import DataInfo
from fedjax_lab.models import Model, logistic_regression
from fedjax_lab.options import OptionError, from_dict

SIZES = [9, 4, 13, 6]
POPULATION = 10
PERSONAL_KEYS = ("personal_train_loss", "lam_mean")
# One configuration shared by the float32 tests, so its round compiles once.
ALGORITHM = ditto(small_model(), optax.sgd(0.1), num_clients=POPULATION, lam=0.5, num_epochs=2,
                  batch_size=3)
ROUND = jax.jit(ALGORITHM.round)


def float64_state(algorithm, model, seed=0):
    """`init`'s state with float64 global and personal models (call inside `jax.enable_x64`)."""
    state = algorithm.init(jax.random.key(seed))
    params = float64_params(model, seed)
    personal = jax.tree.map(lambda p: p.astype(jnp.float64),
                            state.client_states.personal_params)
    return state._replace(params=params, opt_state=optax.sgd(1.0).init(params),
                          client_states=DittoClientState(personal, state.client_states.lam))


def perturbed_personal(state, scale=0.3, seed=1):
    """Personal models moved away from the global one, differently for every client."""
    leaves, treedef = jax.tree.flatten(state.client_states.personal_params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    moved = [leaf + scale * jax.random.normal(k, leaf.shape, leaf.dtype)
             for leaf, k in zip(leaves, keys)]
    return state._replace(client_states=state.client_states._replace(
        personal_params=jax.tree.unflatten(treedef, moved)))


def test_global_trajectory_is_fedavg_bit_for_bit():
    dataset = fedprox_synthetic(1, 1, num_clients=8, max_examples=60, seed=3)
    model = logistic_regression(dataset.feature_shape, dataset.num_classes)
    options = dict(num_epochs=2, batch_size=10)
    run = lambda algorithm: run_experiment(algorithm, dataset, num_rounds=4, cohort_size=4,
                                           seed=11, eval_every=2, progress=False)
    reference = run(fedavg(model, optax.sgd(0.05), **options))
    result = run(ditto(model, optax.sgd(0.05), num_clients=8, lam=1.0, **options))
    assert_trees_equal(result.state.params, reference.state.params)
    assert [{k: v for k, v in row.items() if k not in PERSONAL_KEYS}
            for row in result.history] == reference.history
    for ours, theirs in zip(result.evaluations, reference.evaluations):
        assert ours["test"]["global"] == theirs["test"]
    # The personal models did train, away from the global one.
    personal = result.state.client_states.personal_params
    assert not np.allclose(personal["Dense_0"]["kernel"][0],
                           result.state.params["Dense_0"]["kernel"])


def test_lambda_zero_personal_models_are_plain_local_sgd():
    with jax.enable_x64(True):
        xs, ys = make_clients(SIZES, dtype=np.float64)
        model = small_model()
        algorithm = ditto(model, optax.sgd(0.1), num_clients=POPULATION, lam=0.0, num_epochs=2,
                          batch_size=3)
        round_fn = jax.jit(algorithm.round)
        ids = [7, 2, 5, 0]
        state = perturbed_personal(float64_state(algorithm, model))
        expected = {i: jax.tree.map(lambda leaf: leaf[i], state.client_states.personal_params)
                    for i in ids}
        train = jax.jit(lambda params, x, y, rng: local_train(
            model_loss(model.apply), optax.sgd(0.1), params, x, y, jnp.ones(len(y), bool), rng,
            num_epochs=2, batch_size=3).params)
        for round_index in range(2):
            batch = stack_clients(xs, ys, client_ids=ids, round_index=round_index)
            state = round_fn(state, batch)
            for row, i in enumerate(ids):
                expected[i] = train(expected[i], xs[row], ys[row], batch.rng[row])
        for i in ids:
            assert_trees_close(jax.tree.map(lambda leaf: leaf[i],
                                            state.client_states.personal_params), expected[i])


def test_sequential_schedule_has_its_own_shuffles_and_epochs():
    with jax.enable_x64(True):
        xs, ys = make_clients(SIZES, dtype=np.float64)
        model = small_model()
        algorithm = ditto(model, optax.sgd(0.1), num_clients=len(SIZES), lam=0.0,
                          schedule="sequential", personal_epochs=3, num_epochs=1, batch_size=3)
        state = perturbed_personal(float64_state(algorithm, model))
        batch = stack_clients(xs, ys)
        new = jax.jit(algorithm.round)(state, batch)
        train = jax.jit(lambda params, x, y, rng: local_train(
            model_loss(model.apply), optax.sgd(0.1), params, x, y, jnp.ones(len(y), bool),
            jax.random.fold_in(rng, _PERSONAL_STREAM), num_epochs=3, batch_size=3).params)
        for i, (x, y) in enumerate(zip(xs, ys)):
            start = jax.tree.map(lambda leaf: leaf[i], state.client_states.personal_params)
            expected = train(start, x, y, batch.rng[i])
            assert_trees_close(jax.tree.map(lambda leaf: leaf[i],
                                            new.client_states.personal_params), expected)


def test_personal_step_is_anchored_at_the_round_start_global_model():
    """One full-batch step: v <- v - eta (grad F_i(v) + lam (v - w_t)), with w_t the round's
    starting global model even though the global model moves in the same round; jitted and
    unjitted rounds agree."""
    with jax.enable_x64(True):
        xs, ys = make_clients(SIZES, dtype=np.float64)
        model = small_model()
        eta, lam = 0.2, 0.7
        algorithm = ditto(model, optax.sgd(eta), num_clients=len(SIZES), lam=lam,
                          batch_size=None)
        state = perturbed_personal(float64_state(algorithm, model))
        batch = stack_clients(xs, ys, padded_length=16)
        new = jax.jit(algorithm.round)(state, batch)
        assert_trees_close(algorithm.round(state, batch), new)
        assert not np.allclose(new.params["Dense_0"]["kernel"], state.params["Dense_0"]["kernel"])
        for i, (x, y) in enumerate(zip(xs, ys)):
            v = jax.tree.map(lambda leaf: leaf[i], state.client_states.personal_params)
            grad = jax.grad(model_loss(model.apply))(v, x, y, np.ones(len(y), bool), None)
            expected = jax.tree.map(lambda v_, g, w: v_ - eta * (g + lam * (v_ - w)),
                                    v, grad, state.params)
            assert_trees_close(jax.tree.map(lambda leaf: leaf[i],
                                            new.client_states.personal_params), expected)


def test_zero_data_gradient_and_unit_step_jump_to_the_global_model():
    """With no data gradient and eta * lam = 1, one step puts v_i exactly on w_t."""
    with jax.enable_x64(True):
        constant = Model(init=lambda key: {"w": jax.random.normal(key, (NUM_FEATURES,))},
                         apply=lambda params, x: jnp.zeros((x.shape[0], NUM_CLASSES)),
                         feature_shape=(NUM_FEATURES,), num_classes=NUM_CLASSES)
        algorithm = ditto(constant, optax.sgd(0.25), num_clients=len(SIZES), lam=4.0,
                          batch_size=None)
        state = algorithm.init(jax.random.key(0))
        state = perturbed_personal(state._replace(
            params={"w": state.params["w"].astype(jnp.float64)},
            client_states=DittoClientState({"w": state.client_states.personal_params["w"]
                                            .astype(jnp.float64)}, state.client_states.lam)))
        xs, ys = make_clients(SIZES, dtype=np.float64)
        new = jax.jit(algorithm.round)(state, stack_clients(xs, ys))
        np.testing.assert_allclose(new.client_states.personal_params["w"],
                                   np.tile(state.params["w"], (len(SIZES), 1)), atol=1e-15)


def test_unsampled_clients_and_padded_slots_keep_their_personal_models():
    xs, ys = make_clients([9, 4, 13, 0], seed=2)
    state = perturbed_personal(ALGORITHM.init(jax.random.key(0)))
    # Client 9 sits in a padded slot (no examples); clients 3, 6 and 1 are sampled.
    new = ROUND(state, stack_clients(xs, ys, client_ids=[3, 6, 1, 9]))
    before, after = state.client_states, new.client_states
    untouched = [i for i in range(POPULATION) if i not in (1, 3, 6)]
    for old, updated in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(np.asarray(updated)[untouched], np.asarray(old)[untouched])
    kernel = lambda s: np.asarray(s.personal_params["Dense_0"]["kernel"])
    assert not np.allclose(kernel(after)[[1, 3, 6]], kernel(before)[[1, 3, 6]])


def test_lambda_grid_keeps_the_candidate_with_the_lowest_validation_loss():
    with jax.enable_x64(True):
        xs, ys = make_clients([20, 11], dtype=np.float64, seed=4)
        model = small_model()
        grid = (0.0, 1.0, 50.0)
        algorithm = ditto(model, optax.sgd(0.3), num_clients=2, lam=grid, num_epochs=3,
                          batch_size=4, validation_fraction=0.25)
        state = perturbed_personal(float64_state(algorithm, model), scale=1.0)
        batch = stack_clients(xs, ys, padded_length=24)
        new = jax.jit(algorithm.round)(state, batch)
        base = model_loss(model.apply)

        @jax.jit
        def candidate(v, lam, x, y, train_mask, validation_mask, rng):
            def loss(p, xb, yb, mb, key):
                return base(p, xb, yb, mb, key) + 0.5 * lam * optax.tree.norm(
                    optax.tree.sub(p, state.params), squared=True)
            params = local_train(loss, optax.sgd(0.3), v, x, y, train_mask, rng, num_epochs=3,
                                 batch_size=4).params
            return base(params, x, y, validation_mask, None), params

        chosen_lams = []
        for i in range(2):
            train_mask, validation_mask = _validation_split(batch.mask[i], Fraction(3, 4))
            assert int(train_mask.sum()) == int(0.75 * len(ys[i]))
            v = jax.tree.map(lambda leaf: leaf[i], state.client_states.personal_params)
            candidates = []
            for lam in grid:
                loss, params = candidate(v, lam, batch.x[i], batch.y[i], train_mask,
                                         validation_mask, batch.rng[i])
                candidates.append((float(loss), lam, params))
            _, lam, params = min(candidates, key=lambda c: c[0])
            chosen_lams.append(lam)
            assert float(new.client_states.lam[i]) == lam
            assert_trees_close(jax.tree.map(lambda leaf: leaf[i],
                                            new.client_states.personal_params), params)
        # The fixture makes the two clients choose differently, so the choice is per client.
        assert len(set(chosen_lams)) == 2
        np.testing.assert_allclose(new.metrics["lam_mean"], np.mean(chosen_lams))


def test_validation_split_holds_out_the_last_examples():
    mask = jnp.arange(16) < 10
    train, validation = _validation_split(mask, Fraction(9, 10))
    np.testing.assert_array_equal(train, jnp.arange(16) < 9)
    np.testing.assert_array_equal(validation, (jnp.arange(16) == 9))
    single = jnp.arange(4) < 1
    train, validation = _validation_split(single, Fraction(9, 10))
    np.testing.assert_array_equal(train, single)
    np.testing.assert_array_equal(validation, single)


def test_predict_uses_personal_models_and_predict_global_the_global_one():
    xs, ys = make_clients(SIZES)
    model = small_model()
    algorithm = ditto(model, optax.sgd(0.1), num_clients=POPULATION)
    state = perturbed_personal(algorithm.init(jax.random.key(0)))
    batch = stack_clients(xs, ys, padded_length=16, client_ids=[4, 1, 8, 2])
    logits = algorithm.predict(state, batch)
    for row, i in enumerate([4, 1, 8, 2]):
        v = jax.tree.map(lambda leaf: leaf[i], state.client_states.personal_params)
        np.testing.assert_allclose(logits[row], model.apply(v, batch.x[row]), rtol=1e-6)
        np.testing.assert_allclose(algorithm.predict_global(state, batch)[row],
                                   model.apply(state.params, batch.x[row]), rtol=1e-6)


def test_metrics_keep_their_structure_and_count_fedavg_communication():
    xs, ys = make_clients(SIZES)
    state = ALGORITHM.init(jax.random.key(0))
    new = ROUND(state, stack_clients(xs, ys))
    assert jax.tree.structure(new.metrics) == jax.tree.structure(state.metrics)
    assert all(a.dtype == b.dtype for a, b in zip(jax.tree.leaves(new.metrics),
                                                  jax.tree.leaves(state.metrics)))
    model_bytes = (NUM_FEATURES * NUM_CLASSES + NUM_CLASSES) * 4
    # Personal models never leave the client: the traffic is FedAvg's.
    assert float(new.metrics["bytes_down"]) == float(new.metrics["bytes_up"]) == 4 * model_bytes
    assert float(new.metrics["lam_mean"]) == 0.5
    assert float(new.metrics["personal_train_loss"]) > 0


@pytest.mark.parametrize("options, message", [
    (dict(lam=-1.0), r"lam=-1.0 is invalid; expected lam >= 0"),
    (dict(lam=()), r"lam=\(\) is invalid"),
    (dict(lam=(0.1, -2.0)), r"lam=\(0.1, -2.0\) is invalid"),
    (dict(schedule="alternating"), "schedule 'alternating' is unknown; allowed: interleaved, "
                                   "sequential"),
    (dict(personal_epochs=2), "personal_epochs=2 is only for schedule='sequential'"),
    (dict(schedule="sequential", personal_epochs=0), "personal_epochs=0 is invalid"),
    (dict(lam=(0.1, 1.0), validation_fraction=1.0), "validation_fraction=1.0 is invalid"),
    (dict(num_clients=0), "num_clients=0 is invalid; expected a positive integer"),
    (dict(num_epochs=0), "num_epochs=0 is invalid"),
])
def test_bad_hyperparameters_are_named(options, message):
    options = {"num_clients": POPULATION, **options}
    with pytest.raises(ValueError, match=message):
        ditto(small_model(), optax.sgd(0.1), **options)


def test_the_default_registry_ditto_trains_the_default_fedavg_as_its_global_model():
    info = DataInfo(POPULATION, NUM_CLASSES, (NUM_FEATURES,), 16)
    xs, ys = make_clients(SIZES)
    batch = stack_clients(xs, ys, client_ids=[7, 0, 2, 3])
    built = build(DittoConfig(), small_model(), info)
    reference = build_fedavg(FedAvgConfig(), small_model(), info)
    state = jax.jit(built.round)(built.init(jax.random.key(0)), batch)
    expected = jax.jit(reference.round)(reference.init(jax.random.key(0)), batch)
    assert_trees_equal(state.params, expected.params)
    assert float(state.metrics["lam_mean"]) == 1.0


def test_registry_options_reach_the_factory_and_misplaced_ones_are_refused():
    with pytest.raises(OptionError, match="personal_epochs=2 .*sequential"):
        from_dict(DittoConfig, {"personal_epochs": 2})
    with pytest.raises(OptionError, match=r"lam_grid\[1\]|lam_grid=.*lams >= 0"):
        from_dict(DittoConfig, {"lam_grid": [0.1, -1.0]})
    config = from_dict(DittoConfig, {"lam_grid": [0.1, 2.0], "schedule": "sequential",
                                     "personal_epochs": 1, "client": {"epochs": 1}})
    xs, ys = make_clients(SIZES)
    algorithm = build(config, small_model(),
                      DataInfo(POPULATION, NUM_CLASSES, (NUM_FEATURES,), 16))
    state = jax.jit(algorithm.round)(algorithm.init(jax.random.key(0)),
                                     stack_clients(xs, ys, client_ids=[7, 0, 2, 3]))
    chosen = np.asarray(state.client_states.lam)[[7, 0, 2, 3]]
    assert np.all(np.isclose(chosen, 0.1) | np.isclose(chosen, 2.0)), chosen
