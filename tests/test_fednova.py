"""FedNova invariants (Wang et al., NeurIPS 2020): equal local work is FedAvg, unequal work is
normalised client by client, the momentum normaliser ||a_i||_1 is the sum of optax's momentum
coefficients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common import (assert_trees_close, float64_params, make_clients, small_model,
                    stack_clients)
from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.algorithms.fednova import FedNovaConfig, fednova, local_normalizer
from fedjax_lab.core import local_train, model_loss, sample_stragglers
from fedjax_lab.options import OptionError, from_dict

MODEL = small_model()
# FedNova's update is (x - y_i)/τ_i * τ_eff: with equal τ_i that is FedAvg's x - y_i up to the
# rounding of one division and one multiplication: not bit for bit (measured after two rounds:
# at most 1.1e-16 absolute, parameters of order 1).
ROUNDING = dict(rtol=1e-14, atol=1e-15)


@functools.partial(jax.jit, static_argnums=0)
def float64_state(algorithm):
    """`init`'s state with float64 parameters (call inside `jax.enable_x64`), jitted: eager
    inits compile every small op on its own."""
    state = algorithm.init(jax.random.key(0))
    params = jax.tree.map(lambda leaf: leaf.astype(jnp.float64), state.params)
    return state._replace(params=params, opt_state=optax.sgd(1.0).init(params))


def hand_momentum_normalizer(tau, rho):
    """Σ over steps k of the weight gradient k carries into x - y: 1 + ρ + ... + ρ^(τ-1-k)."""
    return sum(sum(rho ** j for j in range(tau - k)) for k in range(tau))


@pytest.mark.parametrize("momentum, tau_eff", [(0.0, "steps"), (0.9, "normalizer")])
def test_equal_local_work_is_fedavg(momentum, tau_eff):
    """Equal sizes, no stragglers: FedNova is FedAvg (sample-weighted) to float64 rounding, with
    plain SGD for the paper's tau_eff and with momentum for the reference code's."""
    with jax.enable_x64(True):
        xs, ys = make_clients([8, 8, 8, 8], dtype=np.float64, seed=1)
        optimizer = optax.sgd(0.1, momentum=momentum or None)
        nova = fednova(MODEL, optimizer, client_momentum=momentum, tau_eff=tau_eff,
                       num_epochs=2, batch_size=3)
        avg = fedavg(MODEL, optimizer, num_epochs=2, batch_size=3)
        nova_state, avg_state = float64_state(nova), float64_state(avg)
        nova_round, avg_round = jax.jit(nova.round), jax.jit(avg.round)
        for round_index, ids in enumerate([[0, 1, 2, 3], [2, 0, 3, 1]]):
            batch = stack_clients(xs, ys, client_ids=ids, round_index=round_index)
            nova_state, avg_state = nova_round(nova_state, batch), avg_round(avg_state, batch)
            steps = 2 * 3  # two epochs of ceil(8 / 3) batches
            expected_tau = (steps if tau_eff == "steps"
                            else hand_momentum_normalizer(steps, momentum))
            np.testing.assert_allclose(nova_state.metrics["tau_eff"], expected_tau, rtol=1e-14)
        assert_trees_close(nova_state.params, avg_state.params, **ROUNDING)
        assert not np.allclose(nova_state.params["Dense_0"]["kernel"],
                               float64_params(MODEL)["Dense_0"]["kernel"])
        for name in ("train_loss", "participants", "bytes_up", "bytes_down", "local_steps"):
            np.testing.assert_allclose(nova_state.metrics[name], avg_state.metrics[name],
                                       rtol=1e-14)


def test_heterogeneous_steps_follow_the_formula_by_hand_and_differ_from_fedavg():
    """Different sizes and stragglers: x' = x - (Σ p_i τ_i) Σ p_i (x - y_i)/τ_i, each τ_i the
    client's own active steps (stragglers included); a padded row takes no step and changes
    nothing; the eager round equals the jitted one."""
    with jax.enable_x64(True):
        sizes = [9, 4, 13, 6, 0]
        xs, ys = make_clients(sizes, dtype=np.float64, seed=2)
        epochs, batch_size, lr = 3, 3, 0.1
        options = dict(num_epochs=epochs, batch_size=batch_size, straggler_fraction=0.5)
        nova = fednova(MODEL, optax.sgd(lr), **options)
        state = float64_state(nova)
        batch = stack_clients(xs, ys, padded_length=14, client_ids=[3, 0, 5, 1, 2], seed=4)
        new = jax.jit(nova.round)(state, batch)
        assert_trees_close(nova.round(state, batch), new)

        stragglers = sample_stragglers(batch.rng, num_epochs=epochs, fraction=0.5)
        active_epochs = np.asarray(stragglers.epochs)
        train = jax.jit(lambda x, y, mask, rng, active: local_train(
            model_loss(MODEL.apply), optax.sgd(lr), state.params, x, y, mask, rng,
            num_epochs=epochs, batch_size=batch_size, active_epochs=active))
        x = state.params
        p = np.array(sizes) / sum(sizes)
        results = [train(batch.x[i], batch.y[i], batch.mask[i], batch.rng[i], active_epochs[i])
                   for i in range(len(sizes))]
        taus = np.array([int(result.num_steps) for result in results])
        np.testing.assert_array_equal(
            taus, active_epochs * np.ceil(np.array(sizes) / batch_size).astype(int))
        real = taus > 0
        assert len(set(taus[real])) > 2  # the fixture's clients do unequal work
        assert np.any(np.asarray(stragglers.is_straggler)[real])
        tau_eff = float(np.sum(p * taus))
        real_results = [result for result, is_real in zip(results, real) if is_real]
        normalized = [jax.tree.map(lambda a, b: (a - b) / tau, x, result.params)
                      for tau, result in zip(taus[real], real_results)]
        expected = jax.tree.map(
            lambda x_leaf, *d: x_leaf - tau_eff * sum(w * d_i for w, d_i in zip(p[real], d)),
            x, *normalized)
        assert_trees_close(new.params, expected)
        np.testing.assert_allclose(new.metrics["tau_eff"], tau_eff, rtol=1e-14)
        assert int(new.metrics["participants"]) == 4
        assert int(new.metrics["local_steps"]) == int(taus.sum())
        assert np.all(np.isfinite(new.params["Dense_0"]["kernel"]))

        fedavg_params = jax.tree.map(
            lambda x_leaf, *y: x_leaf - sum(w * (x_leaf - y_i) for w, y_i in zip(p[real], y)),
            x, *[result.params for result in real_results])
        difference = optax.tree.norm(optax.tree.sub(new.params, fedavg_params))
        assert float(difference) > 1e-3 * float(optax.tree.norm(optax.tree.sub(new.params, x)))


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9, 1.0])
def test_momentum_normalizer_is_the_sum_of_the_momentum_coefficients(momentum):
    with jax.enable_x64(True):
        taus = np.arange(8)
        expected = [hand_momentum_normalizer(int(tau), momentum) for tau in taus]
        np.testing.assert_allclose(local_normalizer(jnp.asarray(taus), momentum), expected,
                                   rtol=1e-13)


def test_momentum_normalizer_matches_optax_momentum_on_a_constant_gradient():
    """A linear loss <c, w> has the constant gradient c, so τ steps of optax's heavy-ball SGD
    move w by exactly -η ||a||_1 c: the normalised update is one gradient step's."""
    with jax.enable_x64(True):
        eta, rho, tau = 0.05, 0.9, 7
        c = {"w": jnp.array([1.0, -2.0, 0.5])}
        start = {"w": jnp.array([0.3, 0.1, -0.2])}
        loss = lambda params, *_: optax.tree.vdot(c, params)
        x, y = jnp.zeros((tau, 2)), jnp.zeros(tau, jnp.int32)
        result = jax.jit(lambda: local_train(loss, optax.sgd(eta, momentum=rho), start, x, y,
                                             jnp.ones(tau, bool), jax.random.key(0),
                                             num_epochs=1, batch_size=1))()
        assert int(result.num_steps) == tau
        norm = local_normalizer(result.num_steps, rho)
        np.testing.assert_allclose((start["w"] - result.params["w"]) / norm, eta * c["w"],
                                   rtol=1e-13)


@pytest.mark.parametrize("options, message", [
    ({"tau_eff": "max"}, r"^tau_eff='max' is invalid; allowed: steps, normalizer"),
    ({"stragglers": 0.5, "client": {"epochs": 1}}, r"^stragglers=0.5 is invalid; .*epochs >= 2"),
    ({"weighting": "equal"}, r"^weighting='equal' is invalid"),
    ({"client": {"momentum": 1.5}}, r"^client\.momentum=1.5 is invalid"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(OptionError, match=message):
        from_dict(FedNovaConfig, options)


@pytest.mark.parametrize("options, message", [
    (dict(client_momentum=-0.1), r"client_momentum=-0.1 is invalid"),
    (dict(tau_eff="max"), r"tau_eff 'max' is unknown; allowed: steps, normalizer"),
    (dict(straggler_fraction=0.5, num_epochs=1), r"straggler_fraction > 0 needs num_epochs"),
    (dict(straggler_fraction=1.5), r"straggler_fraction=1.5 is invalid"),
    (dict(weighting="equal"), r"weighting 'equal' is unknown"),
])
def test_bad_factory_arguments_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        fednova(MODEL, optax.sgd(0.1), **options)
