"""FedAMP invariants (ALGORITHMS.md section 8e): attention weights, cloud models, client step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common import (NUM_CLASSES, NUM_FEATURES, assert_trees_close, make_clients, small_model,
                    stack_clients)
from fedjax_lab.algorithms.fedamp import (FedAMPConfig, attention_weights, build, fedamp,
                                          heuristic_attention_weights, resolve_steps)
from fedjax_lab.core import local_train, model_loss, weighted_mean
from fedjax_lab.core.types import DataInfo
from fedjax_lab.options import OptionError, from_dict

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


def client_model(state, i):
    return jax.tree.map(lambda leaf: leaf[i], state.client_states.models)


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
        population = state.client_states.models
        xi = attention_weights(population, ALL, alpha_k=alpha_k, sigma=sigma)
        clouds = weighted_mean(population, xi)
        for row, i in enumerate(ids):
            w, u = (jax.tree.map(lambda leaf: leaf[i], tree) for tree in (population, clouds))
            grad = jax.grad(model_loss(model.apply))(w, xs[row], ys[row],
                                                     np.ones(len(ys[row]), bool), None)
            expected = jax.tree.map(lambda w_, g, u_: w_ - eta * (g + lam / alpha_k * (w_ - u_)),
                                    w, grad, u)
            assert_trees_close(client_model(new, i), expected)


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
            assert_trees_close(client_model(new, i),
                               train(client_model(state, i), xs[row], ys[row], batch.rng[row]))
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
        logits[1], model.apply(client_model(new, 3), jnp.asarray(np.pad(xs[1], ((0, 9), (0, 0))))),
        rtol=1e-6)


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


@pytest.mark.parametrize("num_clients", [2, 12, 60, 1000])
@pytest.mark.parametrize("sigma", [0.5, 1.0, 10.0])
def test_default_steps_pull_clients_with_a_coefficient_independent_of_the_population(
        num_clients, sigma):
    """The issue's finding: alpha_k = sigma / (N - 1) with a fixed lam made the pull
    lam (N - 1) / sigma grow with N. The defaults keep lam / alpha_k = 1 (and xi_ii >= 0)."""
    lam, alpha_k = resolve_steps(num_clients, sigma=sigma)
    assert lam / alpha_k == pytest.approx(1.0)
    assert alpha_k * (num_clients - 1) / sigma <= 1 + 1e-12
    heuristic = resolve_steps(num_clients, sigma=sigma, attention="heuristic")
    assert heuristic == resolve_steps(num_clients, sigma=1.0, attention="heuristic")
    assert heuristic[0] / heuristic[1] == pytest.approx(1.0)


def test_default_fedamp_stays_stable_with_sixty_clients():
    """At lam = sigma = 1, N = 60 and SGD 0.05 the old default pull (59) overshot the cloud
    model at every step and the training loss jumped several-fold; the defaults only descend."""
    xs, ys = make_clients([8] * 60)
    algorithm = fedamp(small_model(), optax.sgd(0.05), num_clients=60, sigma=1.0, batch_size=4)
    state, round_fn = algorithm.init(jax.random.key(0)), jax.jit(algorithm.round)
    losses = []
    for round_index in range(4):
        state = round_fn(state, stack_clients(xs, ys, round_index=round_index))
        losses.append(float(state.metrics["train_loss"]))
    assert all(np.isfinite(losses)) and max(losses) <= losses[0], losses


def test_the_heuristic_temperature_does_not_change_the_proximal_pull():
    """With xi_ii = 1 the cloud model is the client's own, so sigma may not change anything; it
    did when alpha_k (hence the pull lam / alpha_k) defaulted to sigma / (N - 1)."""
    xs, ys = make_clients(SIZES)
    batch = stack_clients(xs, ys, client_ids=[5, 0, 2, 3])
    rounds = []
    for sigma in (1.0, 50.0):
        algorithm = fedamp(small_model(), optax.sgd(0.1), num_clients=POPULATION, lam=0.5,
                           sigma=sigma, attention="heuristic", self_weight=1.0)
        state = algorithm.init(jax.random.key(0))
        moved = state._replace(client_states=jax.tree.map(lambda leaf: leaf + 0.3,
                                                          state.client_states))
        rounds.append(jax.jit(algorithm.round)(moved, batch).client_states)
    assert_trees_close(*rounds, rtol=0, atol=0)


def _info(num_clients):
    return DataInfo(num_clients, NUM_CLASSES, (NUM_FEATURES,), 16)


@pytest.mark.parametrize("options", [{}, {"attention": "heuristic", "sigma": 5.0}])
def test_the_registry_builder_runs_a_round(options):
    xs, ys = make_clients(SIZES)
    algorithm = build(from_dict(FedAMPConfig, options), small_model(), _info(POPULATION))
    state = algorithm.init(jax.random.key(0))
    new = jax.jit(algorithm.round)(state, stack_clients(xs, ys, client_ids=[5, 0, 2, 3]))
    assert int(new.metrics["participants"]) == 4 and np.isfinite(float(new.metrics["train_loss"]))
    expected_self_weight = 0.5 if options else 0.0
    assert float(new.metrics["self_weight"]) == pytest.approx(expected_self_weight, abs=1e-6)


def test_the_builder_refuses_a_pull_that_makes_local_sgd_diverge():
    config = from_dict(FedAMPConfig, {"lam": 1.0, "sigma": 1.0})
    with pytest.raises(OptionError, match=r"algorithm.lam=1.0 .*lam / alpha_k = 59 .*60 clients"):
        build(config, small_model(), _info(60))
    build(config, small_model(), _info(12))


def test_self_weight_belongs_to_the_heuristic_attention():
    with pytest.raises(OptionError, match="self_weight=0.3 .*heuristic"):
        from_dict(FedAMPConfig, {"self_weight": 0.3})
