"""Reddi et al.'s adaptive server optimisers (FedAdagrad, FedAdam, FedYogi) as optax transforms.

Reference:
    Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan. "Adaptive Federated
    Optimization." ICLR 2021, arXiv 2003.00295, Algorithm 2.

With the pseudo-gradient g_t = sum_i p_i (x_t - x_i) that `server_update` passes (minus the
paper's Delta_t), every coordinate follows, from m_{-1} = 0 and v_{-1} = tau^2:

    m_t = b1 m_{t-1} + (1 - b1) g_t
    v_t = v_{t-1} + g_t^2                                  FedAdagrad
    v_t = b2 v_{t-1} + (1 - b2) g_t^2                      FedAdam
    v_t = v_{t-1} - (1 - b2) g_t^2 sign(v_{t-1} - g_t^2)   FedYogi
    x_{t+1} = x_t - lr m_t / (sqrt(v_t) + tau)

These are not `optax.adagrad` / `optax.adam` / `optax.yogi` (which FedMeta's outer Adam uses, as
Chen et al. do): Algorithm 2 has no bias correction, adds tau outside the square root (optax's
adagrad adds its eps inside), and starts v at tau^2 (Algorithm 2 asks v_{-1} >= tau^2), so tau
is the "degree of adaptivity" the paper tunes (1e-3 and below: more adaptive).
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any
ADAPTIVE_RULES = ("fedadagrad", "fedadam", "fedyogi")


class AdaptiveServerState(NamedTuple):
    """Attributes: first moment m and second moment v, each shaped like the parameters."""

    m: PyTree
    v: PyTree


def _second_moment(rule: str, b2, v, g_squared):
    if rule == "fedadagrad":
        return v + g_squared
    if rule == "fedadam":
        return b2 * v + (1 - b2) * g_squared
    return v - (1 - b2) * g_squared * jnp.sign(v - g_squared)


def adaptive_server_optimizer(rule: str, learning_rate, *, b1=0.9, b2=0.99,
                              tau=1e-3) -> optax.GradientTransformation:
    """One of Algorithm 2's server optimisers.

    Args:
        rule: "fedadagrad", "fedadam" or "fedyogi" (the second-moment update above).
        learning_rate: the server rate eta.
        b1: first-moment decay beta_1 (0 <= b1 < 1).
        b2: second-moment decay beta_2 of FedAdam and FedYogi (0 <= b2 < 1; FedAdagrad ignores it).
        tau: the degree of adaptivity (> 0), also the square root of v's start.

    Each of the numbers may be a traced scalar (a swept hyperparameter).
    """
    if rule not in ADAPTIVE_RULES:
        raise ValueError(f"rule {rule!r} is unknown; allowed: {', '.join(ADAPTIVE_RULES)}")

    def hyperparameters(like):
        # In the parameters' dtype before any arithmetic, so that a Python 0.9 and a traced
        # float32 0.9 give the same 1 - b1 (and tau^2) bit for bit.
        return (jnp.asarray(value, like.dtype) for value in (learning_rate, b1, b2, tau))

    def init(params):
        def initial_v(p):
            *_, tau_ = hyperparameters(p)
            return jnp.full_like(p, tau_ * tau_)

        return AdaptiveServerState(m=optax.tree.zeros_like(params),
                                   v=jax.tree.map(initial_v, params))

    def first_moment(g, m):
        _, b1_, _, _ = hyperparameters(g)
        return b1_ * m + (1 - b1_) * g

    def second_moment(g, v):
        _, _, b2_, _ = hyperparameters(g)
        return _second_moment(rule, b2_, v, g * g)

    def step(m, v):
        lr, _, _, tau_ = hyperparameters(m)
        return -lr * m / (jnp.sqrt(v) + tau_)

    def update(gradients, state, params=None):
        del params
        m = jax.tree.map(first_moment, gradients, state.m)
        v = jax.tree.map(second_moment, gradients, state.v)
        return jax.tree.map(step, m, v), AdaptiveServerState(m, v)

    return optax.GradientTransformation(init, update)
