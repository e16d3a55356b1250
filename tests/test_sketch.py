"""Count sketch (core/sketch.py): ALGORITHMS.md §6e tests (1)-(3) and the median rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab.core.sketch import CountSketch, top_k


@pytest.mark.parametrize("jit", [False, True])
def test_linearity_is_exact_in_float64(jit):
    with jax.enable_x64(True):
        sketch = CountSketch(dim=1000, num_rows=5, num_columns=64, seed=3)
        rng = np.random.default_rng(0)
        # Integers below 2^40 add exactly in float64, whatever the order of accumulation.
        a = jnp.asarray(rng.integers(-2**30, 2**30, 1000).astype(np.float64))
        b = jnp.asarray(rng.integers(-2**30, 2**30, 1000).astype(np.float64))
        sk = jax.jit(sketch.sketch) if jit else sketch.sketch
        np.testing.assert_array_equal(sk(a + b), sk(a) + sk(b))
        np.testing.assert_array_equal(sk(-4.0 * a), -4.0 * sk(a))
        u, v = (jnp.asarray(rng.normal(size=1000)) for _ in range(2))
        np.testing.assert_allclose(sk(0.3 * u + v), 0.3 * sk(u) + sk(v), rtol=0, atol=1e-13)


def test_hashes_are_shared_by_every_sketch_of_the_same_seed():
    first, second = CountSketch(50, 3, 7, seed=11), CountSketch(50, 3, 7, seed=11)
    np.testing.assert_array_equal(first.hashes().buckets, second.hashes().buckets)
    np.testing.assert_array_equal(first.hashes().signs, second.hashes().signs)
    other = CountSketch(50, 3, 7, seed=12).hashes()
    assert not np.array_equal(other.buckets, first.hashes().buckets)


def test_heavy_hitter_is_found_with_error_at_most_the_noise_l1_norm():
    with jax.enable_x64(True):
        dim, heavy = 2000, 1234
        sketch = CountSketch(dim, num_rows=5, num_columns=50, seed=0)
        rng = np.random.default_rng(1)
        noise = rng.normal(size=dim)
        noise *= 0.99 / np.abs(noise).sum()
        vector = noise.copy()
        vector[heavy] += 100.0
        recovered = np.asarray(sketch.unsketch(sketch.sketch(jnp.asarray(vector)), 1))
        assert np.flatnonzero(recovered).tolist() == [heavy]
        assert abs(recovered[heavy] - 100.0) <= np.abs(noise).sum()


def test_well_separated_k_sparse_vector_is_recovered_exactly():
    with jax.enable_x64(True):
        # With c = 50k a zero coordinate shares a bucket with the support in 3 of 5 rows with
        # probability ~1e-4, so about 0.1 false heavy hitters are expected; seed 0 has none.
        dim, k = 1000, 10
        sketch = CountSketch(dim, num_rows=5, num_columns=50 * k, seed=0)
        support = np.random.default_rng(2).choice(dim, k, replace=False)
        vector = np.zeros(dim)
        vector[support] = np.arange(1, k + 1) * 10.0 * (-1) ** np.arange(k)
        recovered = sketch.unsketch(sketch.sketch(jnp.asarray(vector)), k)
        np.testing.assert_array_equal(recovered, vector)


def test_query_is_the_median_of_rows_with_the_mean_of_the_middle_two_for_even_rows():
    with jax.enable_x64(True):
        sketch = CountSketch(dim=30, num_rows=4, num_columns=5, seed=0)
        table = jnp.asarray(np.random.default_rng(3).normal(size=(4, 5)))
        rows = np.asarray(sketch.row_estimates(table))
        hashes = sketch.hashes()
        expected_rows = (np.asarray(hashes.signs) * np.asarray(table)[
            np.arange(4)[:, None], np.asarray(hashes.buckets)])
        np.testing.assert_array_equal(rows, expected_rows)
        ordered = np.sort(rows, axis=0)
        np.testing.assert_allclose(sketch.query(table), (ordered[1] + ordered[2]) / 2, rtol=1e-15)


def test_top_k_keeps_the_largest_magnitudes_and_checks_k():
    vector = jnp.asarray([0.5, -3.0, 2.0, -0.1, 3.0])
    np.testing.assert_array_equal(top_k(vector, 2), [0, -3.0, 0, 0, 3.0])
    np.testing.assert_array_equal(top_k(vector, 5), vector)
    with pytest.raises(ValueError, match="k=6 is invalid"):
        top_k(vector, 6)
    with pytest.raises(ValueError, match="num_columns=0 is invalid"):
        CountSketch(10, 5, 0)
    with pytest.raises(ValueError, match=r"shape \(9,\); expected \(10,\)"):
        CountSketch(10, 5, 3).sketch(jnp.zeros(9))
