"""Every registered algorithm built as a sweep builds it, each sweepable option a traced scalar.

A sweep builds each algorithm inside one jitted (and vmapped) function from its config with every
sweepable option a traced scalar (`options.replace_paths`). For every case below, init and round
equal the Python numbers' bit for bit, and two values compile once. A vmapped axis of two values
matches each value alone within a bound: in the default suite for the cases in VMAPPED_BY_DEFAULT
(one per mechanism a vmap can break: DP's noise and adaptive clip, a proximal term, personal
state, attention over clients, meta-gradients, server momentum), for the rest under `pytest -m
slow` (each is another compile of the whole round; tests/test_sweep.py checks whole vmapped sweeps
against runs alone for FedAvg, FedProx, Ditto, FedMeta and FedAMP).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab import options
from fedjax_lab.algorithms import REGISTRY
from fedjax_lab.core import experiment_key, init_key
from common import assert_states_close
from test_registry_contract import COHORT, _batch, _build, _reference

# Each case is an algorithm with the options that give every sweepable one a number (None is
# structure: it is never traced) and the structural choices under which some take part (FedAMP's
# self_weight exists only with the heuristic attention, the compressed methods' client.lr only with
# local steps, DP's only with DP on, q-FFL's lipschitz only when set).
SWEEP_CASES = tuple((name, ()) for name in sorted(set(REGISTRY) - {"fedamp", "pfedhn"})) + (
    ("fedamp", (("lam", 0.3), ("alpha_k", 0.15))),
    ("fedamp", (("attention", "heuristic"), ("self_weight", 0.3), ("alpha_k", 0.7))),
    ("momentum_sgd", (("client.update", "local_steps"),)),
    ("pfedhn", (("server_lr", 0.02), ("client.clip_norm", 5.0))),
    ("qffl", (("lipschitz", 5.0),)),
    ("fedavg", (("dp.clip", 1.0), ("dp.noise_multiplier", 1.1), ("dp.adaptive_quantile", 0.5),
                ("dp.count_noise", 2.0))),
)
# vmap batches the models' matrix products and reductions over the run axis, which XLA's CPU kernels
# may sum in another order: a grid point of a vmapped sweep then differs from the same values run
# alone in the last bits after a round (measured on two CPU cores: at most 4.8e-7 absolute, in
# pFedHN's server momentum; 2.4e-7 with DP, 1.2e-7 elsewhere).
VMAP_RTOL, VMAP_ATOL = 1e-5, 1e-6
def _sweep_values(config) -> tuple[dict, dict]:
    """The value of every sweepable option `config` sets (None is structure), and a second setting
    that changes each one the config accepts changed (DP's clip_lr only with DP on, ...)."""
    first = {path: value for path, _, value, _, sweepable in options.describe(config)
             if sweepable and value is not None}
    second = dict(first)
    for path, value in first.items():
        other = value * 0.5 if value else 0.25
        try:
            options.validate(options.replace_paths(config, {path: other}))
        except options.OptionError:
            continue
        second[path] = other
    options.validate(options.replace_paths(config, second))
    return first, second


def _traced(values):
    return {path: jnp.asarray(value, jnp.float32) for path, value in values.items()}


def _case_id(case):
    return "-".join([case[0]] + [f"{path}={value}" for path, value in case[1]])


@functools.cache
def _swept(name, structure):
    config = options.replace_paths(REGISTRY[name].config(), dict(structure))
    first, second = _sweep_values(config)
    traces = []

    def algorithm(values):
        traces.append(None)
        return _build(name, options.replace_paths(config, values))

    init = jax.jit(lambda values, key: algorithm(values).init(key))
    round_fn = jax.jit(lambda values, state, batch: algorithm(values).round(state, batch))
    key, batch = init_key(experiment_key(0)), _batch(COHORT)

    def alone(values):
        return round_fn(values, init(values, key), batch)

    both = jax.jit(jax.vmap(lambda values: (lambda a: a.round(a.init(key), batch))(
        _build(name, options.replace_paths(config, values)))))
    _, state, _, after = _reference(name, structure)
    return dict(name=name, first=_traced(first), second=_traced(second), traces=traces, init=init,
                round=round_fn, alone=alone, both=both, key=key, batch=batch,
                reference=(state, after))


# One case per mechanism a vmapped run axis could break (see the module docstring).
VMAPPED_BY_DEFAULT = {"fedavg-dp.clip=1.0-dp.noise_multiplier=1.1-dp.adaptive_quantile=0.5-"
                      "dp.count_noise=2.0", "fedprox", "ditto",
                      "fedamp-attention=heuristic-self_weight=0.3-alpha_k=0.7", "fedmeta",
                      "momentum_sgd-client.update=local_steps"}


@pytest.fixture(scope="module", params=SWEEP_CASES, ids=_case_id)
def swept(request):
    return _swept(*request.param)


@pytest.fixture(scope="module", ids=_case_id, params=[
    case if _case_id(case) in VMAPPED_BY_DEFAULT else pytest.param(case, marks=pytest.mark.slow)
    for case in SWEEP_CASES])
def swept_vmapped(request):
    return _swept(*request.param)


def test_sweepable_options_traced_equal_their_python_numbers(swept):
    # Bit for bit, init and round each (one program of both would fuse across them). Where a
    # builder combines two options in Python (FedAMP's lam / alpha_k, the factored FedProx's
    # 1 - lr mu), Python numbers meet in float64 and traced ones in float32, so at values whose
    # float32 product or quotient rounds differently (0.05 * 0.3) the two differ in the last bit.
    state, after = swept["reference"]
    chex.assert_trees_all_equal(swept["init"](swept["first"], swept["key"]), state)
    chex.assert_trees_all_equal(swept["round"](swept["first"], state, swept["batch"]), after)


def test_two_values_of_the_sweepable_options_compile_once(swept):
    first, second = swept["alone"](swept["first"]), swept["alone"](swept["second"])
    assert len(swept["traces"]) == 2  # one trace of init, one of the round
    assert swept["init"]._cache_size() == swept["round"]._cache_size() == 1
    assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, first, second)))


def test_a_vmapped_axis_of_values_matches_each_value_alone(swept_vmapped):
    swept = swept_vmapped
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), swept["first"], swept["second"])
    both = swept["both"](stacked)
    for index in range(2):
        alone = (swept["alone"](swept["first" if index == 0 else "second"]))
        point = jax.tree.map(lambda leaf: leaf[index], both)
        assert_states_close(swept["name"], point, alone, rtol=VMAP_RTOL, atol=VMAP_ATOL)




