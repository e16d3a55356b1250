"""Robust aggregators (core/robust.py): definitions, participation, and the uniform signature."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import assert_trees_close, assert_trees_equal
from fedjax_lab.core import client_weights, weighted_mean
from fedjax_lab.core.robust import (clipped_mean, coordinate_median, get_aggregator,
                                    majority_vote, trimmed_mean)


def stacked_updates(num_clients, seed=0):
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.normal(size=(num_clients, 3, 2))),
            "b": jnp.asarray(rng.normal(size=(num_clients, 4)))}


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("num_clients", [5, 6])
def test_coordinate_median_is_numpy_median_over_participants(jit, num_clients):
    with jax.enable_x64(True):
        updates = stacked_updates(num_clients + 2)
        sizes = jnp.asarray([3] * num_clients + [0, 0])  # two padded clients
        weights = client_weights(sizes)
        aggregate = jax.jit(coordinate_median) if jit else coordinate_median
        expected = jax.tree.map(lambda leaf: np.median(np.asarray(leaf)[:num_clients], axis=0),
                                updates)
        assert_trees_close(aggregate(updates, weights), expected, rtol=0, atol=0)


def test_median_ignores_a_huge_outlier_and_weights_only_select_participants():
    updates = {"v": jnp.asarray([[1.0], [2.0], [3.0], [1e9]])}
    uniform = coordinate_median(updates, jnp.full(4, 0.25))
    skewed = coordinate_median(updates, jnp.asarray([0.01, 0.01, 0.01, 0.97]))
    np.testing.assert_array_equal(uniform["v"], [2.5])
    np.testing.assert_array_equal(skewed["v"], [2.5])


@pytest.mark.parametrize("weighting", ["num_examples", "uniform"])
def test_trimmed_mean_with_nothing_trimmed_is_the_weighted_mean(weighting):
    with jax.enable_x64(True):
        updates = stacked_updates(7)
        weights = client_weights(jnp.asarray([4, 9, 1, 0, 6, 2, 3]), weighting=weighting)
        assert_trees_close(jax.jit(trimmed_mean(0.0))(updates, weights),
                           weighted_mean(updates, weights), rtol=1e-14, atol=1e-15)


def test_trimmed_mean_drops_the_extremes_of_each_coordinate():
    with jax.enable_x64(True):
        values = np.array([[5.0, -1.0], [1.0, 100.0], [3.0, 2.0], [-50.0, 4.0], [2.0, 3.0]])
        weights = client_weights(jnp.ones(5), weighting="uniform")
        got = trimmed_mean(0.2)({"v": jnp.asarray(values)}, weights)["v"]
        expected = [np.mean(np.sort(values[:, j])[1:4]) for j in range(2)]
        np.testing.assert_allclose(got, expected, rtol=1e-15)


def test_clipped_mean_clips_to_the_radius_and_is_the_mean_when_nothing_is_clipped():
    with jax.enable_x64(True):
        updates = stacked_updates(4)
        weights = client_weights(jnp.asarray([1, 2, 3, 4]))
        assert_trees_close(clipped_mean(1e6)(updates, weights), weighted_mean(updates, weights),
                           rtol=0, atol=0)
        one_client = jax.tree.map(lambda leaf: leaf[:1], updates)
        clipped = clipped_mean(0.5)(one_client, jnp.ones(1))
        norm = np.sqrt(sum(np.sum(np.asarray(leaf) ** 2) for leaf in jax.tree.leaves(clipped)))
        np.testing.assert_allclose(norm, 0.5, rtol=1e-14)


def test_median_norm_clipping_bounds_an_attacker_by_the_typical_norm():
    honest = np.ones((4, 3))
    attacker = 1e6 * np.ones((1, 3))
    updates = {"v": jnp.asarray(np.concatenate([honest, attacker]))}
    weights = client_weights(jnp.ones(5), weighting="uniform")
    np.testing.assert_allclose(clipped_mean("median")(updates, weights)["v"], np.ones(3),
                               rtol=1e-6)


def test_majority_vote_ties_give_zero_and_padded_clients_do_not_vote():
    updates = {"v": jnp.asarray([[1.0, -2.0, 0.5], [3.0, -1.0, -0.5], [-1.0, 5.0, 7.0],
                                 [-4.0, -9.0, 7.0]])}
    np.testing.assert_array_equal(majority_vote(updates, jnp.full(4, 0.25))["v"], [0, -1, 1])
    three = majority_vote(updates, jnp.asarray([1 / 3, 1 / 3, 1 / 3, 0.0]))
    np.testing.assert_array_equal(three["v"], [1, -1, 1])


def test_no_participant_gives_zero_like_weighted_mean():
    updates = stacked_updates(3)
    zero = jnp.zeros(3)
    for aggregate in (coordinate_median, trimmed_mean(0.1), clipped_mean("median"),
                      majority_vote):
        assert_trees_equal(aggregate(updates, zero), jax.tree.map(
            lambda leaf: jnp.zeros_like(leaf[0]), updates))


def test_get_aggregator_names_and_one_line_errors():
    updates = stacked_updates(3)
    weights = client_weights(jnp.asarray([1, 1, 1]))
    assert_trees_equal(get_aggregator("mean")(updates, weights), weighted_mean(updates, weights))
    assert get_aggregator("median") is coordinate_median
    with pytest.raises(ValueError, match="aggregator 'krum' is unknown"):
        get_aggregator("krum")
    with pytest.raises(ValueError, match="beta=0.5 is invalid"):
        trimmed_mean(0.5)
    with pytest.raises(ValueError, match="max_norm=-1 is invalid"):
        clipped_mean(-1)
    with pytest.raises(ValueError, match="takes no option 'beta'"):
        get_aggregator("median", beta=0.1)
