"""FedAvgM and Reddi et al.'s adaptive server optimisers: Algorithm 2 step by step in float64,
server momentum's recursion, and the presets as FedAvg under a named server optimiser."""

import dataclasses

import jax
import numpy as np
import optax
import pytest

from common import (NUM_CLASSES, NUM_FEATURES, assert_trees_close, assert_trees_equal,
                    make_clients, small_model, stack_clients)
from fedjax_lab import options
from fedjax_lab.algorithms import REGISTRY
from fedjax_lab.algorithms.fedavg import FedAvgConfig
from fedjax_lab.algorithms.spec import ServerOptimizer
from fedjax_lab.core import ClientExecution
from fedjax_lab.core.server_optimizers import ADAPTIVE_RULES, adaptive_server_optimizer
from fedjax_lab.core.types import DataInfo

SIZES = [9, 4, 13, 6]
LR, B1, B2, TAU = 0.05, 0.8, 0.95, 0.02


def _algorithm_2(rule, gradients):
    """Reddi et al.'s Algorithm 2 in numpy: the parameter after each pseudo-gradient."""
    x, m, v = np.zeros_like(gradients[0]), 0.0, np.full_like(gradients[0], TAU ** 2)
    trajectory = []
    for g in gradients:
        m = B1 * m + (1 - B1) * g
        if rule == "fedadagrad":
            v = v + g ** 2
        elif rule == "fedadam":
            v = B2 * v + (1 - B2) * g ** 2
        else:
            v = v - (1 - B2) * g ** 2 * np.sign(v - g ** 2)
        x = x - LR * m / (np.sqrt(v) + TAU)
        trajectory.append(x)
    return trajectory


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("rule", ADAPTIVE_RULES)
def test_adaptive_server_optimizers_follow_algorithm_2(rule, jit):
    # Small pseudo-gradients then large ones, so Yogi's v - g^2 takes both signs.
    gradients = [np.random.default_rng(step).normal(size=6) * scale
                 for step, scale in enumerate([0.01, 0.01, 1.0, 0.3, 0.001])]
    optimizer = adaptive_server_optimizer(rule, LR, b1=B1, b2=B2, tau=TAU)
    update = jax.jit(optimizer.update) if jit else optimizer.update
    with jax.enable_x64(True):
        params = np.zeros(6)
        state = optimizer.init(params)
        for g, expected in zip(gradients, _algorithm_2(rule, gradients)):
            updates, state = update(g, state)
            params = optax.apply_updates(params, updates)
            np.testing.assert_allclose(params, expected, rtol=1e-13, atol=1e-15)


def test_yogi_second_moment_moves_additively_towards_the_squared_gradient():
    optimizer = adaptive_server_optimizer("fedyogi", LR, b1=B1, b2=B2, tau=TAU)
    with jax.enable_x64(True):
        state = optimizer.init(np.zeros(2))
        _, state = optimizer.update(np.array([0.0, 1.0]), state)
    # Below tau^2 nothing is added; above, v grows by (1 - b2) g^2 (Adam would mix in b2 v).
    np.testing.assert_allclose(state.v, [TAU ** 2, TAU ** 2 + (1 - B2)], rtol=1e-14)


def _build(name, config):
    info = DataInfo(len(SIZES), NUM_CLASSES, (NUM_FEATURES,), max(SIZES))
    return REGISTRY[name].build(config, small_model(), info, ClientExecution("vmap"))


def _float64(tree):
    return jax.tree.map(lambda leaf: leaf.astype(np.float64)
                        if np.issubdtype(leaf.dtype, np.floating) else leaf, tree)


def _batches():
    xs, ys = make_clients(SIZES, dtype=np.float64)
    return [stack_clients(xs, ys, round_index=r) for r in range(2)]


@pytest.mark.parametrize("name", ("fedavgm",) + ADAPTIVE_RULES)
def test_presets_step_on_fedavgs_pseudo_gradient(name):
    """Each round's model equals the server rule applied by hand (heavy ball for FedAvgM,
    Algorithm 2 for the others) to the pseudo-gradient of FedAvg's round from the same model
    (jitted; tests/test_registry_contract.py checks every preset's eager round against it)."""
    config = REGISTRY[name].config()
    server = config.server
    plain = dataclasses.replace(config, server=ServerOptimizer("sgd", lr=1.0))
    with jax.enable_x64(True):
        batches = _batches()
        preset, averaging = _build(name, config), _build("fedavg", plain)
        preset_round, averaging_round = jax.jit(preset.round), jax.jit(averaging.round)
        state = _float64(preset.init(jax.random.key(0)))
        start = _float64(averaging.init(jax.random.key(0)))
        m = jax.tree.map(np.zeros_like, state.params)
        v = jax.tree.map(lambda x: np.full_like(x, server.tau ** 2), state.params)
        for batch in batches:
            x = state.params
            g = jax.tree.map(np.subtract, x,
                             averaging_round(start._replace(params=x), batch).params)
            if name == "fedavgm":
                m = jax.tree.map(lambda m, g: server.momentum * m + g, m, g)
                expected = jax.tree.map(lambda x, m: x - server.lr * m, x, m)
            else:
                m = jax.tree.map(lambda m, g: server.b1 * m + (1 - server.b1) * g, m, g)
                v = jax.tree.map(lambda v, g: _second_moment(name, server.b2, v, g), v, g)
                expected = jax.tree.map(
                    lambda x, m, v: x - server.lr * m / (np.sqrt(v) + server.tau), x, m, v)
            state = preset_round(state, batch)
            # g is x minus the mean here and the mean of the deltas in the round: they differ
            # in the last bits, which the adaptive rules scale by up to 1 / tau where v ~ tau^2
            # (the rules alone are exact: test_adaptive_server_optimizers_follow_algorithm_2).
            if name == "fedavgm":
                assert_trees_close(state.params, expected)
            else:
                assert_trees_close(state.params, expected, rtol=1e-8, atol=1e-9)


def _second_moment(rule, b2, v, g):
    if rule == "fedadagrad":
        return v + g ** 2
    if rule == "fedadam":
        return b2 * v + (1 - b2) * g ** 2
    return v - (1 - b2) * g ** 2 * np.sign(v - g ** 2)


def test_fedavgm_without_momentum_is_fedavg_bit_for_bit():
    config = dataclasses.replace(REGISTRY["fedavgm"].config(),
                                 server=ServerOptimizer("sgd", lr=1.0, momentum=0.0))
    batch = _batches()[0]
    rounds = [jax.jit(a.round)(a.init(jax.random.key(0)), batch).params
              for a in (_build("fedavgm", config), _build("fedavg", FedAvgConfig()))]
    assert_trees_equal(*rounds)


def test_each_preset_is_fedavgs_config_with_its_server_optimizer():
    for name in ("fedavgm",) + ADAPTIVE_RULES:
        config = REGISTRY[name].config()
        assert options.to_dict(dataclasses.replace(config, server=ServerOptimizer())) == (
            options.to_dict(FedAvgConfig())), name
        assert config.server.optimizer == ("sgd" if name == "fedavgm" else name)
        options.validate(config)


@pytest.mark.parametrize("server,path", [
    ({"optimizer": "fedadam", "momentum": 0.9}, "server.momentum"),
    ({"optimizer": "fedyogi", "b1": 1.0}, "server.b1"),
    ({"optimizer": "fedadam", "b2": -0.1}, "server.b2"),
    ({"optimizer": "fedadagrad", "tau": 0.0}, "server.tau"),
    ({"optimizer": "sgd", "momentum": 1.0}, "server.momentum"),
])
def test_nonsense_server_options_name_the_option(server, path):
    with pytest.raises(options.OptionError, match=path.replace(".", r"\.")):
        options.validate(options.from_dict(FedAvgConfig, {"server": server}))
