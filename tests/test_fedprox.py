"""FedProx invariants (ALGORITHMS.md §2e): mu = 0 is FedAvg, the prox term, the straggler rules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common import assert_trees_equal, make_clients, small_model, stack_clients
from fedjax_lab.algorithms import fedavg, fedprox, proximal_term
from fedjax_lab.core import local_train, model_loss, sample_stragglers
from fedjax_lab.data import fedprox_synthetic
from fedjax_lab.experiment import run_experiment
from fedjax_lab.models import logistic_regression


def test_mu_zero_without_stragglers_is_fedavg_bit_for_bit():
    dataset = fedprox_synthetic(1, 1, num_clients=8, max_examples=60, seed=3)
    model = logistic_regression(dataset.feature_shape, dataset.num_classes)
    options = dict(num_epochs=2, batch_size=10)
    runs = [run_experiment(algorithm, dataset, num_rounds=6, cohort_size=4, seed=11,
                           eval_every=3, progress=False)
            for algorithm in (fedavg(model, optax.sgd(0.05), **options),
                              fedprox(model, optax.sgd(0.05), mu=0.0, **options))]
    assert_trees_equal(runs[0].state.params, runs[1].state.params)
    assert runs[0].history == runs[1].history
    assert runs[0].evaluations == runs[1].evaluations


def test_proximal_term_is_squared_and_its_gradient_is_mu_times_the_distance():
    anchor = {"w": jnp.array([1.0, -2.0]), "b": jnp.array(0.5)}
    params = {"w": jnp.array([3.0, 2.0]), "b": jnp.array(-0.5)}
    term = proximal_term(0.3)
    np.testing.assert_allclose(term(params, anchor), 0.15 * (4 + 16 + 1), rtol=1e-6)
    grad = jax.grad(term)(params, anchor)
    np.testing.assert_allclose(grad["w"], [0.6, 1.2], rtol=1e-6)
    np.testing.assert_allclose(grad["b"], -0.3, rtol=1e-6)


@pytest.mark.parametrize("mu", [10.0, 100.0, 1000.0])
def test_large_mu_keeps_the_client_within_gradient_bound_over_mu(mu):
    """With eta * mu < 1, ||w_i - w_t|| <= G / mu, G bounding the minibatch gradient norms.

    For softmax regression ||grad_W|| <= sqrt(2) ||[x, 1]||, so G is known exactly.
    """
    xs, ys = make_clients([40])
    batch = stack_clients(xs, ys)
    model = small_model()
    anchor = model.init(jax.random.key(0))
    base = model_loss(model.apply)
    prox = proximal_term(mu)

    def loss(params, x, y, mask, rng):
        return base(params, x, y, mask, rng) + prox(params, anchor)

    result = jax.jit(lambda: local_train(loss, optax.sgd(5e-4), anchor, batch.x[0], batch.y[0],
                                         batch.mask[0], batch.rng[0], num_epochs=50,
                                         batch_size=5))()
    distance = float(optax.tree.norm(optax.tree.sub(result.params, anchor)))
    bound = np.sqrt(2) * np.linalg.norm(np.c_[xs[0], np.ones(40)], axis=1).max()
    assert 0 < distance <= bound / mu


def test_fedavg_drops_and_fedprox_keeps_the_same_stragglers():
    sizes = [12, 7, 20, 9, 15, 11, 8, 14, 10, 13]
    xs, ys = make_clients(sizes)
    batch = stack_clients(xs, ys, seed=4)
    model = small_model()
    options = dict(num_epochs=5, batch_size=4, straggler_fraction=0.7)
    fedavg_round = jax.jit(fedavg(model, optax.sgd(0.1), **options).round)
    fedprox_algorithm = fedprox(model, optax.sgd(0.1), mu=0.5, **options)
    state = fedprox_algorithm.init(jax.random.key(0))
    dropped = fedavg_round(state, batch).metrics
    kept = jax.jit(fedprox_algorithm.round)(state, batch).metrics
    assert int(dropped["participants"]) == round(10 * (1 - 0.7)) == 3
    assert int(kept["participants"]) == 10
    model_bytes = (5 * 3 + 3) * 4
    assert float(dropped["bytes_down"]) == float(kept["bytes_down"]) == 10 * model_bytes
    assert float(dropped["bytes_up"]) == 3 * model_bytes
    assert float(kept["bytes_up"]) == 10 * model_bytes

    stragglers = sample_stragglers(batch.rng, num_epochs=5, fraction=0.7)
    batches = np.array([-(-n // 4) for n in sizes])
    epochs = np.asarray(stragglers.epochs)
    assert int(kept["local_steps"]) == int(np.sum(epochs * batches))
    full_work = ~np.asarray(stragglers.is_straggler)
    assert int(dropped["local_steps"]) == int(np.sum((epochs * batches)[full_work]))
    assert np.all((epochs[np.asarray(stragglers.is_straggler)] >= 1)
                  & (epochs[np.asarray(stragglers.is_straggler)] <= 4))


@pytest.mark.parametrize("num_clients, active", [(3, 2), (5, 2)])
def test_fedavg_aggregates_the_references_active_count_for_odd_cohorts(num_clients, active):
    """FedAvg drops stragglers and keeps round(C (1 - s)) clients, as FedProx's reference does
    (s = 0.5: 2 of 3 and 2 of 5, Python 3's round halving to even)."""
    xs, ys = make_clients([8] * num_clients)
    batch = stack_clients(xs, ys, seed=2)
    algorithm = fedavg(small_model(), optax.sgd(0.1), num_epochs=2, batch_size=4,
                       straggler_fraction=0.5)
    metrics = algorithm.round(algorithm.init(jax.random.key(0)), batch).metrics
    assert int(metrics["participants"]) == active


def test_fedprox_validates_mu_and_its_fixed_options():
    with pytest.raises(ValueError, match="mu=-1.0 is invalid; expected mu >= 0"):
        fedprox(small_model(), optax.sgd(0.1), mu=-1.0)
    with pytest.raises(ValueError, match="fedprox sets straggler_policy itself"):
        fedprox(small_model(), optax.sgd(0.1), straggler_policy="drop")
