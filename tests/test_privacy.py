"""DP-FedAvg (fedjax_lab/privacy): sensitivity, the noise, the FedAvg limit, adaptive clipping,
Poisson cohorts. The accounting and the options are in test_privacy_accounting.py."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common import (assert_trees_close, assert_trees_equal, float64_params, make_clients,
                    small_model, stack_clients)
from fedjax_lab.algorithms import fedavg
from fedjax_lab.core import experiment_key
from fedjax_lab.core.types import client_keys
from fedjax_lab.data.sampling import poisson_subsample
from fedjax_lab.privacy import (AdaptiveClipping, DPAggregatorState, clip_by_global_norm,
                                dp_aggregator, poisson_cohorts)

SIZES = [9, 4, 13, 6]


def private_round(dp, *, server=None, lr=0.1):
    """A jitted FedAvg round with `dp`, 2 epochs of batch 4 (float64 inside `enable_x64`)."""
    algorithm = fedavg(small_model(), optax.sgd(lr), num_epochs=2, batch_size=4,
                       weighting="uniform", server_optimizer=server, dp=dp)
    return algorithm, jax.jit(algorithm.round)


def state_with(algorithm, params):
    state = algorithm.init(jax.random.key(0))
    return state._replace(params=params)


def pre_noise_sum(before, after, denominator):
    """D * (w_t - w_{t+1}): the clipped sum the server released, under sgd(1) and z = 0."""
    return jax.tree.map(lambda b, a: denominator * (b - a), before, after)


def tree_distance(a, b):
    return float(optax.tree.norm(optax.tree.sub(a, b)))


# ---- sensitivity -----------------------------------------------------------------------------

def test_one_adversarial_client_moves_the_pre_noise_sum_by_at_most_the_clip_norm():
    with jax.enable_x64(True):
        clip = 0.5
        algorithm, round_fn = private_round(dp_aggregator(clip, 0.0))
        params = float64_params(small_model())
        state = state_with(algorithm, params)
        xs, ys = make_clients(SIZES, dtype=np.float64)
        honest = stack_clients(xs, ys)
        # Client 2's data replaced by features 10^4 times larger: a huge local update.
        adversarial_xs = list(xs)
        adversarial_xs[2] = xs[2] * 1e4
        adversarial = stack_clients(adversarial_xs, ys)
        # ... and removed (a padded client, as if it had not been sampled).
        removed = honest._replace(num_examples=honest.num_examples.at[2].set(0),
                                  mask=honest.mask.at[2].set(False))
        sums = {}
        for name, batch in (("honest", honest), ("adversarial", adversarial),
                            ("removed", removed)):
            new = round_fn(state, batch)
            sums[name] = pre_noise_sum(params, new.params, len(SIZES))
            if name == "adversarial":
                assert float(new.metrics["dp_clipped_fraction"]) >= 0.25  # it was clipped
        assert tree_distance(sums["adversarial"], sums["removed"]) <= clip * (1 + 1e-12)
        assert tree_distance(sums["adversarial"], sums["honest"]) <= 2 * clip * (1 + 1e-12)
        # Without clipping the same client moves the sum by far more than S.
        unclipped, unclipped_round = private_round(dp_aggregator(jnp.inf, 0.0))
        unclipped_state = state_with(unclipped, params)
        far = tree_distance(
            pre_noise_sum(params, unclipped_round(unclipped_state, adversarial).params, 4),
            pre_noise_sum(params, unclipped_round(unclipped_state, removed).params, 4))
        assert far > 100 * clip


def test_clipping_is_flat_over_all_leaves_and_leaves_small_deltas_alone():
    with jax.enable_x64(True):
        delta = {"a": jnp.asarray([3.0, 0.0]), "b": jnp.asarray([[4.0]])}
        clipped, norm = clip_by_global_norm(delta, 1.0)
        assert float(norm) == 5.0
        assert_trees_close(clipped, {"a": jnp.asarray([0.6, 0.0]), "b": jnp.asarray([[0.8]])})
        assert_trees_equal(clip_by_global_norm(delta, 5.0)[0], delta)
        assert_trees_equal(clip_by_global_norm(delta, jnp.inf)[0], delta)
        zero = jax.tree.map(jnp.zeros_like, delta)
        assert_trees_equal(clip_by_global_norm(zero, 1.0)[0], zero)


# ---- the noise -------------------------------------------------------------------------------

DIMENSION = 20_000


def noise_of(aggregator, key, *, num_clients=5, deltas=None):
    """The noise an aggregator with D = C added to `deltas` (zeros by default) with `key`."""
    if deltas is None:
        deltas = {"w": jnp.zeros((num_clients, DIMENSION)), "v": jnp.zeros((num_clients, 7))}
    state = aggregator.init()
    private, _, _ = aggregator.aggregate_stacked(deltas, jnp.ones(num_clients, bool), state, key)
    clipped = jax.vmap(clip_by_global_norm, (0, None))(deltas, state.clip_norm)[0]
    return optax.tree.sub(private, jax.tree.map(lambda leaf: leaf.mean(axis=0), clipped))


@pytest.mark.parametrize("adaptive", [False, True])
def test_noise_std_is_z_times_s_over_the_denominator(adaptive):
    with jax.enable_x64(True):
        z, clip, num_clients = 1.3, 0.7, 5
        rounds = jnp.arange(6)
        count_noise = 2.0
        aggregator = dp_aggregator(clip, z, adaptive=AdaptiveClipping(count_noise=count_noise)
                                   if adaptive else None)
        noise = jax.jit(jax.vmap(lambda t: noise_of(aggregator, jax.random.key(t))["w"]))(rounds)
        sum_noise = z if not adaptive else (z ** -2 - (2 * count_noise) ** -2) ** -0.5
        expected = sum_noise * clip / num_clients
        # 120,000 draws: the sample std is within 1% of the truth with probability > 0.999.
        assert abs(float(jnp.std(noise)) / expected - 1) < 0.01
        assert abs(float(jnp.mean(noise))) < 4 * expected / np.sqrt(noise.size)
        _, _, metrics = aggregator.aggregate_stacked(
            {"w": jnp.zeros((num_clients, 3))}, jnp.ones(num_clients, bool), aggregator.init(),
            jax.random.key(0))
        np.testing.assert_allclose(float(metrics["dp_noise_std"]), expected, rtol=1e-12)


def test_the_denominator_is_fixed_not_the_number_of_participants():
    with jax.enable_x64(True):
        deltas = {"w": jnp.ones((4, 3))}
        participating = jnp.asarray([True, True, True, False])
        for denominator, expected in ((None, 0.75), (10.0, 0.3)):
            aggregator = dp_aggregator(jnp.inf, 0.0, denominator=denominator)
            private, _, _ = aggregator.aggregate_stacked(deltas, participating,
                                                         aggregator.init(), jax.random.key(0))
            np.testing.assert_allclose(private["w"], expected, rtol=1e-15)
        _, _, metrics = dp_aggregator(1.0, 2.0, denominator=10.0).aggregate_stacked(
            deltas, participating, DPAggregatorState(jnp.asarray(1.0)), jax.random.key(0))
        np.testing.assert_allclose(float(metrics["dp_noise_std"]), 0.2, rtol=1e-15)


def test_same_key_same_noise_and_independent_noise_across_rounds_cohorts_and_leaves():
    with jax.enable_x64(True):
        aggregator = dp_aggregator(1.0, 1.0)
        ids = jnp.arange(5, dtype=jnp.int32)
        key = experiment_key(3)
        round_key = lambda t, first=0: client_keys(key, t, ids + first)[0]
        noise = jax.jit(lambda k: noise_of(aggregator, k))
        first = noise(round_key(0))
        assert_trees_equal(first, noise(round_key(0)))
        # The noise does not depend on what the clients sent.
        busy = {"w": jnp.full((5, DIMENSION), 0.01), "v": jnp.full((5, 7), -0.02)}
        assert_trees_close(first, jax.jit(lambda k: noise_of(aggregator, k, deltas=busy))(
            round_key(0)), rtol=1e-9, atol=1e-12)
        bound = 4 / np.sqrt(DIMENSION)  # |r| of independent vectors, 4 standard errors
        correlation = lambda a, b: float(jnp.corrcoef(a, b)[0, 1])
        assert abs(correlation(first["w"], noise(round_key(1))["w"])) < bound   # next round
        assert abs(correlation(first["w"], noise(round_key(0, first=7))["w"])) < bound  # cohort
        leaves = noise(round_key(2))["w"].reshape(2, -1)
        assert abs(correlation(leaves[0], leaves[1])) < 4 / np.sqrt(DIMENSION / 2)


def test_same_seed_same_private_round_and_the_seed_changes_the_noise():
    with jax.enable_x64(True):
        algorithm, round_fn = private_round(dp_aggregator(0.5, 1.0))
        state = state_with(algorithm, float64_params(small_model()))
        xs, ys = make_clients(SIZES, dtype=np.float64)
        once = round_fn(state, stack_clients(xs, ys, seed=1))
        assert_trees_equal(once, round_fn(state, stack_clients(xs, ys, seed=1)))
        other = round_fn(state, stack_clients(xs, ys, seed=2))
        assert tree_distance(once.params, other.params) > 0


# ---- the FedAvg limit ------------------------------------------------------------------------

@pytest.mark.parametrize("jit,server", [(True, "sgd"), (True, "adam"), (False, "sgd")])
def test_no_noise_and_no_clipping_is_fedavg_with_uniform_weights_bit_for_bit(jit, server):
    with jax.enable_x64(True):
        server_optimizer = optax.sgd(1.0) if server == "sgd" else optax.adam(0.01)
        xs, ys = make_clients(SIZES, dtype=np.float64)
        batch = stack_clients(xs, ys)
        params = float64_params(small_model())
        plain = fedavg(small_model(), optax.sgd(0.1), num_epochs=2, batch_size=4,
                       weighting="uniform", server_optimizer=server_optimizer)
        private = fedavg(small_model(), optax.sgd(0.1), num_epochs=2, batch_size=4,
                         weighting="uniform", server_optimizer=server_optimizer,
                         dp=dp_aggregator(jnp.inf, 0.0))
        plain_state, private_state = state_with(plain, params), state_with(private, params)
        for _ in range(2 if jit else 1):  # eager rounds are slow; one shows the equality
            plain_round = jax.jit(plain.round) if jit else plain.round
            private_round_fn = jax.jit(private.round) if jit else private.round
            plain_state = plain_round(plain_state, batch)
            private_state = private_round_fn(private_state, batch)
            assert_trees_equal(private_state.params, plain_state.params)
            assert_trees_equal(private_state.opt_state.optimizer, plain_state.opt_state)
        assert float(private_state.metrics["dp_noise_std"]) == 0.0


def test_an_empty_client_still_counts_in_the_fixed_denominator():
    with jax.enable_x64(True):
        xs, ys = make_clients(SIZES + [0], dtype=np.float64)
        batch = stack_clients(xs, ys)
        params = float64_params(small_model())
        plain = fedavg(small_model(), optax.sgd(0.1), num_epochs=2, batch_size=4,
                       weighting="uniform")
        private = fedavg(small_model(), optax.sgd(0.1), num_epochs=2, batch_size=4,
                         weighting="uniform", dp=dp_aggregator(jnp.inf, 0.0))
        plain_sum = pre_noise_sum(params, plain.round(state_with(plain, params), batch).params,
                                  len(SIZES))
        private_sum = pre_noise_sum(
            params, private.round(state_with(private, params), batch).params, len(SIZES) + 1)
        assert_trees_close(private_sum, plain_sum)


# ---- adaptive clipping -----------------------------------------------------------------------

def test_adaptive_clipping_converges_to_the_target_quantile_of_the_norms():
    """Norms log-normal(0, 1): the 0.3-quantile is exp(Φ^-1(0.3)) = 0.5914; S starts at 0.01."""
    with jax.enable_x64(True):
        num_clients, rounds, quantile = 500, 300, 0.3
        aggregator = dp_aggregator(0.01, 0.5, adaptive=AdaptiveClipping(quantile, 0.2))

        def one_round(state, key):
            norm_key, direction_key, noise_key = jax.random.split(key, 3)
            norms = jnp.exp(jax.random.normal(norm_key, (num_clients,)))
            directions = jax.random.normal(direction_key, (num_clients, 2))
            directions /= jnp.linalg.norm(directions, axis=1, keepdims=True)
            _, state, metrics = aggregator.aggregate_stacked(
                {"w": norms[:, None] * directions}, jnp.ones(num_clients, bool), state,
                noise_key)
            return state, (state.clip_norm, metrics["dp_clipped_fraction"])

        keys = jax.random.split(jax.random.key(0), rounds)
        _, (clips, clipped) = jax.jit(lambda k: jax.lax.scan(one_round, aggregator.init(),
                                                             k))(keys)
        true_quantile = float(np.exp(-0.5244005127080407))
        assert abs(float(jnp.mean(clips[-100:])) / true_quantile - 1) < 0.05
        assert abs(float(jnp.mean(clipped[-100:])) - (1 - quantile)) < 0.03
        assert float(clips[0]) < 0.02  # it moved from far below


# ---- Poisson cohorts -------------------------------------------------------------------------

def test_poisson_subsample_is_a_truncated_binomial_count_of_uniform_slots():
    num_clients, rate, capacity = 400, 0.02, 14  # expected 8, std 2.8: truncation is frequent
    xs, ys = make_clients([3] * capacity)
    batch = stack_clients(xs, ys)
    draw = jax.jit(jax.vmap(lambda k: poisson_subsample(batch, k, num_clients, rate)))
    sampled = draw(jax.random.split(jax.random.key(0), 20_000))
    kept = np.asarray(sampled.num_examples > 0)
    counts = kept.sum(axis=1)
    binomial = np.random.default_rng(0).binomial(num_clients, rate, 200_000)
    np.testing.assert_allclose(counts.mean(), np.minimum(binomial, capacity).mean(), rtol=0.02)
    assert counts.max() == capacity and (counts == capacity).mean() > 0.01
    # Every slot equally likely: each is kept with rate E[count] / capacity.
    np.testing.assert_allclose(kept.mean(axis=0), counts.mean() / capacity, atol=0.015)
    # Kept clients are untouched, the others are padded clients.
    np.testing.assert_array_equal(np.asarray(sampled.mask).any(axis=2), kept)
    np.testing.assert_array_equal(np.asarray(sampled.x), np.broadcast_to(batch.x,
                                                                          sampled.x.shape))


def test_poisson_cohorts_train_only_the_sampled_clients():
    xs, ys = make_clients([5] * 8)
    algorithm = fedavg(small_model(), optax.sgd(0.1), dp=dp_aggregator(1.0, 0.5,
                                                                       denominator=2.0))
    poisson = poisson_cohorts(algorithm, num_clients=100, expected_cohort=2.0)
    state = algorithm.init(jax.random.key(0))
    round_fn = jax.jit(poisson.round)
    participants = [int(round_fn(state, stack_clients(xs, ys, seed=seed)).metrics[
        "participants"]) for seed in range(12)]
    assert max(participants) < 8 and len(set(participants)) > 1
