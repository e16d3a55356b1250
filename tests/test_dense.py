"""`models.Dense`: `nn.Dense`'s parameters, and its gradients by a faster route for small
minibatches (the sum of outer products), exact in float64, bit for bit the dot above."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from fedjax_lab.models import Dense, logistic_regression
from fedjax_lab.models.dense import OUTER_PRODUCT_ROWS


@pytest.mark.parametrize("fields", [{}, {"use_bias": False},
                                    {"kernel_init": nn.initializers.glorot_uniform(),
                                     "bias_init": nn.initializers.normal(1.0)}])
def test_parameters_and_outputs_equal_flax_dense(fields):
    x = jax.random.normal(jax.random.key(1), (5, 7))
    ours, theirs = Dense(3, **fields), nn.Dense(3, **fields)
    params = ours.init(jax.random.key(0), x)
    chex.assert_trees_all_equal(params, theirs.init(jax.random.key(0), x))
    chex.assert_trees_all_equal(ours.apply(params, x), theirs.apply(params, x))


def _gradients(module, params, x):
    loss = lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))
    # Vmapped over clients with their own parameters, as local training runs it.
    return jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1))))(params, x)


@pytest.mark.parametrize("rows", [(1,), (10,), (3, 5), (OUTER_PRODUCT_ROWS,),
                                  (OUTER_PRODUCT_ROWS + 1,), (4, 9)])
def test_gradients_equal_flax_dense_in_float64_and_bit_for_bit_above_the_outer_products(rows):
    with jax.enable_x64(True):
        clients = 3
        x = jax.random.normal(jax.random.key(1), (clients,) + rows + (6,), jnp.float64)
        params = jax.vmap(lambda key: Dense(4).init(key, x[0]))(
            jax.random.split(jax.random.key(0), clients))
        params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
        ours, theirs = _gradients(Dense(4), params, x), _gradients(nn.Dense(4), params, x)
        if len(rows) == 1 and rows[0] <= OUTER_PRODUCT_ROWS or rows == (3, 5):
            chex.assert_trees_all_close(ours, theirs, rtol=1e-12, atol=1e-12)
            assert rows == (1,) or not jnp.array_equal(ours[0]["params"]["kernel"],
                                                       theirs[0]["params"]["kernel"])
        else:
            chex.assert_trees_all_equal(ours, theirs)


class FlaxLogisticRegression(nn.Module):
    """The logistic regression as it was written on `nn.Dense`."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def test_logistic_regression_keeps_its_flax_dense_parameters():
    model = logistic_regression((60,), 10)
    reference = FlaxLogisticRegression().init(jax.random.key(0), jnp.zeros((1, 60)))["params"]
    chex.assert_trees_all_equal(model.init(jax.random.key(0)), reference)
