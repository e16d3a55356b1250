"""FetchSGD and its baselines (algorithms/fetchsgd.py, topk.py, compressed.py): ALGORITHMS.md §6e
tests (4) and (5), per-client state, communication and the registry builders."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from common import (assert_trees_close, assert_trees_equal, float64_params, make_clients,
                    small_model, stack_clients)
from fedjax_lab.algorithms import REGISTRY
from fedjax_lab.algorithms.compressed import FetchSGDClientState
from fedjax_lab.algorithms.fetchsgd import fetchsgd
from fedjax_lab.algorithms.topk import local_topk, momentum_sgd, true_topk
from fedjax_lab.core import client_weights, local_train, model_loss
from fedjax_lab.core.gradients import minibatch_gradient
from fedjax_lab.core.sketch import CountSketch
from fedjax_lab.core.types import DataInfo

SIZES = [9, 4, 13, 6]
DIM = 5 * 3 + 3  # the small logistic model
SKETCH = dict(num_rows=3, num_columns=8, k=4, sketch_seed=5)


def run_rounds(algorithm, params, num_rounds, *, jit=True, client_ids=None):
    """States after each of `num_rounds` rounds on the same four clients (fresh keys per round)."""
    xs, ys = make_clients(SIZES, dtype=np.float64)
    state = float64_state(algorithm, params)
    round_fn = jax.jit(algorithm.round) if jit else algorithm.round
    states = []
    for t in range(num_rounds):
        state = round_fn(state, stack_clients(xs, ys, padded_length=16, round_index=t,
                                              client_ids=client_ids))
        states.append(state)
    return states


def float64_state(algorithm, params):
    """The initial state with every float array (buffers included) in float64."""
    state = jax.tree.map(lambda leaf: leaf.astype(jnp.float64)
                         if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf,
                         algorithm.init(jax.random.key(0)))
    return state._replace(params=params)


def mean_gradient(model, params, round_index, batch_size=None):
    xs, ys = make_clients(SIZES, dtype=np.float64)
    batch = stack_clients(xs, ys, padded_length=16, round_index=round_index)
    gradients = [ravel_pytree(minibatch_gradient(model_loss(model.apply), params, batch.x[i],
                                                 batch.y[i], batch.mask[i], batch.rng[i],
                                                 batch_size=batch_size)[1])[0]
                 for i in range(len(SIZES))]
    weights = client_weights(batch.num_examples)
    return sum(w * g for w, g in zip(weights, gradients))


@pytest.mark.parametrize("jit", [False, True])
def test_conservation_of_sketched_error_and_momentum(jit):
    """S(sum_t Delta_t) + S_e^T = eta sum_t S_u^t, exactly up to float64 rounding."""
    with jax.enable_x64(True):
        model = small_model()
        params = float64_params(model)
        eta = 0.3
        algorithm = fetchsgd(model, learning_rate=eta, momentum=0.9, **SKETCH)
        states = run_rounds(algorithm, params, 6, jit=jit)
        sketch = CountSketch(DIM, 3, 8, seed=5)
        total_delta = ravel_pytree(params)[0] - ravel_pytree(states[-1].params)[0]
        momentum_sum = sum(state.momentum for state in states)
        np.testing.assert_allclose(sketch.sketch(total_delta) + states[-1].error,
                                   eta * momentum_sum, rtol=0, atol=1e-12)
        assert all(int(state.metrics["update_nonzeros"]) <= 4 for state in states)

        zeroing = fetchsgd(model, learning_rate=eta, error_update="zero", **SKETCH)
        zero_states = run_rounds(zeroing, params, 6)
        zero_delta = ravel_pytree(params)[0] - ravel_pytree(zero_states[-1].params)[0]
        residual = (sketch.sketch(zero_delta) + zero_states[-1].error
                    - eta * sum(state.momentum for state in zero_states))
        assert np.abs(residual).max() > 1e-3


def test_clients_send_the_sketch_of_their_minibatch_gradient():
    with jax.enable_x64(True):
        model = small_model()
        params = float64_params(model)
        algorithm = fetchsgd(model, learning_rate=0.1, batch_size=3, **SKETCH)
        first = run_rounds(algorithm, params, 1)[0]
        sketch = CountSketch(DIM, 3, 8, seed=5)
        np.testing.assert_allclose(first.momentum,
                                   sketch.sketch(mean_gradient(model, params, 0, batch_size=3)),
                                   rtol=0, atol=1e-14)


def test_minibatch_gradient_is_local_trains_step_and_ignores_padding():
    with jax.enable_x64(True):
        model = small_model()
        params = float64_params(model)
        loss = model_loss(model.apply)
        xs, ys = make_clients([4], dtype=np.float64)
        batch = stack_clients(xs, ys, padded_length=16)
        args = (params, batch.x[0], batch.y[0], batch.mask[0], batch.rng[0])
        _, gradient = minibatch_gradient(loss, *args, batch_size=4)
        # Four real examples and batches of 4: local_train takes exactly one step.
        stepped = local_train(loss, optax.sgd(0.5), *args, num_epochs=1, batch_size=4)
        assert int(stepped.num_steps) == 1
        assert_trees_close(jax.tree.map(lambda w, g: w - 0.5 * g, params, gradient),
                           stepped.params, rtol=1e-15, atol=1e-16)
        xs, ys = make_clients([11], dtype=np.float64)
        tight, padded = (stack_clients(xs, ys, padded_length=n) for n in (11, 40))
        gradients = [minibatch_gradient(loss, params, b.x[0], b.y[0], b.mask[0], b.rng[0],
                                        batch_size=4)[1] for b in (tight, padded)]
        assert_trees_equal(*gradients)


@pytest.mark.parametrize("jit", [False, True])
def test_true_topk_with_k_equal_d_is_momentum_sgd(jit):
    with jax.enable_x64(True):
        model = small_model()
        params = float64_params(model)
        ideal = run_rounds(true_topk(model, learning_rate=0.2, k=DIM, momentum=0.9), params, 5,
                           jit=jit)
        plain = run_rounds(momentum_sgd(model, learning_rate=0.2, momentum=0.9), params, 5,
                           jit=jit)
        # Equal up to rounding: under jit XLA may fuse momentum SGD's w - eta u into one
        # multiply-add, which rounds once where true top-k rounds twice (1 ulp seen).
        assert_trees_close(ideal[-1].params, plain[-1].params, rtol=1e-14, atol=1e-16)
        np.testing.assert_array_equal(ideal[-1].error, np.zeros(DIM))


def test_local_topk_without_error_and_k_equal_d_is_momentum_sgd():
    with jax.enable_x64(True):
        model = small_model()
        params = float64_params(model)
        local = run_rounds(local_topk(model, learning_rate=0.2, k=DIM, error_feedback=False),
                           params, 3)
        plain = run_rounds(momentum_sgd(model, learning_rate=0.2), params, 3)
        assert_trees_equal(local[-1].params, plain[-1].params)


def test_local_error_feedback_conserves_each_clients_gradient_mass():
    """Per client: message + new error = old error + gradient; other clients keep their error."""
    with jax.enable_x64(True):
        model = small_model()
        params = float64_params(model)
        algorithm = local_topk(model, learning_rate=0.2, k=3, momentum=0.0, num_clients=10)
        ids = jnp.asarray([7, 2, 5, 0], jnp.int32)
        state = float64_state(algorithm, params)
        xs, ys = make_clients(SIZES, dtype=np.float64)
        batch = stack_clients(xs, ys, padded_length=16, client_ids=ids)
        new = jax.jit(algorithm.round)(state, batch)
        assert isinstance(new.client_states, FetchSGDClientState)
        errors = np.asarray(new.client_states.error)
        untouched = np.setdiff1d(np.arange(10), ids)
        np.testing.assert_array_equal(errors[untouched], 0)
        weights = np.asarray(client_weights(batch.num_examples))
        messages_mean = np.asarray(new.momentum)  # momentum 0: u = sum_i p_i message_i
        gradients = [ravel_pytree(minibatch_gradient(
            model_loss(model.apply), params, batch.x[i], batch.y[i], batch.mask[i], batch.rng[i],
            batch_size=None)[1])[0] for i in range(4)]
        total_gradient = sum(w * np.asarray(g) for w, g in zip(weights, gradients))
        total_error = sum(w * errors[i] for w, i in zip(weights, np.asarray(ids)))
        np.testing.assert_allclose(messages_mean + total_error, total_gradient, atol=1e-15)
        assert all(np.count_nonzero(errors[i]) == DIM - 3 for i in np.asarray(ids))


def test_second_round_with_all_candidates_starts_as_true_topk():
    """In round 0 the sketch holds only this round's gradient, which the second round replaces
    by its exact value, so FetchSGD's first step is true top-k's."""
    with jax.enable_x64(True):
        model = small_model()
        params = float64_params(model)
        two_rounds = fetchsgd(model, learning_rate=0.3, second_round_candidates=DIM, **SKETCH)
        one_round = fetchsgd(model, learning_rate=0.3, **SKETCH)
        ideal = true_topk(model, learning_rate=0.3, k=4)
        first = run_rounds(two_rounds, params, 1)[0]
        assert_trees_close(first.params, run_rounds(ideal, params, 1)[0].params, rtol=1e-14,
                           atol=1e-15)
        sketched = run_rounds(one_round, params, 1)[0]
        assert not np.allclose(ravel_pytree(sketched.params)[0], ravel_pytree(first.params)[0])
        # float64 values (8 bytes): the sketch and the m = d exact values up; the model and the
        # m int32 candidate indices down.
        assert float(first.metrics["bytes_up"]) == len(SIZES) * 8 * (3 * 8 + DIM)
        assert float(first.metrics["bytes_down"]) == len(SIZES) * (8 * DIM + 4 * DIM)


def test_bytes_and_catch_up_downloads():
    with jax.enable_x64(True):
        model = small_model()
        params = float64_params(model)
        itemsize = 8
        sketched = run_rounds(fetchsgd(model, learning_rate=0.3, num_clients=8, **SKETCH),
                              params, 2)
        assert float(sketched[0].metrics["bytes_up"]) == len(SIZES) * itemsize * 3 * 8
        # Round 0: everyone holds w_0. Round 1: the same clients fetch round 0's changes.
        assert float(sketched[0].metrics["bytes_down"]) == 0
        changed = int(sketched[0].metrics["update_nonzeros"])
        assert float(sketched[1].metrics["bytes_down"]) == len(SIZES) * min(
            DIM * itemsize, changed * (itemsize + 4))
        local = run_rounds(local_topk(model, learning_rate=0.3, k=2, error_feedback=False),
                           params, 1)[0]
        assert float(local.metrics["bytes_up"]) == len(SIZES) * 2 * (itemsize + 4)
        assert float(local.metrics["bytes_down"]) == len(SIZES) * DIM * itemsize
        dense = run_rounds(momentum_sgd(model, learning_rate=0.3), params, 1)[0]
        assert float(dense.metrics["bytes_up"]) == len(SIZES) * DIM * itemsize


def test_local_steps_mode_sketches_the_accumulated_update():
    with jax.enable_x64(True):
        model = small_model()
        params = float64_params(model)
        algorithm = fetchsgd(model, learning_rate=1.0, momentum=0.0, client_update="local_steps",
                             client_optimizer=optax.sgd(0.1), num_epochs=2, batch_size=4,
                             **SKETCH)
        first = run_rounds(algorithm, params, 1)[0]
        xs, ys = make_clients(SIZES, dtype=np.float64)
        batch = stack_clients(xs, ys, padded_length=16)
        deltas = [ravel_pytree(params)[0] - ravel_pytree(local_train(
            model_loss(model.apply), optax.sgd(0.1), params, batch.x[i], batch.y[i],
            batch.mask[i], batch.rng[i], num_epochs=2, batch_size=4).params)[0]
            for i in range(4)]
        weights = client_weights(batch.num_examples)
        sketch = CountSketch(DIM, 3, 8, seed=5)
        np.testing.assert_allclose(first.momentum,
                                   sketch.sketch(sum(w * d for w, d in zip(weights, deltas))),
                                   rtol=0, atol=1e-14)


def test_bad_options_are_named():
    model = small_model()
    with pytest.raises(ValueError, match=r"k=19 is invalid; expected an integer in \[1, d=18\]"):
        true_topk(model, learning_rate=0.1, k=19)
    with pytest.raises(ValueError, match="error_update 'clear' is unknown"):
        fetchsgd(model, learning_rate=0.1, num_columns=4, k=2, error_update="clear")
    with pytest.raises(ValueError, match="needs num_clients"):
        local_topk(model, learning_rate=0.1, k=2)
    with pytest.raises(ValueError, match="second_round_candidates=1 is invalid"):
        fetchsgd(model, learning_rate=0.1, num_columns=4, k=2, second_round_candidates=1)
    with pytest.raises(ValueError, match="learning_rate=-0.1 is invalid"):
        momentum_sgd(model, learning_rate=-0.1)
    with pytest.raises(ValueError, match="needs client_optimizer"):
        momentum_sgd(model, learning_rate=0.1, client_update="local_steps")


def test_padded_clients_keep_their_state_and_stateless_runs_keep_none():
    """A padded slot (no examples) neither writes its error nor its sync round; without a
    population there is no per-client state at all."""
    with jax.enable_x64(True):
        model = small_model()
        params = float64_params(model)
        algorithm = local_topk(model, learning_rate=0.2, k=3, num_clients=10)
        state = float64_state(algorithm, params)
        xs, ys = make_clients([6, 5, 0], dtype=np.float64)
        new = jax.jit(algorithm.round)(state, stack_clients(
            xs, ys, padded_length=8, client_ids=[4, 1, 7]))
        assert np.count_nonzero(np.asarray(new.client_states.error)[[4, 1]]) > 0
        np.testing.assert_array_equal(new.client_states.error[7], 0)
        assert_trees_equal(jax.tree.map(lambda leaf: leaf[np.r_[0, 2, 3, 5:10]],
                                        new.client_states),
                           jax.tree.map(lambda leaf: leaf[np.r_[0, 2, 3, 5:10]],
                                        state.client_states))
        stateless = fetchsgd(model, learning_rate=0.1, **SKETCH)
        assert stateless.init(jax.random.key(0)).client_states == ()


@pytest.mark.parametrize("name", ["fetchsgd", "true_topk", "local_topk", "momentum_sgd"])
def test_registry_defaults_build_and_train(name):
    """Each spec's default config builds on a model and trains two rounds with finite metrics;
    k and c are fractions of d, so they fit this 18-parameter model (k = c = 1)."""
    spec = REGISTRY[name]
    model = small_model()
    algorithm = spec.build(spec.config(), model, DataInfo(6, 3, (5,), 16))
    xs, ys = make_clients(SIZES)
    state = algorithm.init(jax.random.key(0))
    round_fn = jax.jit(algorithm.round)
    for t in range(2):
        state = round_fn(state, stack_clients(xs, ys, padded_length=16, round_index=t))
    assert all(np.isfinite(float(value)) for value in state.metrics.values())
    assert int(state.metrics["participants"]) == len(SIZES)
    assert algorithm.predict(state, stack_clients(xs, ys)).shape == (4, 13, 3)
    assert isinstance(state.client_states, FetchSGDClientState)
    assert state.client_states.synced_round.shape == (6,)
