"""APFL invariants: alpha = 0 is FedAvg's global model, alpha = 1 is Local training, the personal
and alpha steps are the gradients at the mixture (float64), and personal state moves only for the
clients that trained."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from common import (NUM_CLASSES, NUM_FEATURES, assert_trees_close, assert_trees_equal,
                    float64_params, make_clients, small_model, stack_clients)
from fedjax_lab.algorithms import REGISTRY
from fedjax_lab.algorithms.apfl import APFLConfig, mixture
from fedjax_lab.algorithms.fedavg import FedAvgConfig
from fedjax_lab.core import ClientExecution, local_train, model_loss
from fedjax_lab.core.types import DataInfo

SIZES = [9, 4, 13, 6]
NUM_CLIENTS = 7
COHORT = [0, 2, 3, 6]


def _build(name, config):
    info = DataInfo(NUM_CLIENTS, NUM_CLASSES, (NUM_FEATURES,), max(SIZES))
    return REGISTRY[name].build(config, small_model(), info, ClientExecution("vmap"))


def _batches(rounds=2):
    xs, ys = make_clients(SIZES)
    return [stack_clients(xs, ys, round_index=r, client_ids=COHORT) for r in range(rounds)]


def test_alpha_zero_is_fedavgs_global_model_bit_for_bit():
    apfl = _build("apfl", APFLConfig(alpha=0.0, alpha_lr=0.0))
    fedavg = _build("fedavg", FedAvgConfig(dense_update="per_client"))
    personal, plain = apfl.init(jax.random.key(0)), fedavg.init(jax.random.key(0))
    for batch in _batches():
        personal, plain = jax.jit(apfl.round)(personal, batch), jax.jit(fedavg.round)(plain,
                                                                                       batch)
        assert_trees_equal(personal.params, plain.params)
    batch = _batches(1)[0]
    assert_trees_equal(jax.jit(apfl.predict)(personal, batch),
                       jax.jit(fedavg.predict)(plain, batch))


def test_alpha_one_trains_each_personal_model_alone():
    config = APFLConfig(alpha=1.0, alpha_lr=0.0)
    apfl = _build("apfl", config)
    state = apfl.init(jax.random.key(0))
    start = state.params
    model = small_model()
    train = jax.jit(lambda params, x, y, mask, rng: local_train(
        model_loss(model.apply), optax.sgd(config.client.lr), params, x, y, mask, rng,
        num_epochs=config.client.epochs, batch_size=config.client.batch_size).params)
    local = {i: start for i in COHORT}
    for batch in _batches():
        state = jax.jit(apfl.round)(state, batch)
        for row, client in enumerate(COHORT):
            local[client] = train(local[client], batch.x[row], batch.y[row], batch.mask[row],
                                  batch.rng[row])
    for client in COHORT:
        assert_trees_equal(jax.tree.map(lambda leaf: leaf[client], state.client_states.personal),
                           local[client])
    for client in set(range(NUM_CLIENTS)) - set(COHORT):
        assert_trees_equal(jax.tree.map(lambda leaf: leaf[client], state.client_states.personal),
                           start)
    np.testing.assert_array_equal(state.client_states.alpha, 1.0)


def test_one_step_moves_v_and_alpha_along_the_mixtures_gradient():
    """Full batch, one epoch: v <- v - eta alpha grad f(vbar), alpha <- alpha - eta_alpha
    <v - w, grad f(vbar)>, w <- w - eta grad f(w), from a personal model away from w."""
    config = APFLConfig(alpha=0.3, alpha_lr=0.2,
                        client=APFLConfig().client.__class__(lr=0.1, epochs=1, batch_size=None))
    model = small_model()
    loss = model_loss(model.apply)
    with jax.enable_x64(True):
        xs, ys = make_clients(SIZES, dtype=np.float64)
        batch = stack_clients(xs, ys, client_ids=COHORT)
        apfl = _build("apfl", config)
        state = apfl.init(jax.random.key(0))
        w = float64_params(model)
        personal = jax.tree.map(lambda leaf: leaf + 0.1 * np.arange(leaf.size).reshape(
            leaf.shape), w)
        state = state._replace(params=w, client_states=state.client_states._replace(
            personal=jax.tree.map(lambda leaf: jnp.repeat(leaf[None], NUM_CLIENTS, 0), personal),
            alpha=jnp.full((NUM_CLIENTS,), 0.3)))
        after = jax.jit(apfl.round)(state, batch)
        # One compiled gradient for every client: their padded rows share one shape.
        grad = jax.jit(jax.grad(lambda p, x, y, mask: loss(p, x, y, mask, None)))
        updated_w = []
        for row, client in enumerate(COHORT):
            x, y, mask = batch.x[row], batch.y[row], batch.mask[row]
            vbar = mixture(0.3, personal, w)
            g = grad(vbar, x, y, mask)
            v_new = jax.tree.map(lambda v, g: v - 0.1 * 0.3 * g, personal, g)
            alpha_new = 0.3 - 0.2 * sum(jnp.vdot(v - ww, gg) for v, ww, gg in zip(
                jax.tree.leaves(personal), jax.tree.leaves(w), jax.tree.leaves(g)))
            assert_trees_close(jax.tree.map(lambda leaf: leaf[client],
                                            after.client_states.personal), v_new)
            np.testing.assert_allclose(after.client_states.alpha[client], alpha_new, rtol=1e-12)
            g_w = grad(w, x, y, mask)
            updated_w.append(jax.tree.map(lambda p, g: p - 0.1 * g, w, g_w))
        p = np.array(SIZES) / sum(SIZES)
        assert_trees_close(after.params, jax.tree.map(
            lambda *ws: sum(pi * wi for pi, wi in zip(p, ws)), *updated_w))
        assert float(after.metrics["mean_alpha"]) == float(np.mean(
            after.client_states.alpha[np.array(COHORT)]))
