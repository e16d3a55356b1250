"""pFedMe invariants (float64): the inner solver, the local model's Moreau-envelope step and the
server's beta by hand; lam = 0 leaves the global model where it is; personal models move only
for the clients that trained, and they are what a client predicts with."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from common import (NUM_CLASSES, NUM_FEATURES, assert_trees_close, assert_trees_equal,
                    float64_params, make_clients, small_model, stack_clients)
from fedjax_lab.algorithms import REGISTRY
from fedjax_lab.algorithms.pfedme import PFedMeConfig
from fedjax_lab.core import ClientExecution, model_loss
from fedjax_lab.core.types import DataInfo

SIZES = [9, 4, 13]
NUM_CLIENTS = 5
COHORT = [0, 3, 4]
# One full-batch local step with K = 3 inner steps, server beta 2 (the paper's other setting).
CONFIG = PFedMeConfig(lr=0.05, personal_lr=0.1, lam=2.0, inner_steps=3, beta=2.0,
                      local_steps=1, batch_size=None)


def _build(config):
    info = DataInfo(NUM_CLIENTS, NUM_CLASSES, (NUM_FEATURES,), max(SIZES))
    return REGISTRY["pfedme"].build(config, small_model(), info, ClientExecution("vmap"))


def _round(config):
    """(initial state, state after one jitted round, batch, the model's start) in float64."""
    xs, ys = make_clients(SIZES, dtype=np.float64)
    batch = stack_clients(xs, ys, client_ids=COHORT)
    algorithm = _build(config)
    state = algorithm.init(jax.random.key(0))
    w = float64_params(small_model())
    state = state._replace(params=w, client_states=state.client_states._replace(
        personal=jax.tree.map(lambda leaf: jnp.repeat(leaf[None], NUM_CLIENTS, 0), w)))
    return state, jax.jit(algorithm.round)(state, batch), batch, w


def test_one_round_is_the_inner_solver_the_envelope_step_and_beta_by_hand():
    with jax.enable_x64(True):
        _, after, batch, w = _round(CONFIG)
        loss = model_loss(small_model().apply)
        grad = jax.jit(jax.grad(lambda p, x, y, mask: loss(p, x, y, mask, None)))
        locals_ = []
        for row, client in enumerate(COHORT):
            x, y, mask = batch.x[row], batch.y[row], batch.mask[row]
            theta = w
            for _ in range(CONFIG.inner_steps):
                g = grad(theta, x, y, mask)
                theta = jax.tree.map(lambda t, g, w: t - CONFIG.personal_lr * (
                    g + CONFIG.lam * (t - w)), theta, g, w)
            locals_.append(jax.tree.map(lambda w, t: w - CONFIG.lr * CONFIG.lam * (w - t),
                                        w, theta))
            assert_trees_close(jax.tree.map(lambda leaf: leaf[client],
                                            after.client_states.personal), theta)
        p = np.array(SIZES) / sum(SIZES)
        mean = jax.tree.map(lambda *ws: sum(pi * wi for pi, wi in zip(p, ws)), *locals_)
        assert_trees_close(after.params, jax.tree.map(
            lambda w, m: (1 - CONFIG.beta) * w + CONFIG.beta * m, w, mean))


def test_without_the_envelope_the_global_model_stays_and_personal_models_train_alone():
    with jax.enable_x64(True):
        _, after, batch, w = _round(dataclasses.replace(CONFIG, lam=0.0))
        # Every local model is w exactly; their weighted mean sum_i p_i w rounds in float64 as
        # the program orders it (an ulp or so).
        assert_trees_close(after.params, w)
        for client in set(range(NUM_CLIENTS)) - set(COHORT):
            assert_trees_equal(jax.tree.map(lambda leaf: leaf[client],
                                            after.client_states.personal), w)
        # Each trained client predicts with its own theta_i, the global view with w.
        algorithm = _build(CONFIG)
        logits = algorithm.predict(after, batch)
        theta = jax.tree.map(lambda leaf: leaf[COHORT[1]], after.client_states.personal)
        np.testing.assert_allclose(logits[1], small_model().apply(theta, batch.x[1]),
                                   rtol=1e-12)
        assert not np.allclose(logits[1], algorithm.predict_global(after, batch)[1])
