"""FedDyn invariants (Acar et al., ICLR 2021, Algorithm 1): α = 0 is uniform FedAvg, the gradient
memory, the server's h with its 1/m, untouched unsampled and padded clients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common import (assert_trees_close, assert_trees_equal, make_clients, small_model,
                    stack_clients)
from fedjax_lab.algorithms.feddyn import FedDynClientState, FedDynConfig, feddyn
from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.core import local_train, model_loss
from fedjax_lab.options import OptionError, from_dict

SIZES = [9, 4, 13, 6]
POPULATION = 6
OPTIONS = dict(num_epochs=2, batch_size=3)
ALPHA, LR = 0.3, 0.15
PADDED_LENGTH = 13
MODEL = small_model()
# One configuration and one cohort shape (3 rows of 12) shared by the float64 tests below, so its
# round and the hand-written local training each compile once.
ALGORITHM = feddyn(MODEL, optax.sgd(LR), num_clients=POPULATION, alpha=ALPHA, **OPTIONS)
ROUND = jax.jit(ALGORITHM.round)
BASE_LOSS = model_loss(MODEL.apply)


def to_float64(tree):
    return jax.tree.map(lambda leaf: leaf.astype(jnp.float64), tree)


@functools.partial(jax.jit, static_argnums=0)
def float64_state(algorithm, key):
    """`init`'s state in float64 (call inside `jax.enable_x64`), jitted: eager inits compile
    every small op on its own."""
    state = algorithm.init(key)
    params = to_float64(state.params)
    state = state._replace(params=params, opt_state=optax.sgd(1.0).init(params))
    if hasattr(state, "client_states"):
        state = state._replace(client_states=to_float64(state.client_states),
                               h_over_alpha=to_float64(state.h_over_alpha))
    return state


@jax.jit
def perturbed_memories(state, key):
    """Gradient memories moved away from 0, differently for every client, and h = their mean
    (the invariant the algorithm keeps; the state holds h/α)."""
    leaves, treedef = jax.tree.flatten(state.client_states.gradient_memory)
    keys = jax.random.split(key, len(leaves))
    memory = jax.tree.unflatten(treedef, [
        0.2 * jax.random.normal(k, leaf.shape, leaf.dtype) for leaf, k in zip(leaves, keys)])
    return state._replace(client_states=FedDynClientState(memory),
                          h_over_alpha=jax.tree.map(lambda g: g.mean(0) / ALPHA, memory))


@jax.jit
def hand_local_training(theta, memory, x, y, mask, rng):
    """Algorithm 1's local objective L_i(θ) - <g_i, θ> + (α/2)||θ - θ^{t-1}||², written out."""
    def loss(params, xb, yb, mb, key):
        linear = sum(jnp.vdot(g, p) for g, p in zip(jax.tree.leaves(memory),
                                                     jax.tree.leaves(params)))
        distance = sum(jnp.sum((p - w) ** 2) for p, w in zip(jax.tree.leaves(params),
                                                              jax.tree.leaves(theta)))
        return BASE_LOSS(params, xb, yb, mb, key) - linear + ALPHA / 2 * distance
    return local_train(loss, optax.sgd(LR), theta, x, y, mask, rng, **OPTIONS).params


def row(tree, index):
    return jax.tree.map(lambda leaf: leaf[index], tree)


def test_alpha_zero_is_uniform_fedavg_bit_for_bit():
    with jax.enable_x64(True):
        xs, ys = make_clients(SIZES, dtype=np.float64)
        dyn = feddyn(MODEL, optax.sgd(0.1), num_clients=10, alpha=0.0, **OPTIONS)
        avg = fedavg(MODEL, optax.sgd(0.1), weighting="uniform", **OPTIONS)
        key = jax.random.key(0)
        dyn_state, avg_state = float64_state(dyn, key), float64_state(avg, key)
        dyn_round, avg_round = jax.jit(dyn.round), jax.jit(avg.round)
        for round_index, ids in enumerate([[7, 2, 5, 0], [1, 9, 2, 4]]):
            batch = stack_clients(xs, ys, client_ids=ids, round_index=round_index)
            dyn_state, avg_state = dyn_round(dyn_state, batch), avg_round(avg_state, batch)
        assert_trees_equal(dyn_state.params, avg_state.params)
        for name, value in avg_state.metrics.items():
            assert_trees_equal(dyn_state.metrics[name], value)
        # Nothing accumulates at α = 0: no memory, no correction.
        assert not any(np.any(leaf) for leaf in jax.tree.leaves(
            (dyn_state.client_states, dyn_state.h_over_alpha)))
        assert float(dyn_state.metrics["correction_norm"]) == 0.0


def test_first_round_memory_is_minus_alpha_times_the_drift():
    """From g_i = 0 (the initial state), g_i = -α (θ_i - θ) with θ_i from a separate
    local_train."""
    with jax.enable_x64(True):
        xs, ys = make_clients([9, 4, 13], dtype=np.float64)
        ids = [3, 0, 5]
        state = float64_state(ALGORITHM, jax.random.key(0))
        batch = stack_clients(xs, ys, padded_length=PADDED_LENGTH, client_ids=ids)
        new = ROUND(state, batch)
        zeros = optax.tree.zeros_like(state.params)
        for position, client in enumerate(ids):
            theta = hand_local_training(state.params, zeros, batch.x[position],
                                        batch.y[position], batch.mask[position],
                                        batch.rng[position])
            expected = jax.tree.map(lambda t, w: -ALPHA * (t - w), theta, state.params)
            assert_trees_close(row(new.client_states.gradient_memory, client), expected)
        assert np.any(new.client_states.gradient_memory["Dense_0"]["kernel"][3])


def test_cohort_of_two_among_six_follows_algorithm_one_by_hand():
    """g_i <- g_i - α(θ_i - θ); h <- h - (α/m) Σ (θ_i - θ) with m = 6 (not the cohort's 2);
    θ' = mean θ_i - h/α; the other clients' memories and the padded row's stay as they were;
    the eager round equals the jitted one."""
    with jax.enable_x64(True):
        xs, ys = make_clients([9, 4, 0], dtype=np.float64, seed=3)
        state = perturbed_memories(float64_state(ALGORITHM, jax.random.key(0)),
                                   jax.random.key(1))
        # Client 5 rides along as a padded row (no examples).
        ids = [4, 1, 5]
        batch = stack_clients(xs, ys, padded_length=PADDED_LENGTH, client_ids=ids)
        new = ROUND(state, batch)
        assert_trees_close(ALGORITHM.round(state, batch), new)

        theta, memories = state.params, state.client_states.gradient_memory
        trained = {client: hand_local_training(theta, row(memories, client), batch.x[position],
                                               batch.y[position], batch.mask[position],
                                               batch.rng[position])
                   for position, client in enumerate(ids[:2])}
        drifts = {client: jax.tree.map(jnp.subtract, trained[client], theta) for client in trained}
        h = jax.tree.map(lambda h0, d4, d1: h0 - ALPHA / POPULATION * (d4 + d1),
                         jax.tree.map(lambda c: ALPHA * c, state.h_over_alpha), drifts[4],
                         drifts[1])
        expected_params = jax.tree.map(lambda t4, t1, h_leaf: (t4 + t1) / 2 - h_leaf / ALPHA,
                                       trained[4], trained[1], h)
        assert_trees_close(jax.tree.map(lambda c: ALPHA * c, new.h_over_alpha), h)
        assert_trees_close(new.params, expected_params)
        for client in (4, 1):
            assert_trees_close(row(new.client_states.gradient_memory, client),
                               jax.tree.map(lambda g, d: g - ALPHA * d,
                                            row(memories, client), drifts[client]))
        for client in (0, 2, 3, 5):
            assert_trees_equal(row(new.client_states.gradient_memory, client),
                               row(memories, client))
        # h stays the population mean of the memories.
        assert_trees_close(jax.tree.map(lambda c: ALPHA * c, new.h_over_alpha),
                           jax.tree.map(lambda g: g.mean(0), new.client_states.gradient_memory))
        assert int(new.metrics["participants"]) == 2
        model_bytes = (5 * 3 + 3) * 8
        assert float(new.metrics["bytes_down"]) == 3 * model_bytes
        assert float(new.metrics["bytes_up"]) == 2 * model_bytes


@pytest.mark.parametrize("options, message", [
    ({"alpha": -0.1}, r"^alpha=-0.1 is invalid; expected a number >= 0"),
    ({"client": {"lr": 0.0}}, r"^client\.lr=0.0 is invalid"),
    ({"server": {"optimizer": "lamb"}}, r"^server\.optimizer='lamb' is invalid; allowed"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(OptionError, match=message):
        from_dict(FedDynConfig, options)


@pytest.mark.parametrize("options, message", [
    (dict(alpha=-1.0), r"alpha=-1.0 is invalid; expected alpha >= 0"),
    (dict(num_clients=0), r"num_clients=0 is invalid"),
    (dict(num_epochs=0), r"num_epochs=0 is invalid"),
])
def test_bad_factory_arguments_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        feddyn(small_model(), optax.sgd(0.1), **{"num_clients": POPULATION, **options})
