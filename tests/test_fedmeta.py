"""FedMeta invariants (ALGORITHMS.md section 10e): closed forms, finite differences, variants."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from common import assert_trees_close, make_clients, stack_clients
from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.algorithms import REGISTRY
from fedjax_lab.algorithms.fedmeta import FedMetaState, fedavg_meta, fedmeta
from fedjax_lab.core import ClientExecution
from fedjax_lab.core.types import DataInfo
from fedjax_lab.core.meta import (inner_adapt, meta_gradient, model_data_loss, split_clients,
                                  split_support_query, support_sizes)
from fedjax_lab.data import ClientData
from fedjax_lab.evaluation import make_adapted_evaluator
from fedjax_lab.models import mlp

SIZES = [9, 4, 13, 6]
ALPHA = 0.3


def quadratic_loss(theta, data):
    matrix, vector = data
    return 0.5 * theta @ matrix @ theta - vector @ theta


def quadratic_problem(dim=4, seed=0):
    """theta, (A, a) and (C, c) with symmetric positive definite A and C, in float64."""
    rng = np.random.default_rng(seed)
    spd = lambda: (lambda m: m @ m.T / dim + np.eye(dim))(rng.normal(size=(dim, dim)))
    pair = lambda: (jnp.asarray(spd()), jnp.asarray(rng.normal(size=dim)))
    return jnp.asarray(rng.normal(size=dim)), pair(), pair()


def small_mlp():
    return mlp((5,), 3, hidden=(4,))


def mlp_problem(seed=0):
    """float64 MLP parameters with a support and a query set (call inside enable_x64)."""
    model = small_mlp()
    params = jax.tree.map(lambda p: p.astype(jnp.float64), model.init(jax.random.key(seed)))
    xs, ys = make_clients([6, 8], seed=seed, dtype=np.float64)
    sets = [(jnp.asarray(x), jnp.asarray(y), jnp.ones(len(y), bool)) for x, y in zip(xs, ys)]
    return model, params, sets[0], sets[1]


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("remat", [False, True])
def test_maml_gradient_on_quadratics_equals_the_closed_form(jit, remat):
    with jax.enable_x64(True):
        theta, (a_mat, a_vec), (c_mat, c_vec) = quadratic_problem()
        fn = lambda t: meta_gradient(quadratic_loss, t, ALPHA, (a_mat, a_vec), (c_mat, c_vec),
                                     num_steps=1, remat=remat)[1]
        grad = (jax.jit(fn) if jit else fn)(theta)
        eye = jnp.eye(len(theta))
        adapted = theta - ALPHA * (a_mat @ theta - a_vec)
        expected = (eye - ALPHA * a_mat) @ (c_mat @ adapted - c_vec)
        np.testing.assert_allclose(grad, expected, rtol=1e-13, atol=1e-14)


def test_several_inner_steps_on_quadratics_chain_the_factors():
    with jax.enable_x64(True):
        theta, (a_mat, a_vec), (c_mat, c_vec) = quadratic_problem(seed=1)
        steps = 4
        grad = meta_gradient(quadratic_loss, theta, ALPHA, (a_mat, a_vec), (c_mat, c_vec),
                             num_steps=steps)[1]
        factor = jnp.eye(len(theta)) - ALPHA * a_mat
        adapted = theta
        for _ in range(steps):
            adapted = adapted - ALPHA * (a_mat @ adapted - a_vec)
        expected = jnp.linalg.matrix_power(factor, steps) @ (c_mat @ adapted - c_vec)
        np.testing.assert_allclose(grad, expected, rtol=1e-12, atol=1e-13)
        fomaml = meta_gradient(quadratic_loss, theta, ALPHA, (a_mat, a_vec), (c_mat, c_vec),
                               num_steps=steps, first_order=True)[1]
        np.testing.assert_allclose(fomaml, c_mat @ adapted - c_vec, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("num_steps", [1, 3])
def test_mlp_meta_gradient_matches_a_central_finite_difference(num_steps):
    with jax.enable_x64(True):
        model, params, support, query = mlp_problem()
        loss_fn = model_data_loss(model.apply)
        flat, unravel = ravel_pytree(params)

        def meta_objective(flat_theta):
            adapted = inner_adapt(loss_fn, unravel(flat_theta), ALPHA, support, num_steps=num_steps)
            return loss_fn(adapted, query)

        eps = 1e-5
        basis = jnp.eye(flat.size)
        numeric = jax.jit(jax.vmap(lambda e: (meta_objective(flat + eps * e)
                                              - meta_objective(flat - eps * e)) / (2 * eps)))(basis)
        value, grad = jax.jit(lambda p: meta_gradient(loss_fn, p, ALPHA, support, query,
                                                      num_steps=num_steps))(params)
        np.testing.assert_allclose(ravel_pytree(grad)[0], numeric, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(value, meta_objective(flat), rtol=1e-14)


def test_fomaml_is_the_stop_gradient_version_and_differs_from_maml():
    with jax.enable_x64(True):
        model, params, support, query = mlp_problem(seed=2)
        loss_fn = model_data_loss(model.apply)
        maml, fomaml = jax.jit(lambda p: [meta_gradient(
            loss_fn, p, ALPHA, support, query, num_steps=2, first_order=first_order)[1]
            for first_order in (False, True)])(params)

        @jax.jit
        def stop_gradient_version(adapted):
            for _ in range(2):
                grads = jax.lax.stop_gradient(jax.grad(loss_fn)(adapted, support))
                adapted = jax.tree.map(lambda p, g: p - ALPHA * g, adapted, grads)
            return jax.grad(lambda p: loss_fn(p, query))(adapted)

        assert_trees_close(fomaml, stop_gradient_version(params), rtol=1e-12, atol=1e-14)
        difference = ravel_pytree(maml)[0] - ravel_pytree(fomaml)[0]
        assert float(jnp.linalg.norm(difference)) > 1e-3 * float(jnp.linalg.norm(
            ravel_pytree(maml)[0]))


def test_meta_sgd_with_constant_rates_gives_maml_and_the_closed_form_rate_gradient():
    with jax.enable_x64(True):
        model, params, support, query = mlp_problem(seed=3)
        loss_fn = model_data_loss(model.apply)
        rates = jax.tree.map(lambda p: jnp.full_like(p, ALPHA), params)

        @jax.jit
        def gradients(params):
            meta_sgd = meta_gradient(loss_fn, params, rates, support, query, num_steps=1,
                                     learn_inner_lrs=True)[1]
            return meta_sgd, meta_gradient(loss_fn, params, ALPHA, support, query, num_steps=1)[1]

        @jax.jit
        def closed_form_rate_gradient(params):
            support_grad = jax.grad(loss_fn)(params, support)
            adapted = jax.tree.map(lambda p, g: p - ALPHA * g, params, support_grad)
            return jax.tree.map(lambda gs, gq: -gs * gq, support_grad,
                                jax.grad(loss_fn)(adapted, query))

        (theta_grad, rate_grad), maml = gradients(params)
        assert_trees_close(theta_grad, maml, rtol=1e-12, atol=1e-15)
        expected = closed_form_rate_gradient(params)
        assert_trees_close(rate_grad, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("first_order", [False, True])
def test_rematerialised_and_plain_meta_gradients_are_equal(first_order):
    with jax.enable_x64(True):
        model, params, support, query = mlp_problem(seed=4)
        loss_fn = model_data_loss(model.apply)
        options = dict(num_steps=5, first_order=first_order)
        plain = jax.jit(lambda p: meta_gradient(loss_fn, p, ALPHA, support, query, **options))
        remat = jax.jit(lambda p: meta_gradient(loss_fn, p, ALPHA, support, query, remat=True,
                                                **options))
        assert_trees_close(remat(params), plain(params), rtol=1e-13, atol=1e-15)


def test_support_and_query_are_disjoint_cover_the_client_and_ignore_padding():
    key = jax.random.key(7)
    split_fn = jax.jit(split_support_query, static_argnums=2)
    for n in (0, 1, 2, 5, 12):
        mask = jnp.arange(16) < n
        split = split_fn(key, mask, 0.2)
        support = np.asarray(split.support_indices)[np.asarray(split.support_mask)]
        query = np.asarray(split.query_indices)[np.asarray(split.query_mask)]
        assert len(support) == support_sizes(16, 0.2)[n] == int(split.num_support)
        assert not set(support) & set(query)
        assert sorted(np.concatenate([support, query]).tolist()) == list(range(n))
        if n == 5:
            tight = split_fn(key, jnp.ones(n, bool), 0.2)
            np.testing.assert_array_equal(
                np.asarray(tight.support_indices)[np.asarray(tight.support_mask)], support)
            np.testing.assert_array_equal(
                np.asarray(tight.query_indices)[np.asarray(tight.query_mask)], query)
    assert [int(s) for s in support_sizes(10, 0.2)] == [0, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2]
    other = split_fn(jax.random.key(8), jnp.arange(16) < 12, 0.5)
    assert not np.array_equal(other.support_indices,
                              split_fn(key, jnp.arange(16) < 12, 0.5).support_indices)


def one_client_state(algorithm, params):
    state = algorithm.init(jax.random.key(0))
    return state._replace(params=params, opt_state=optax.sgd(1.0).init(params))


def test_round_steps_on_the_mean_meta_gradient_of_each_clients_split():
    with jax.enable_x64(True):
        model = small_mlp()
        xs, ys = make_clients(SIZES, dtype=np.float64)
        batch = stack_clients(xs, ys, padded_length=16)
        params = jax.tree.map(lambda p: p.astype(jnp.float64), model.init(jax.random.key(1)))
        algorithm = fedmeta(model, optax.sgd(1.0), inner_lr=ALPHA, num_inner_steps=2,
                            support_fraction=0.4)
        new = jax.jit(algorithm.round)(one_client_state(algorithm, params), batch)
        loss_fn = model_data_loss(model.apply)

        @jax.jit
        def client_meta_gradient(x, y, mask, rng):
            split = split_support_query(rng, mask, 0.4)
            return meta_gradient(loss_fn, params, ALPHA, split.support(x, y), split.query(x, y),
                                 num_steps=2)[1]

        grads = [client_meta_gradient(batch.x[i], batch.y[i], batch.mask[i], batch.rng[i])
                 for i in range(len(SIZES))]
        mean = jax.tree.map(lambda *g: sum(g) / len(g), *grads)
        assert_trees_close(new.params, jax.tree.map(jnp.subtract, params, mean))
        assert int(new.metrics["participants"]) == len(SIZES) and int(new.round) == 1


def test_chunked_remat_padded_rounds_equal_the_plain_vmapped_round():
    with jax.enable_x64(True):
        model = small_mlp()
        xs, ys = make_clients(SIZES + [1], dtype=np.float64)
        params = jax.tree.map(lambda p: p.astype(jnp.float64), model.init(jax.random.key(2)))
        make = lambda **kw: fedmeta(model, optax.adam(0.01), variant="meta_sgd", inner_lr=ALPHA,
                                    num_inner_steps=2, **kw)
        plain = make()
        rates = jax.tree.map(lambda p: jnp.full_like(p, ALPHA), params)
        state = plain.init(jax.random.key(0))._replace(
            params=params, inner_lrs=rates, opt_state=optax.adam(0.01).init((params, rates)))
        expected = jax.jit(plain.round)(state, stack_clients(xs, ys))
        assert int(expected.metrics["participants"]) == len(SIZES)  # one example: no query
        other = make(remat=True, execution=ClientExecution("chunked", 2))
        got = jax.jit(other.round)(state, stack_clients(xs, ys, padded_length=20))
        assert_trees_close(got, expected)
        assert not np.allclose(ravel_pytree(got.inner_lrs)[0], ALPHA)


def test_rounds_scan_adapted_predictions_adapt_first_and_predict_never_adapts():
    model = small_mlp()
    xs, ys = make_clients(SIZES)
    batch = stack_clients(xs, ys)
    algorithm = fedmeta(model, optax.adam(0.01), variant="meta_sgd", num_inner_steps=2)
    state = algorithm.init(jax.random.key(0))
    assert isinstance(state, FedMetaState)
    def one_round(current, _):
        current = algorithm.round(current, batch)
        return current, current.metrics

    final, metrics = jax.jit(lambda s: jax.lax.scan(one_round, s, None, length=3))(state)
    assert int(final.round) == 3 and metrics["train_loss"].shape == (3,)
    logits = jax.jit(algorithm.adapted_predict)(final, batch, batch)

    @jax.jit
    def expected_logits(x, y, mask):
        adapted = inner_adapt(model_data_loss(model.apply), final.params, final.inner_lrs,
                              (x, y, mask), num_steps=2)
        return model.apply(adapted, x)

    for i in range(len(SIZES)):
        np.testing.assert_allclose(logits[i], expected_logits(batch.x[i], batch.y[i],
                                                              batch.mask[i]), rtol=1e-5, atol=1e-6)
    # predict is the meta-model theta as it is, whatever the batch's labels say.
    np.testing.assert_array_equal(algorithm.predict(final, batch),
                                  fedavg(model, optax.sgd(0.1)).predict(final, batch))
    assert algorithm.predict_global is None
    frozen = fedavg_meta(model, optax.sgd(0.1), inner_lr=0.0)
    fedavg_state = frozen.init(jax.random.key(0))
    np.testing.assert_allclose(jax.jit(frozen.adapted_predict)(fedavg_state, batch, batch),
                               fedavg(model, optax.sgd(0.1)).predict(fedavg_state, batch),
                               rtol=1e-6, atol=1e-6)


def test_unseen_clients_are_a_seeded_disjoint_split_and_evaluation_scores_queries_only():
    train_ids, test_ids = split_clients(10, 0.2, seed=3)
    assert len(test_ids) == 2 and not set(train_ids) & set(test_ids)
    assert sorted(np.concatenate([train_ids, test_ids]).tolist()) == list(range(10))
    np.testing.assert_array_equal(split_clients(10, 0.2, seed=3)[1], test_ids)
    xs, ys = make_clients([8, 5, 7])
    support = ClientData(tuple(x[:3] for x in xs), tuple(y[:3] for y in ys), ("a", "b", "c"))
    query = ClientData(tuple(x[3:] for x in xs), tuple(y[3:] for y in ys), ("a", "b", "c"))
    model = small_mlp()
    meta = fedmeta(model, optax.adam(0.01))
    result = make_adapted_evaluator(meta, chunk_size=2)(
        meta.init(jax.random.key(0)), support.pad(), query.pad(), jax.random.key(0))
    assert result["num_examples"] == 5 + 2 + 4 and result["num_clients"] == 3
    plain = fedavg(model, optax.sgd(0.1))
    baseline = make_adapted_evaluator(plain)(plain.init(jax.random.key(0)), support.pad(),
                                             query.pad(), jax.random.key(0))
    assert baseline["num_examples"] == 11


@pytest.mark.parametrize("options, message", [
    (dict(variant="reptile"), "variant 'reptile' is unknown; allowed: maml, fomaml, meta_sgd"),
    (dict(inner_lr=-1.0), "inner_lr=-1.0 is invalid"),
    (dict(num_inner_steps=0), "num_inner_steps=0 is invalid; expected a positive integer"),
    (dict(support_fraction=1.0), r"support_fraction=1.0 is invalid; expected a number in \(0, 1\)"),
    (dict(weighting="size"), "weighting 'size' is unknown"),
])
def test_bad_hyperparameters_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        fedmeta(small_mlp(), optax.adam(0.01), **options)
    with pytest.raises(ValueError, match="test_fraction=0 is invalid"):
        split_clients(10, 0, seed=0)


def test_rounds_report_the_model_down_and_the_same_size_up():
    from common import small_model
    from fedjax_lab.algorithms.perfedavg import perfedavg
    from fedjax_lab.core.communication import tree_bytes

    xs, ys = make_clients([12, 9, 15])
    batch = stack_clients(xs, ys)
    model = small_model()
    for algorithm in (fedmeta(model, optax.sgd(0.1), inner_lr=0.1),
                      perfedavg(model, alpha=0.01, beta=0.01, batch_size=2)):
        state = algorithm.init(jax.random.key(0))
        metrics = jax.jit(algorithm.round)(state, batch).metrics
        size = tree_bytes(state.params)
        assert float(metrics["bytes_down"]) == float(metrics["bytes_up"]) == 3 * size


@pytest.mark.parametrize("name, options", [("fedmeta", {"variant": "meta_sgd"}),
                                           ("fedavg_meta", {})])
def test_registered_defaults_build_and_run_two_rounds(name, options):
    spec = REGISTRY[name]
    config = dataclasses.replace(spec.config(), **options)
    xs, ys = make_clients(SIZES)
    batch = stack_clients(xs, ys)
    algorithm = spec.build(config, small_mlp(), DataInfo(len(SIZES), 3, (5,), max(SIZES)),
                           ClientExecution())
    round_fn = jax.jit(algorithm.round)
    state = round_fn(round_fn(algorithm.init(jax.random.key(0)), batch), batch)
    logits = jax.jit(algorithm.adapted_predict)(state, batch, batch)
    assert int(state.round) == 2 and np.isfinite(float(state.metrics["train_loss"]))
    assert int(state.metrics["participants"]) == len(SIZES)
    assert logits.shape == batch.y.shape + (3,)
