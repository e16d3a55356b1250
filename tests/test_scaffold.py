"""SCAFFOLD invariants (Karimireddy et al., ICML 2020, Algorithm 1): FedAvg without variates,
option II's formula with each client's own K_i, option I's gradient, c <- c + (1/N) sum dc_i."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common import (NUM_CLASSES, NUM_FEATURES, assert_trees_close, assert_trees_equal,
                    make_clients, small_model, stack_clients)
from fedjax_lab.algorithms.fedavg import FedAvgState, fedavg
from fedjax_lab.algorithms.scaffold import (ScaffoldClientState, ScaffoldConfig, build,
                                            scaffold)
from fedjax_lab.core import local_train, model_loss
from fedjax_lab.core.types import DataInfo
from fedjax_lab.models import mlp
from fedjax_lab.options import OptionError, from_dict

SIZES = [9, 4, 13, 6]
MODEL_BYTES = (NUM_FEATURES * NUM_CLASSES + NUM_CLASSES) * 4
MODEL = small_model()
# One full-batch gradient-descent configuration shared by several float64 tests (four clients
# padded to 16 examples), so its rounds compile once.
GD = dict(num_epochs=3, batch_size=None, weighting="num_examples")
SCAFFOLD_GD = scaffold(MODEL, 0.3, num_clients=4, **GD)
SCAFFOLD_GD_ROUND = jax.jit(SCAFFOLD_GD.round)
FEDAVG_GD_ROUND = jax.jit(fedavg(MODEL, optax.sgd(0.3), dense_update="per_client", **GD).round)
# Each client's gradient at one model, mean over its real examples.
CLIENT_GRADIENTS = jax.jit(jax.vmap(jax.grad(model_loss(MODEL.apply)),
                                    in_axes=(None, 0, 0, 0, None)))
row = lambda tree, i: jax.tree.map(lambda leaf: leaf[i], tree)


def float64_state(algorithm, num_clients, variate_scale=0.0, seed=1):
    """`init`'s state in float64; with `variate_scale`, random client variates c_i and the
    server's c their population mean (what SCAFFOLD keeps from zero-initialised variates).
    Built with numpy around one jitted `init`: eager JAX compiles every operation apart."""
    state = jax.jit(algorithm.init)(jax.random.key(0))
    params = jax.tree.map(lambda p: np.asarray(p, np.float64), state.params)
    rng = np.random.default_rng(seed)
    variates = jax.tree.map(
        lambda p: variate_scale * rng.normal(size=(num_clients,) + p.shape), params)
    return jax.device_put(state._replace(
        params=params, control_variate=jax.tree.map(lambda v: v.mean(axis=0), variates),
        client_states=ScaffoldClientState(variates)))


def fedavg_state(params):
    """FedAvg's state at `params` (its round reads neither the round nor the metrics)."""
    return FedAvgState(params, optax.sgd(1.0).init(params), jnp.zeros((), jnp.int32), {})


def corrected_loss(model, correction):
    """The minibatch loss plus <c - c_i, y>, written independently of the module."""
    base = model_loss(model.apply)
    return lambda p, x, y, m, k: base(p, x, y, m, k) + sum(
        jnp.sum(a * b) for a, b in zip(jax.tree.leaves(correction), jax.tree.leaves(p)))


def test_zero_control_variates_give_fedavgs_round_bit_for_bit():
    """With c = c_i = 0 the correction adds exactly 0 to every gradient: one full-batch step
    (jitted and eager, uniform weights) and, in a first round, several steps (sample weights) are
    FedAvg's round bit for bit."""
    with jax.enable_x64(True):
        xs, ys = make_clients(SIZES, dtype=np.float64)
        batch = stack_clients(xs, ys, padded_length=16, client_ids=[2, 0, 3, 1])
        one_step = dict(num_epochs=1, batch_size=None, weighting="uniform")
        algorithm = scaffold(MODEL, 0.2, num_clients=4, **one_step)
        reference = fedavg(MODEL, optax.sgd(0.2), dense_update="per_client", **one_step)
        state = float64_state(algorithm, 4)
        expected = jax.jit(reference.round)(fedavg_state(state.params), batch)
        # Eager rounds compile every operation apart: once is enough.
        for round_fn in (jax.jit(algorithm.round), algorithm.round):
            new = round_fn(state, batch)
            assert_trees_equal(new.params, expected.params)
            assert float(new.metrics["train_loss"]) == float(expected.metrics["train_loss"])
        assert float(optax.tree.norm(new.control_variate)) > 0
        expected = FEDAVG_GD_ROUND(fedavg_state(state.params), batch)
        assert_trees_equal(SCAFFOLD_GD_ROUND(state, batch).params, expected.params)


def test_identical_clients_keep_every_correction_zero():
    """Identical clients, all sampled, full-batch GD (K = 3 steps): every client's option-II c_i
    is the same mean gradient along the same path, so c = mean c_i = c_i, every correction
    c - c_i vanishes and each round is FedAvg's. Only rounding differs: each client sums its full
    batch in its own shuffled order, so |c - c_i| and the gap to FedAvg stay below 1e-13 while
    |c| is of order 0.1."""
    with jax.enable_x64(True):
        xs, ys = make_clients([11], dtype=np.float64, seed=3)
        xs, ys = xs * 4, ys * 4
        state = float64_state(SCAFFOLD_GD, 4)
        reference = fedavg_state(state.params)
        for round_index in range(3):
            batch = stack_clients(xs, ys, padded_length=16, round_index=round_index)
            state, reference = SCAFFOLD_GD_ROUND(state, batch), FEDAVG_GD_ROUND(reference, batch)
            corrections = jax.tree.map(lambda c, ci: c[None] - ci, state.control_variate,
                                       state.client_states.control_variate)
            assert float(optax.tree.norm(corrections)) < 1e-13
            assert_trees_close(state.params, reference.params, rtol=0, atol=1e-13)
        assert float(optax.tree.norm(state.control_variate)) > 1e-2


def test_full_participation_reaches_the_global_stationary_point_and_fedavg_does_not():
    """Heterogeneous clients (features shifted by +-1), all sampled, 3 full-batch GD steps per
    round: SCAFFOLD's fixed point is the stationary point of sum_i p_i f_i, FedAvg's is not
    (client drift). Measured after 150 rounds: gradient norm 7e-12 against 2.8e-2."""
    with jax.enable_x64(True):
        xs, ys = make_clients([16] * 4, dtype=np.float64, seed=7)
        xs = [x + shift for x, shift in zip(xs, (1.0, 1.0, -1.0, -1.0))]
        batch = stack_clients(xs, ys)
        state = float64_state(SCAFFOLD_GD, 4)
        reference = fedavg_state(state.params)
        for _ in range(150):
            state, reference = SCAFFOLD_GD_ROUND(state, batch), FEDAVG_GD_ROUND(reference, batch)

        def global_gradient_norm(params):
            gradients = CLIENT_GRADIENTS(params, batch.x, batch.y, batch.mask, None)
            return float(optax.tree.norm(jax.tree.map(lambda g: g.mean(axis=0), gradients)))

        ours, theirs = global_gradient_norm(state.params), global_gradient_norm(reference.params)
        assert ours < 1e-9 < 1e-3 < theirs, (ours, theirs)


@functools.cache
def _partial_round():
    """One option-II round of clients 3 and 1 (9 and 4 examples: K = 6 and 4 steps of B = 3 over
    E = 2 epochs) among N = 6, from random variates with c their population mean."""
    with jax.enable_x64(True):
        xs, ys = make_clients(SIZES[:2], dtype=np.float64, seed=5)
        algorithm = scaffold(MODEL, 0.1, num_clients=6, num_epochs=2, batch_size=3)
        state = float64_state(algorithm, 6, variate_scale=0.5)
        batch = stack_clients(xs, ys, padded_length=12, client_ids=[3, 1])
        return xs, ys, state, batch, jax.jit(algorithm.round)(state, batch)


def test_option_two_variate_is_its_formula_with_each_clients_own_step_count():
    """c_i+ = c_i - c + (x - y_i) / (K_i eta_l), y_i and K_i from a separate `local_train` with
    the corrected loss; the two clients take different numbers of active steps."""
    with jax.enable_x64(True):
        xs, ys, state, batch, new = _partial_round()
        x, c = state.params, state.control_variate
        train = jax.jit(lambda correction, *client: local_train(
            corrected_loss(MODEL, correction), optax.sgd(0.1), x, *client, num_epochs=2,
            batch_size=3))
        changes = []
        for position, client in enumerate([3, 1]):
            c_i = row(state.client_states.control_variate, client)
            result = train(optax.tree.sub(c, c_i), batch.x[position], batch.y[position],
                           batch.mask[position], batch.rng[position])
            steps = int(result.num_steps)
            assert steps == 2 * math.ceil(len(ys[position]) / 3)
            expected = jax.tree.map(lambda ci_, c_, x_, y_: ci_ - c_ + (x_ - y_) / (steps * 0.1),
                                    c_i, c, x, result.params)
            assert_trees_close(row(new.client_states.control_variate, client), expected)
            changes.append(optax.tree.sub(result.params, x))
        assert [int(new.metrics["local_steps"])] == [6 + 4]
        # Uniform weights and eta_g = 1: x + (1/|S|) sum (y_i - x).
        assert_trees_close(new.params, jax.tree.map(lambda x_, a, b: x_ + (a + b) / 2, x,
                                                    *changes))


def test_server_variate_moves_by_one_over_n_of_the_cohorts_changes():
    """Cohort of 2 among N = 6: c+ = c + (1/6) sum_{i in S} (c_i+ - c_i), not the cohort's mean
    change (|S|/N = 1/3 of it), so c stays the mean of all six c_i; the other four are untouched."""
    with jax.enable_x64(True):
        _, _, state, _, new = _partial_round()
        before, after = state.client_states.control_variate, new.client_states.control_variate
        change = jax.tree.map(lambda a, b: (a[3] - b[3]) + (a[1] - b[1]), after, before)
        assert_trees_close(new.control_variate, jax.tree.map(
            lambda c, d: c + d / 6, state.control_variate, change))
        assert_trees_close(new.control_variate, jax.tree.map(lambda v: v.mean(axis=0), after))
        assert float(optax.tree.norm(change)) > 0.1
        for old, updated in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
            np.testing.assert_array_equal(np.asarray(updated)[[0, 2, 4, 5]],
                                          np.asarray(old)[[0, 2, 4, 5]])


@pytest.mark.parametrize("variate_update", ["I", "II"])
def test_one_full_batch_step_makes_both_options_the_gradient_at_x(variate_update):
    """Option I is g_i(x); after one full-batch step y_i = x - eta (g_i(x) + c - c_i), so option
    II's c_i - c + (x - y_i) / eta is g_i(x) too (to rounding). Built from the registry config,
    whose eta_g = 0.5 makes x+ = x + 0.5 mean_i (y_i - x)."""
    with jax.enable_x64(True):
        xs, ys = make_clients(SIZES, dtype=np.float64, seed=2)
        config = from_dict(ScaffoldConfig, {
            "variate_update": variate_update, "global_lr": 0.5,
            "client": {"lr": 0.25, "epochs": 1, "batch_size": None}})
        algorithm = build(config, MODEL, DataInfo(len(SIZES), NUM_CLASSES, (NUM_FEATURES,), 16))
        state = float64_state(algorithm, len(SIZES), variate_scale=0.3)
        batch = stack_clients(xs, ys, padded_length=16)
        new = jax.jit(algorithm.round)(state, batch)
        gradients = CLIENT_GRADIENTS(state.params, batch.x, batch.y, batch.mask, None)
        assert_trees_close(new.client_states.control_variate, gradients, rtol=1e-10,
                           atol=1e-12)
        steps = jax.tree.map(lambda g, c, ci: -0.25 * (g + c[None] - ci), gradients,
                             state.control_variate, state.client_states.control_variate)
        assert_trees_close(new.params, jax.tree.map(lambda x, s: x + 0.5 * s.mean(axis=0),
                                                    state.params, steps))


def test_unsampled_and_padded_clients_keep_their_variates_and_traffic_is_doubled():
    """Only the three real cohort clients' c_i change; c stays the population mean of the c_i;
    each real client receives (x, c) and sends (dy_i, dc_i): twice the model each way."""
    xs, ys = make_clients([9, 4, 13, 0], seed=2)
    algorithm = scaffold(MODEL, 0.1, num_clients=10, num_epochs=2, batch_size=3)
    state = jax.jit(algorithm.init)(jax.random.key(0))
    rng = np.random.default_rng(0)
    variates = jax.tree.map(lambda v: rng.normal(size=v.shape).astype(np.float32),
                            state.client_states.control_variate)
    state = state._replace(client_states=ScaffoldClientState(variates),
                           control_variate=jax.tree.map(lambda v: v.mean(axis=0), variates))
    # Client 9 rides in a padded row (no examples); clients 3, 6 and 1 are sampled.
    new = jax.jit(algorithm.round)(state, stack_clients(xs, ys, client_ids=[3, 6, 1, 9]))
    untouched = [i for i in range(10) if i not in (1, 3, 6)]
    before, after = state.client_states.control_variate, new.client_states.control_variate
    for old, updated in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(np.asarray(updated)[untouched], np.asarray(old)[untouched])
        assert not np.allclose(np.asarray(updated)[[1, 3, 6]], np.asarray(old)[[1, 3, 6]])
    assert_trees_close(new.control_variate, jax.tree.map(lambda v: v.mean(axis=0), after),
                       rtol=1e-6, atol=1e-7)
    assert int(new.metrics["participants"]) == 3
    assert int(new.metrics["local_steps"]) == 2 * (3 + 2 + 5)
    assert float(new.metrics["bytes_up"]) == float(new.metrics["bytes_down"]) == 3 * 2 * MODEL_BYTES
    assert jax.tree.structure(new.metrics) == jax.tree.structure(state.metrics)
    assert all(a.dtype == b.dtype for a, b in zip(jax.tree.leaves(new.metrics),
                                                  jax.tree.leaves(state.metrics)))


def test_the_eager_initial_state_shares_no_buffer_between_leaves():
    """The run loop donates the state that `init` computed eagerly; XLA refuses a buffer donated
    twice, so no two leaves (the equal byte counts, the zero variates) may be one array."""
    state = scaffold(MODEL, 0.1, num_clients=3).init(jax.random.key(0))
    buffers = [leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(state)]
    assert len(set(buffers)) == len(buffers)


def test_batchnorm_statistics_get_no_control_variate():
    """The running statistics travel with the parameters but have no gradient: their c_i and c
    stay 0 while the weights' move."""
    model = mlp((NUM_FEATURES,), NUM_CLASSES, hidden=(4,), batch_norm=True)
    algorithm = scaffold(model, 0.1, num_clients=4, batch_size=3)
    xs, ys = make_clients(SIZES)
    new = jax.jit(algorithm.round)(jax.jit(algorithm.init)(jax.random.key(0)),
                                   stack_clients(xs, ys))
    for variate in (new.control_variate, new.client_states.control_variate):
        assert set(variate) == set(model.mutable) | {"params"}
        assert all(not np.any(leaf) for name in model.mutable
                   for leaf in jax.tree.leaves(variate[name]))
        assert float(optax.tree.norm(variate["params"])) > 0


@pytest.mark.parametrize("options, message", [
    ({"variate_update": "III"}, r"^variate_update='III' is invalid; allowed: II, I"),
    ({"global_lr": 0.0}, r"^global_lr=0.0 is invalid; expected a number > 0"),
    ({"global_lr": -1.0}, r"^global_lr=-1.0 is invalid"),
    ({"weighting": "size"}, r"^weighting='size' is invalid"),
    ({"client": {"momentum": 0.9}}, r"^client.momentum=0.9 is invalid; SCAFFOLD's clients run "
                                    "plain SGD"),
    ({"client": {"clip_norm": 5.0}}, r"^client.clip_norm=5.0 is invalid"),
    ({"client": {"weight_decay": 1e-4}}, r"^client.weight_decay=0.0001 is invalid"),
])
def test_bad_options_name_the_field(options, message):
    with pytest.raises(OptionError, match=message):
        from_dict(ScaffoldConfig, options)


def test_factory_refuses_bad_arguments_by_name():
    with pytest.raises(ValueError, match="variate_update 'III' is unknown; allowed: II, I"):
        scaffold(MODEL, 0.1, num_clients=4, variate_update="III")
    with pytest.raises(ValueError, match=r"global_lr=0 is invalid; expected > 0"):
        scaffold(MODEL, 0.1, num_clients=4, global_lr=0)
    with pytest.raises(ValueError, match="num_clients=0 is invalid"):
        scaffold(MODEL, 0.1, num_clients=0)
