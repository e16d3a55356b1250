"""q-FFL / q-FedAvg invariants (Li et al., ICLR 2020): q = 0 is uniform FedAvg bit for bit, a
round is Algorithm 3's w - Σ Δ_k / Σ h_k computed by hand, the larger-loss client's share grows
with q, bad options are named."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from common import (assert_trees_close, assert_trees_equal, make_clients, small_model,
                    stack_clients)
from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.algorithms.qffl import LOSS_EPSILON, QFFLConfig, qffl
from fedjax_lab.core import local_train, model_loss
from fedjax_lab.options import OptionError, from_dict

MODEL = small_model()
LR, EPOCHS, BATCH = 0.1, 2, 3


@functools.partial(jax.jit, static_argnums=0)
def float64_state(algorithm):
    """`init`'s state with float64 parameters (call inside `jax.enable_x64`)."""
    state = algorithm.init(jax.random.key(0))
    params = jax.tree.map(lambda leaf: leaf.astype(jnp.float64), state.params)
    return state._replace(params=params, opt_state=optax.sgd(1.0).init(params))


@jax.jit
def swept_round(q, lipschitz, state, batch):
    """One q-FedAvg round with q and L traced: one compile serves every value (every batch
    here is 5 rows of 14 examples)."""
    algorithm = qffl(MODEL, optax.sgd(LR), q=q, lipschitz=lipschitz, num_epochs=EPOCHS,
                     batch_size=BATCH)
    return algorithm.round(state, batch)


def hand_loss(params, x, y):
    """F_k: mean cross-entropy over the client's real (unpadded) examples, in numpy."""
    logits = np.asarray(MODEL.apply(params, jnp.asarray(x)), np.float64)
    top = logits.max(axis=1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return float(np.mean(log_z - logits[np.arange(len(y)), y]))


@jax.jit
def train_one(params, x, y, mask, rng):
    return local_train(model_loss(MODEL.apply), optax.sgd(LR), params, x, y, mask, rng,
                       num_epochs=EPOCHS, batch_size=BATCH).params


def hand_local_models(params, batch):
    """Each row's w̄_k from its own `local_train` run."""
    return [train_one(params, batch.x[i], batch.y[i], batch.mask[i], batch.rng[i])
            for i in range(batch.num_clients)]


def test_q_zero_is_uniform_fedavg_bit_for_bit():
    """q = 0 (a Python 0 and a traced 0): a_k = 1/m and the step scale is exactly 1, so two
    rounds equal FedAvg with uniform weights bit for bit, padded row included."""
    with jax.enable_x64(True):
        xs, ys = make_clients([9, 4, 13, 6, 0], dtype=np.float64, seed=1)
        options = dict(num_epochs=EPOCHS, batch_size=BATCH)
        fair = qffl(MODEL, optax.sgd(LR), q=0.0, lipschitz=1 / LR, **options)
        avg = fedavg(MODEL, optax.sgd(LR), weighting="uniform", dense_update="per_client",
                     **options)
        fair_state = avg_state = traced_state = float64_state(fair)
        fair_round, avg_round = jax.jit(fair.round), jax.jit(avg.round)
        for round_index, ids in enumerate([[0, 1, 2, 3, 4], [2, 0, 3, 4, 1]]):
            batch = stack_clients(xs, ys, padded_length=14, client_ids=ids,
                                  round_index=round_index)
            fair_state, avg_state = fair_round(fair_state, batch), avg_round(avg_state, batch)
            traced_state = swept_round(jnp.float64(0.0), jnp.float64(1 / LR), traced_state,
                                       batch)
        assert_trees_equal(fair_state.params, avg_state.params)
        assert_trees_equal(traced_state.params, avg_state.params)
        for name in ("train_loss", "participants", "local_steps", "update_norm"):
            np.testing.assert_array_equal(fair_state.metrics[name], avg_state.metrics[name])
        assert int(fair_state.metrics["participants"]) == 4
        assert not np.allclose(fair_state.params["Dense_0"]["kernel"],
                               float64_state(fair).params["Dense_0"]["kernel"])


@pytest.mark.parametrize("q, lipschitz", [(1.0, 1 / LR), (5.0, 3.0)])
def test_one_round_is_algorithm_3_by_hand(q, lipschitz):
    """Clients of sizes 9, 4, 13, 6 and a padded row: w' = w - Σ Δ_k / Σ h_k with
    Δ_k = F_k^q L (w - w̄_k), h_k = q F_k^(q-1) ||L (w - w̄_k)||² + L F_k^q, F_k at w over each
    client's real examples (plus the reference's 1e-10), w̄_k from separate `local_train` runs;
    the padded row is in neither sum, and the round is not uniform FedAvg."""
    with jax.enable_x64(True):
        sizes = [9, 4, 13, 6, 0]
        xs, ys = make_clients(sizes, dtype=np.float64, seed=2)
        state = float64_state(qffl(MODEL, optax.sgd(LR), q=q, lipschitz=lipschitz))
        batch = stack_clients(xs, ys, padded_length=14, client_ids=[3, 0, 5, 1, 2], seed=4)
        new = swept_round(jnp.float64(q), jnp.float64(lipschitz), state, batch)

        w, unravel = ravel_pytree(state.params)
        w = np.asarray(w)
        local = [np.asarray(ravel_pytree(p)[0]) for p in hand_local_models(state.params, batch)]
        losses = [hand_loss(state.params, x, y) for x, y in zip(xs[:4], ys[:4])]
        deltas, hs = [], []
        for loss, local_w in zip(losses, local[:4]):
            delta_w = lipschitz * (w - local_w)
            shifted = loss + LOSS_EPSILON
            deltas.append(shifted ** q * delta_w)
            hs.append(q * shifted ** (q - 1) * np.sum(delta_w ** 2) + lipschitz * shifted ** q)
        expected = w - np.sum(deltas, axis=0) / np.sum(hs)
        assert_trees_close(new.params, unravel(jnp.asarray(expected)))
        np.testing.assert_allclose(new.metrics["global_loss_mean"], np.mean(losses), rtol=1e-13)
        np.testing.assert_allclose(new.metrics["global_loss_max"], max(losses), rtol=1e-13)
        assert int(new.metrics["participants"]) == 4
        model_bytes = w.size * 8
        assert float(new.metrics["bytes_up"]) == 4 * (model_bytes + 8)
        assert float(new.metrics["bytes_down"]) == 4 * model_bytes
        uniform = w - np.mean([w - local_w for local_w in local[:4]], axis=0)
        assert np.linalg.norm(expected - uniform) > 1e-3 * np.linalg.norm(expected - w)


def test_a_round_without_real_clients_changes_nothing():
    with jax.enable_x64(True):
        xs, ys = make_clients([0] * 5, dtype=np.float64)
        state = float64_state(qffl(MODEL, optax.sgd(LR), q=1.0, lipschitz=1 / LR))
        batch = stack_clients(xs, ys, padded_length=14, client_ids=[0, 1, 2, 3, 4])
        new = swept_round(jnp.float64(2.0), jnp.float64(1 / LR), state, batch)
        assert_trees_equal(new.params, state.params)
        assert int(new.metrics["participants"]) == 0
        assert float(new.metrics["bytes_up"]) == float(new.metrics["bytes_down"]) == 0


def test_the_larger_loss_client_gets_the_larger_share_as_q_grows():
    """Two equal-sized clients, one labelled with the initial model's favourite class (small
    F), one with its least favourite (large F): writing the update as c_easy d_easy + c_hard
    d_hard (d_k = w - w̄_k), the hard client's share c_hard / (c_easy + c_hard) is 1/2 at q = 0,
    then F_hard^q / (F_easy^q + F_hard^q), rising towards 1 with q."""
    with jax.enable_x64(True):
        state = float64_state(qffl(MODEL, optax.sgd(LR), q=1.0, lipschitz=1 / LR))
        x = 3 * make_clients([8], dtype=np.float64, seed=5)[0][0]
        logits = np.asarray(MODEL.apply(state.params, jnp.asarray(x)))
        easy, hard = logits.argmax(axis=1), logits.argmin(axis=1)
        # Three padded rows: the other tests' batch shape, so their compiled round serves.
        empty_x, empty_y = np.zeros((0, x.shape[1])), np.zeros(0, np.int32)
        batch = stack_clients([x, x] + [empty_x] * 3,
                              [easy.astype(np.int32), hard.astype(np.int32)] + [empty_y] * 3,
                              padded_length=14, client_ids=[0, 1, 2, 3, 4], seed=6)
        losses = np.array([hand_loss(state.params, x, easy), hand_loss(state.params, x, hard)])
        assert losses[1] > 3 * losses[0]
        w, _ = ravel_pytree(state.params)
        changes = np.stack([np.asarray(w - ravel_pytree(p)[0])
                            for p in hand_local_models(state.params, batch)[:2]], axis=1)
        shares = []
        for q in (0.0, 1.0, 2.0, 5.0):
            new = swept_round(jnp.float64(q), jnp.float64(1 / LR), state, batch)
            update = np.asarray(w - ravel_pytree(new.params)[0])
            coefficients, *_ = np.linalg.lstsq(changes, update, rcond=None)
            np.testing.assert_allclose(changes @ coefficients, update, rtol=1e-10, atol=1e-14)
            shares.append(coefficients[1] / coefficients.sum())
            powers = (losses + LOSS_EPSILON) ** q
            np.testing.assert_allclose(shares[-1], powers[1] / powers.sum(), rtol=1e-9)
        np.testing.assert_allclose(shares[0], 0.5, rtol=1e-12)
        assert np.all(np.diff(shares) > 0) and shares[-1] > 0.99


@pytest.mark.parametrize("options, message", [
    ({"q": -0.5}, r"^q=-0.5 is invalid; expected a number >= 0"),
    ({"lipschitz": 0.0}, r"^lipschitz=0.0 is invalid; expected a number > 0"),
    ({"lipschitz": -2.0}, r"^lipschitz=-2.0 is invalid"),
    ({"client": {"lr": 0.0}}, r"^client\.lr=0.0 is invalid"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(OptionError, match=message):
        from_dict(QFFLConfig, options)


@pytest.mark.parametrize("options, message", [
    (dict(q=-1.0, lipschitz=10.0), r"^q=-1.0 is invalid; expected >= 0"),
    (dict(lipschitz=0.0), r"^lipschitz=0.0 is invalid; expected > 0"),
    (dict(lipschitz=10.0, num_epochs=0), r"^num_epochs=0 is invalid"),
])
def test_bad_factory_arguments_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        qffl(MODEL, optax.sgd(LR), **options)
