"""Per-FedAvg invariants (ALGORITHMS.md section 11e): HF == MAML on quadratics, the exact
Hessian-vector product, alpha = 0 collapses the variants, three distinct batches per step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from common import assert_trees_close, assert_trees_equal, make_clients, stack_clients
from fedjax_lab.algorithms import REGISTRY
from fedjax_lab.algorithms.perfedavg import (PerFedAvgState, perfedavg, perfedavg_direction,
                                             three_batches)
from fedjax_lab.core import ClientExecution
from fedjax_lab.core.types import DataInfo
from fedjax_lab.core.meta import MetaStream, model_data_loss
from fedjax_lab.models import from_flax, mlp

SIZES = [31, 12, 40, 17]
ALPHA, BETA = 0.3, 0.2


def quadratic_loss(theta, data):
    matrix, vector = data
    return 0.5 * theta @ matrix @ theta - vector @ theta


def quadratic_batches(dim=4, seed=0):
    rng = np.random.default_rng(seed)
    spd = lambda: (lambda m: m @ m.T / dim + np.eye(dim))(rng.normal(size=(dim, dim)))
    batches = tuple((jnp.asarray(spd()), jnp.asarray(rng.normal(size=dim))) for _ in range(3))
    return jnp.asarray(rng.normal(size=dim)), batches


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("delta", [1e-3, 0.5, 7.0])
def test_hf_equals_maml_on_quadratics_for_any_delta(jit, delta):
    with jax.enable_x64(True):
        theta, batches = quadratic_batches()
        direction = lambda variant: perfedavg_direction(quadratic_loss, theta, batches,
                                                        alpha=ALPHA, variant=variant,
                                                        delta=delta)[0]
        if jit:
            direction = jax.jit(direction, static_argnums=0)
        (a_mat, a_vec), (b_mat, b_vec), (c_mat, _) = batches
        g = b_mat @ (theta - ALPHA * (a_mat @ theta - a_vec)) - b_vec
        expected = (jnp.eye(len(theta)) - ALPHA * c_mat) @ g
        np.testing.assert_allclose(direction("maml"), expected, rtol=1e-12, atol=1e-13)
        # Exact in exact arithmetic; in floating point the difference quotient keeps a rounding
        # error of about eps * |grad| / delta.
        np.testing.assert_allclose(direction("hf"), expected, rtol=1e-12,
                                   atol=max(1e-13, 1e-15 / delta))
        np.testing.assert_allclose(direction("fo"), g, rtol=1e-13, atol=1e-14)


class TanhMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(jnp.tanh(nn.Dense(6)(x)))


def test_exact_hessian_vector_product_on_a_smooth_mlp_and_hf_converges_as_delta_squared():
    with jax.enable_x64(True):
        model = from_flax(TanhMLP(), (5,), 3)
        params = jax.tree.map(lambda p: p.astype(jnp.float64), model.init(jax.random.key(0)))
        xs, ys = make_clients([8, 8, 8], seed=1, dtype=np.float64)
        batches = tuple((jnp.asarray(x), jnp.asarray(y), jnp.ones(8, bool))
                        for x, y in zip(xs, ys))
        loss_fn = model_data_loss(model.apply)
        flat, unravel = ravel_pytree(params)

        @jax.jit
        def directions(params):
            return [ravel_pytree(perfedavg_direction(loss_fn, params, batches, alpha=ALPHA,
                                                     variant=variant, delta=delta)[0])[0]
                    for variant, delta in (("maml", 0.0), ("fo", 0.0), ("hf", 1e-2),
                                           ("hf", 1e-3))]

        @jax.jit
        def explicit(flat):
            f = lambda theta, data: loss_fn(unravel(theta), data)
            adapted = flat - ALPHA * jax.grad(f)(flat, batches[0])
            g = jax.grad(f)(adapted, batches[1])
            return g - ALPHA * jax.hessian(f)(flat, batches[2]) @ g

        maml, fo, hf_coarse, hf_fine = directions(params)
        np.testing.assert_allclose(maml, explicit(flat), rtol=1e-12, atol=1e-14)
        assert np.linalg.norm(maml - fo) > 1e-4 * np.linalg.norm(maml)
        coarse, fine = np.linalg.norm(hf_coarse - maml), np.linalg.norm(hf_fine - maml)
        assert 0 < fine < coarse and 30 < coarse / fine < 300  # O(delta^2): about 100


def test_three_batches_are_distinct_draws_of_real_examples():
    mask = jnp.arange(40) < 31
    key = jax.random.key(3)
    draw = jax.jit(three_batches, static_argnums=2)
    indices = np.asarray(draw(key, mask, 10))
    assert indices.shape == (3, 10) and len(set(indices.ravel())) == 30
    assert indices.max() < 31
    assert not np.array_equal(indices, np.asarray(draw(jax.random.fold_in(key, 1), mask, 10)))
    small = np.asarray(draw(key, jnp.arange(40) < 7, 10))
    assert set(small.ravel()) == set(range(7))  # fewer than 3B examples: cycles, stays real


def test_alpha_zero_makes_the_variants_coincide_with_sgd_on_the_second_batch():
    with jax.enable_x64(True):
        model = mlp((5,), 3, hidden=(4,))
        xs, ys = make_clients(SIZES, dtype=np.float64)
        batch = stack_clients(xs, ys, padded_length=48)
        params = jax.tree.map(lambda p: p.astype(jnp.float64), model.init(jax.random.key(1)))
        rounds = {}
        for variant in ("fo", "hf", "maml"):
            algorithm = perfedavg(model, variant=variant, alpha=0.0, beta=BETA, num_local_steps=3,
                                  batch_size=5)
            state = algorithm.init(jax.random.key(0))._replace(params=params)
            rounds[variant] = jax.jit(algorithm.round)(state, batch)
        assert_trees_equal(rounds["hf"].params, rounds["fo"].params)
        assert_trees_equal(rounds["maml"].params, rounds["fo"].params)
        loss_fn = model_data_loss(model.apply)

        @jax.jit
        def sgd_on_second_batches(x, y, mask, rng):
            w = params
            for step in range(3):
                key = jax.random.fold_in(jax.random.fold_in(rng, MetaStream.BATCHES), step)
                second = three_batches(key, mask, 5)[1]
                grads = jax.grad(loss_fn)(w, (x[second], y[second], jnp.ones(5, bool)))
                w = jax.tree.map(lambda p, g: p - BETA * g, w, grads)
            return w

        clients = [sgd_on_second_batches(batch.x[i], batch.y[i], batch.mask[i], batch.rng[i])
                   for i in range(len(SIZES))]
        expected = jax.tree.map(lambda *w: sum(w) / len(w), *clients)
        assert_trees_close(rounds["fo"].params, expected, rtol=1e-12, atol=1e-13)


def test_maml_round_is_the_uniform_mean_of_clients_running_the_exact_direction():
    with jax.enable_x64(True):
        model = mlp((5,), 3, hidden=(4,))
        xs, ys = make_clients(SIZES + [0], dtype=np.float64)
        params = jax.tree.map(lambda p: p.astype(jnp.float64), model.init(jax.random.key(2)))
        algorithm = perfedavg(model, variant="maml", alpha=ALPHA, beta=BETA, num_local_steps=2,
                              batch_size=4)
        state = algorithm.init(jax.random.key(0))._replace(params=params)
        batch = stack_clients(xs, ys)
        new = jax.jit(algorithm.round)(state, batch)
        assert isinstance(new, PerFedAvgState) and int(new.metrics["participants"]) == len(SIZES)
        loss_fn = model_data_loss(model.apply)

        @jax.jit
        def client(x, y, mask, rng):
            w = params
            for step in range(2):
                key = jax.random.fold_in(jax.random.fold_in(rng, MetaStream.BATCHES), step)
                batches = tuple((x[i], y[i], jnp.ones(4, bool))
                                for i in three_batches(key, mask, 4))
                direction = perfedavg_direction(loss_fn, w, batches, alpha=ALPHA,
                                                variant="maml")[0]
                w = jax.tree.map(lambda p, d: p - BETA * d, w, direction)
            return w

        clients = [client(batch.x[i], batch.y[i], batch.mask[i], batch.rng[i])
                   for i in range(len(SIZES))]
        assert_trees_close(new.params, jax.tree.map(lambda *w: sum(w) / len(w), *clients))
        chunked = perfedavg(model, variant="maml", alpha=ALPHA, beta=BETA, num_local_steps=2,
                            batch_size=4, execution=ClientExecution("chunked", 2))
        assert_trees_close(jax.jit(chunked.round)(state, batch).params, new.params)


def test_personalisation_is_one_step_of_alpha_on_the_support_data_and_predict_never_steps():
    model = mlp((5,), 3, hidden=(4,))
    xs, ys = make_clients([9, 6])
    batch = stack_clients(xs, ys)
    algorithm = perfedavg(model, alpha=ALPHA)
    state = algorithm.init(jax.random.key(0))
    logits = jax.jit(algorithm.adapted_predict)(state, batch, batch)
    loss_fn = model_data_loss(model.apply)

    @jax.jit
    def one_step_logits(x, y, mask):
        grads = jax.grad(loss_fn)(state.params, (x, y, mask))
        return model.apply(jax.tree.map(lambda w, g: w - ALPHA * g, state.params, grads), x)

    for i in range(2):
        np.testing.assert_allclose(logits[i], one_step_logits(batch.x[i], batch.y[i],
                                                              batch.mask[i]), rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_allclose(algorithm.predict(state, batch)[i],
                                   model.apply(state.params, batch.x[i]), rtol=1e-6)
    assert algorithm.predict_global is None


@pytest.mark.parametrize("options, message", [
    (dict(variant="sgd"), "variant 'sgd' is unknown; allowed: fo, hf, maml"),
    (dict(alpha=-0.1), "alpha=-0.1 is invalid; expected a number >= 0"),
    (dict(delta=0.0), "delta=0.0 is invalid for the hf variant"),
    (dict(num_local_steps=0), "num_local_steps=0 is invalid; expected a positive integer"),
    (dict(batch_size=2.5), "batch_size=2.5 is invalid"),
])
def test_bad_hyperparameters_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        perfedavg(mlp((5,), 3), **options)


def test_registered_defaults_build_and_run_two_rounds():
    spec = REGISTRY["perfedavg"]
    model = mlp((5,), 3, hidden=(4,))
    xs, ys = make_clients(SIZES)
    batch = stack_clients(xs, ys)
    algorithm = spec.build(spec.config(), model, DataInfo(len(SIZES), 3, (5,), max(SIZES)),
                           ClientExecution())
    round_fn = jax.jit(algorithm.round)
    state = round_fn(round_fn(algorithm.init(jax.random.key(0)), batch), batch)
    assert isinstance(state, PerFedAvgState) and int(state.round) == 2
    assert np.isfinite(float(state.metrics["train_loss"]))
    assert int(state.metrics["participants"]) == len(SIZES)
