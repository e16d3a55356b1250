"""FedAMP invariants (ALGORITHMS.md section 8e): attention weights, cloud models, client step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common import (NUM_CLASSES, NUM_FEATURES, assert_trees_close, make_clients, small_model,
                    stack_clients)
from fedjax_lab.algorithms.fedamp import (attention_weights, fedamp,
                                          heuristic_attention_weights)
from fedjax_lab.core import local_train, model_loss, weighted_mean

POPULATION = 6
SIZES = [9, 4, 13, 6]


def random_models(num_clients=POPULATION, scale=0.5, seed=0, dtype=jnp.float64):
    """A stacked population of small two-leaf models."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"kernel": scale * jax.random.normal(k1, (num_clients, 3, 2), dtype),
            "bias": scale * jax.random.normal(k2, (num_clients, 2), dtype)}


def flat(models):
    return np.concatenate([np.asarray(models["bias"]),
                           np.asarray(models["kernel"]).reshape(len(models["bias"]), -1)], 1)


ALL = jnp.arange(POPULATION)


def test_exponential_attention_matches_the_formula_rows_sum_to_one_self_weight_non_negative():
    with jax.enable_x64(True):
        models = random_models()
        sigma = 0.8
        alpha_k = sigma / (POPULATION - 1)  # the largest step the condition allows
        xi = np.asarray(attention_weights(models, ALL, alpha_k=alpha_k, sigma=sigma))
        w = flat(models)
        distances = ((w[:, None] - w[None]) ** 2).sum(-1)
        expected = alpha_k * np.exp(-distances / sigma) / sigma
        np.fill_diagonal(expected, 0)
        np.fill_diagonal(expected, 1 - expected.sum(1))
        np.testing.assert_allclose(xi, expected, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(xi.sum(1), 1, rtol=1e-14)
        assert np.all(np.diag(xi) >= 0)
        # Identical models put every other weight at its maximum alpha_k / sigma, the worst
        # case of the condition: the self-weight is then exactly 0, never negative.
        same = jax.tree.map(lambda leaf: jnp.repeat(leaf[:1], POPULATION, 0), models)
        worst = np.asarray(attention_weights(same, ALL, alpha_k=alpha_k, sigma=sigma))
        np.testing.assert_allclose(np.diag(worst), 0, atol=1e-14)


def test_heuristic_attention_has_the_fixed_self_weight_and_a_cosine_softmax():
    with jax.enable_x64(True):
        models = random_models()
        xi = np.asarray(heuristic_attention_weights(models, ALL, self_weight=0.3, sigma=2.0))
        w = flat(models)
        cosine = (w @ w.T) / np.outer(np.linalg.norm(w, axis=1), np.linalg.norm(w, axis=1))
        for i in range(POPULATION):
            others = np.arange(POPULATION) != i
            spread = np.exp(2.0 * cosine[i, others])
            np.testing.assert_allclose(xi[i, others], 0.7 * spread / spread.sum(), rtol=1e-12)
        np.testing.assert_allclose(np.diag(xi), 0.3)
        np.testing.assert_allclose(xi.sum(1), 1, rtol=1e-14)


def test_infinite_sigma_gives_each_client_its_own_model():
    with jax.enable_x64(True):
        models = random_models()
        xi = attention_weights(models, ALL, alpha_k=1.0, sigma=1e12)
        assert float(jnp.max(jnp.abs(xi - jnp.eye(POPULATION)))) < 1e-11
        assert_trees_close(weighted_mean(models, xi), models, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("sigma", [0.01, 1.0, 100.0])
def test_identical_models_give_that_model_as_every_cloud_model(sigma):
    with jax.enable_x64(True):
        one = random_models(1)
        same = jax.tree.map(lambda leaf: jnp.repeat(leaf, POPULATION, 0), one)
        for xi in (attention_weights(same, ALL, alpha_k=sigma / (POPULATION - 1), sigma=sigma),
                   heuristic_attention_weights(same, ALL, self_weight=0.4, sigma=sigma)):
            assert_trees_close(weighted_mean(same, xi), same, rtol=1e-12, atol=1e-13)


def test_moving_a_model_closer_increases_its_weight_and_permuting_clients_permutes_clouds():
    with jax.enable_x64(True):
        models = random_models()
        xi = attention_weights(models, ALL, alpha_k=0.1, sigma=1.0)
        closer = jax.tree.map(lambda leaf: leaf.at[3].set(0.5 * leaf[3] + 0.5 * leaf[0]), models)
        assert float(attention_weights(closer, ALL, alpha_k=0.1, sigma=1.0)[0, 3]) > \
            float(xi[0, 3])
        order = jnp.array([4, 0, 5, 2, 1, 3])
        permuted = jax.tree.map(lambda leaf: leaf[order], models)
        clouds = weighted_mean(models, xi)
        permuted_clouds = weighted_mean(permuted, attention_weights(permuted, ALL, alpha_k=0.1,
                                                                    sigma=1.0))
        assert_trees_close(permuted_clouds, jax.tree.map(lambda leaf: leaf[order], clouds))


def float64_population(algorithm, seed=1):
    """Float64 client models, different for every client."""
    state = algorithm.init(jax.random.key(0))
    leaves, treedef = jax.tree.flatten(state.client_states)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    moved = [leaf.astype(jnp.float64) + 0.3 * jax.random.normal(k, leaf.shape, jnp.float64)
             for leaf, k in zip(leaves, keys)]
    return state._replace(client_states=jax.tree.unflatten(treedef, moved))


def test_one_client_step_is_a_gradient_step_on_the_squared_proximal_objective():
    """w_i <- w_i - eta (grad F_i(w_i) + (lam / alpha_k)(w_i - u_i)) from the client's own model,
    with u_i built from ALL clients' latest models; jitted and unjitted rounds agree."""
    with jax.enable_x64(True):
        xs, ys = make_clients(SIZES, dtype=np.float64)
        model = small_model()
        eta, lam, sigma, alpha_k = 0.2, 0.5, 3.0, 0.25
        algorithm = fedamp(model, optax.sgd(eta), num_clients=POPULATION, lam=lam, sigma=sigma,
                           alpha_k=alpha_k, batch_size=None)
        state = float64_population(algorithm)
        ids = [5, 0, 2, 3]
        batch = stack_clients(xs, ys, padded_length=16, client_ids=ids)
        new = jax.jit(algorithm.round)(state, batch)
        assert_trees_close(algorithm.round(state, batch), new)
        xi = attention_weights(state.client_states, ALL, alpha_k=alpha_k, sigma=sigma)
        clouds = weighted_mean(state.client_states, xi)
        for row, i in enumerate(ids):
            w, u = (jax.tree.map(lambda leaf: leaf[i], tree) for tree in (state.client_states,
                                                                          clouds))
            grad = jax.grad(model_loss(model.apply))(w, xs[row], ys[row],
                                                     np.ones(len(ys[row]), bool), None)
            expected = jax.tree.map(lambda w_, g, u_: w_ - eta * (g + lam / alpha_k * (w_ - u_)),
                                    w, grad, u)
            assert_trees_close(jax.tree.map(lambda leaf: leaf[i], new.client_states), expected)


def test_lambda_zero_is_local_training_and_unsampled_clients_never_change():
    with jax.enable_x64(True):
        xs, ys = make_clients([9, 4, 13, 0], dtype=np.float64)
        model = small_model()
        algorithm = fedamp(model, optax.sgd(0.1), num_clients=POPULATION, lam=0.0, num_epochs=2,
                           batch_size=3)
        state = float64_population(algorithm)
        # Client 4 sits in a padded slot (no examples).
        ids = [1, 3, 0, 4]
        batch = stack_clients(xs, ys, client_ids=ids)
        new = jax.jit(algorithm.round)(state, batch)
        train = jax.jit(lambda params, x, y, rng: local_train(
            model_loss(model.apply), optax.sgd(0.1), params, x, y, jnp.ones(len(y), bool), rng,
            num_epochs=2, batch_size=3).params)
        for row, i in enumerate(ids[:3]):
            start = jax.tree.map(lambda leaf: leaf[i], state.client_states)
            assert_trees_close(jax.tree.map(lambda leaf: leaf[i], new.client_states),
                               train(start, xs[row], ys[row], batch.rng[row]))
        untouched = [2, 4, 5]
        for old, updated in zip(jax.tree.leaves(state.client_states),
                                jax.tree.leaves(new.client_states)):
            np.testing.assert_array_equal(np.asarray(updated)[untouched],
                                          np.asarray(old)[untouched])


def test_metrics_count_cloud_downloads_and_model_uploads():
    xs, ys = make_clients([9, 4, 13, 0])
    algorithm = fedamp(small_model(), optax.sgd(0.1), num_clients=POPULATION, sigma=2.0)
    state = algorithm.init(jax.random.key(0))
    new = jax.jit(algorithm.round)(state, stack_clients(xs, ys, client_ids=[1, 3, 0, 4]))
    assert jax.tree.structure(new.metrics) == jax.tree.structure(state.metrics)
    assert all(a.dtype == b.dtype for a, b in zip(jax.tree.leaves(new.metrics),
                                                  jax.tree.leaves(state.metrics)))
    model_bytes = (NUM_FEATURES * NUM_CLASSES + NUM_CLASSES) * 4
    assert float(new.metrics["bytes_down"]) == 4 * model_bytes
    assert float(new.metrics["bytes_up"]) == 3 * model_bytes
    assert int(new.metrics["participants"]) == 3
    # All models start equal, so every other weight is alpha_k / sigma = 1 / (N - 1).
    assert float(new.metrics["self_weight"]) == pytest.approx(0.0, abs=1e-6)
    logits = algorithm.predict(new, stack_clients(xs, ys, client_ids=[1, 3, 0, 4]))
    model = small_model()
    np.testing.assert_allclose(
        logits[1], model.apply(jax.tree.map(lambda leaf: leaf[3], new.client_states),
                               jnp.asarray(np.pad(xs[1], ((0, 9), (0, 0))))), rtol=1e-6)


@pytest.mark.parametrize("options, message", [
    (dict(alpha_k=0.5, sigma=1.0),
     r"alpha_k=0.5 can make the self-weight xi_ii = 1 - sum_j xi_ij negative; expected "
     r"alpha_k <= sigma / \(num_clients - 1\) = 0.2"),
    (dict(alpha_k=0.0), "alpha_k=0.0 is invalid; expected alpha_k > 0"),
    (dict(sigma=0.0), "sigma=0.0 is invalid"),
    (dict(lam=-1.0), "lam=-1.0 is invalid; expected lam >= 0"),
    (dict(attention="cosine"), "attention 'cosine' is unknown; allowed: exponential, heuristic"),
    (dict(attention="heuristic"), "self_weight=None is invalid"),
    (dict(attention="heuristic", self_weight=1.5), "self_weight=1.5 is invalid"),
    (dict(self_weight=0.5), "self_weight is only for attention='heuristic'"),
    (dict(num_clients=0), "num_clients=0 is invalid"),
])
def test_bad_hyperparameters_are_named(options, message):
    options = {"num_clients": POPULATION, **options}
    with pytest.raises(ValueError, match=message):
        fedamp(small_model(), optax.sgd(0.1), **options)


def test_heuristic_attention_tolerates_a_large_step():
    """Its self-weight is fixed, so alpha_k only scales the proximal term."""
    fedamp(small_model(), optax.sgd(0.1), num_clients=POPULATION, alpha_k=5.0,
           attention="heuristic", self_weight=0.5)
