"""Local training: shuffling, the active-step mask, padding invariance, a reference loop."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common import (assert_trees_close, assert_trees_equal, float64_params, make_clients,
                    small_model, stack_clients)
from fedjax_lab.core import local_train, model_loss
from fedjax_lab.core.local_training import (_PACKED_SORT_MAX_LENGTH, _packed_sort_order,
                                            epoch_permutation)
from fedjax_lab.core.types import ClientStream


def test_permutation_puts_each_real_example_first_once_and_ignores_padding():
    key = jax.random.key(3)
    short = epoch_permutation(key, jnp.arange(10) < 7)
    long = epoch_permutation(key, jnp.arange(25) < 7)
    assert sorted(np.asarray(short[:7]).tolist()) == list(range(7))
    np.testing.assert_array_equal(short[:7], long[:7])
    other = epoch_permutation(jax.random.key(4), jnp.arange(10) < 7)
    assert not np.array_equal(short[:7], other[:7])


def _lexicographic_order(is_padding, bits):
    """NumPy's order of the keys (is padding, bits, position), the last key first."""
    return np.lexsort((np.arange(len(bits)), np.asarray(bits), np.asarray(is_padding)))


@pytest.mark.parametrize("length", [1, 2, 7, 100, 129, 4096])
def test_packed_sorts_order_the_keys_exactly_with_ties_and_padding_anywhere(length):
    rng = np.random.default_rng(length)
    # Few distinct bit patterns, differing in the high bits, the low bits or both, so that most
    # keys tie in one of the two packed sorts, and padding scattered anywhere.
    patterns = np.array([0, 1, 2**31, 2**31 + 1, 2**32 - 1, 2**17, 2**17 + 3], np.uint32)
    bits = jnp.asarray(rng.choice(patterns, (3, length)))
    is_padding = jnp.asarray(rng.random((3, length)) < 0.3)
    order = jax.jit(jax.vmap(_packed_sort_order))(is_padding, bits)
    for row in range(3):
        np.testing.assert_array_equal(order[row], _lexicographic_order(is_padding[row], bits[row]))
    np.testing.assert_array_equal(_packed_sort_order(is_padding[0], bits[0]), order[0])


def test_permutations_longer_than_the_packed_sort_takes_are_the_same_order():
    length = _PACKED_SORT_MAX_LENGTH + 1
    key, mask = jax.random.key(5), jnp.arange(length) % 3 != 0
    bits = jax.vmap(lambda i: jax.random.bits(jax.random.fold_in(key, i)))(jnp.arange(length))
    np.testing.assert_array_equal(epoch_permutation(key, mask),
                                  _lexicographic_order(~mask, bits))


def _train(batch, client, **kwargs):
    model = small_model()
    params = model.init(jax.random.key(0))
    options = dict(num_epochs=3, batch_size=4)
    options.update(kwargs)
    return local_train(model_loss(model.apply), optax.sgd(0.1), params, batch.x[client],
                       batch.y[client], batch.mask[client], batch.rng[client], **options)


@pytest.mark.parametrize("jit", [False, True])
def test_padded_client_trains_exactly_like_unpadded(jit):
    xs, ys = make_clients([11])
    tight = stack_clients(xs, ys)
    padded = stack_clients(xs, ys, padded_length=30)
    train = jax.jit(_train, static_argnums=1) if jit else _train
    a, b = train(tight, 0), train(padded, 0)
    assert_trees_equal(a, b)
    assert int(a.num_steps) == 3 * math.ceil(11 / 4)


def test_active_epochs_and_client_size_set_the_number_of_steps():
    xs, ys = make_clients([9, 2, 0])
    batch = stack_clients(xs, ys, padded_length=12)
    assert int(_train(batch, 0, active_epochs=2).num_steps) == 2 * 3
    assert int(_train(batch, 1).num_steps) == 3
    empty = _train(batch, 2)
    assert int(empty.num_steps) == 0 and float(empty.mean_loss) == 0.0
    assert_trees_equal(empty.params, small_model().init(jax.random.key(0)))


def test_matches_a_python_reference_loop_in_float64():
    """Epoch e shuffles with its own permutation; the last batch of an epoch may be partial."""
    with jax.enable_x64(True):
        xs, ys = make_clients([10], dtype=np.float64)
        batch = stack_clients(xs, ys, padded_length=16)
        model = small_model()
        params = float64_params(model)
        result = local_train(model_loss(model.apply), optax.sgd(0.3), params, batch.x[0],
                             batch.y[0], batch.mask[0], batch.rng[0], num_epochs=2, batch_size=4)

        grad = jax.grad(model_loss(model.apply))
        reference, losses = params, []
        shuffle_key = jax.random.fold_in(batch.rng[0], ClientStream.SHUFFLE)
        for epoch in range(2):
            order = np.asarray(epoch_permutation(jax.random.fold_in(shuffle_key, epoch),
                                                 batch.mask[0]))[:10]
            for start in range(0, 10, 4):
                idx = order[start:start + 4]
                x, y, m = xs[0][idx], ys[0][idx], np.ones(len(idx), bool)
                losses.append(model_loss(model.apply)(reference, x, y, m, None))
                g = grad(reference, x, y, m, None)
                reference = jax.tree.map(lambda w, d: w - 0.3 * d, reference, g)
        assert int(result.num_steps) == 6
        assert_trees_close(result.params, reference)
        np.testing.assert_allclose(result.mean_loss, np.mean(losses), rtol=1e-12)


def test_epochs_draw_different_orders():
    key = jax.random.key(0)
    shuffle_key = jax.random.fold_in(key, ClientStream.SHUFFLE)
    mask = jnp.ones(50, bool)
    orders = [np.asarray(epoch_permutation(jax.random.fold_in(shuffle_key, e), mask))
              for e in range(3)]
    assert not np.array_equal(orders[0], orders[1])
    assert not np.array_equal(orders[1], orders[2])


def test_optimizer_state_is_frozen_on_inactive_steps():
    """Momentum must not decay during a short client's idle steps: with padding, same result."""
    xs, ys = make_clients([5])
    model = small_model()
    params = model.init(jax.random.key(0))
    results = []
    for padded_length in (5, 40):
        batch = stack_clients(xs, ys, padded_length=padded_length)
        results.append(local_train(model_loss(model.apply), optax.sgd(0.1, momentum=0.9), params,
                                   batch.x[0], batch.y[0], batch.mask[0], batch.rng[0],
                                   num_epochs=4, batch_size=2))
    assert_trees_equal(results[0], results[1])
