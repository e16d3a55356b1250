"""The contract every registered algorithm keeps, checked over the whole registry.

For each `AlgorithmSpec` built with its default config on tiny clients: the jitted round equals the
eager one; two rounds scanned keep the metric structure (REQUIRED_METRICS included) and equal two
jitted rounds; `predict` has shape [C, N, classes]; a padded client changes no state and no
per-client row; a state checkpointed and restored is bit for bit the same and continues the same;
the config round-trips through its file.

A sweep builds each algorithm inside one jitted (and vmapped) function from its config with every
sweepable option a traced scalar (`options.replace_paths`). For every case in SWEEP_CASES, init and
round equal the Python numbers' bit for bit, and two values compile once. A vmapped axis of two
values matches each value alone within a bound: in the default suite for the cases in
VMAPPED_BY_DEFAULT (one per mechanism a vmap can break: DP's noise and adaptive clip, a proximal
term, personal state, attention over clients, meta-gradients, server momentum), for the rest under
`pytest -m slow` (each is another compile of the whole round; tests/test_sweep.py checks whole
vmapped sweeps against runs alone for FedAvg, FedProx, Ditto, FedMeta and FedAMP). Both halves are
one file so that each algorithm's reference round (Python numbers) is compiled once, not once per
file.
"""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import assert_states_close
from fedjax_lab import checkpoint, config as run_config, options
from fedjax_lab.algorithms import REGISTRY
from fedjax_lab.core import ClientExecution, client_keys, experiment_key, init_key
from fedjax_lab.core.types import REQUIRED_METRICS, ClientBatch, DataInfo
from fedjax_lab.models import mlp, split_mlp

NUM_CLIENTS, NUM_FEATURES, NUM_CLASSES, NUM_EXAMPLES = 6, 8, 3, 12
COHORT = (0, 2, 3, 5)


def _population():
    rng = np.random.default_rng(0)
    sizes = np.array([12, 7, 9, 12, 5, 10])
    x = rng.normal(size=(NUM_CLIENTS, NUM_EXAMPLES, NUM_FEATURES)).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES, size=(NUM_CLIENTS, NUM_EXAMPLES)).astype(np.int32)
    mask = np.arange(NUM_EXAMPLES)[None, :] < sizes[:, None]
    return x, y * mask, mask, sizes


def _batch(client_ids, round_index=0, padded=()):
    """The cohort `client_ids`; ids in `padded` become padding rows (no examples)."""
    x, y, mask, sizes = _population()
    ids = np.asarray(client_ids)
    real = ~np.isin(ids, padded)
    mask = mask[ids] & real[:, None]
    return ClientBatch(x=jnp.asarray(x[ids] * mask[..., None]), y=jnp.asarray(y[ids] * mask),
                       mask=jnp.asarray(mask),
                       num_examples=jnp.asarray(np.where(real, sizes[ids], 0), jnp.int32),
                       client_ids=jnp.asarray(ids, jnp.int32),
                       rng=client_keys(experiment_key(0), round_index, jnp.asarray(ids)))


def _build(name, config=None):
    spec = REGISTRY[name]
    model = (split_mlp((NUM_FEATURES,), NUM_CLASSES, hidden=(16, 8)) if spec.model_kind == "split"
             else mlp((NUM_FEATURES,), NUM_CLASSES, hidden=(16,)))
    info = DataInfo(NUM_CLIENTS, NUM_CLASSES, (NUM_FEATURES,), NUM_EXAMPLES)
    config = spec.config() if config is None else config
    return spec.build(config, model, info, ClientExecution("vmap"))


def _without_metrics(state):
    """The state less its metrics (a padded client is still counted in a cohort's size)."""
    if hasattr(state, "_replace"):
        return state._replace(metrics={})
    return state.replace(metrics={})


def _close(a, b):
    chex.assert_trees_all_close(a, b, rtol=2e-5, atol=1e-5)


@functools.cache
def _reference(name, structure):
    """(algorithm, initial state, jitted round, state after one round) of `name`'s config with
    the options `structure` (pairs of dotted path and value) set, built with Python numbers.
    `structure` has no default: functools.cache would key `(name)` and `(name, ())` apart."""
    config = options.replace_paths(REGISTRY[name].config(), dict(structure))
    options.validate(config)
    algorithm = _build(name, config)
    state = jax.jit(algorithm.init)(init_key(experiment_key(0)))
    round_fn = jax.jit(algorithm.round)
    return algorithm, state, round_fn, round_fn(state, _batch(COHORT))


@pytest.fixture(scope="module", params=sorted(REGISTRY))
def built(request):
    return (request.param, *_reference(request.param, ()))


def test_jitted_and_eager_rounds_agree_and_metrics_are_complete(built):
    _, algorithm, state, _, after = built
    eager = algorithm.round(state, _batch(COHORT))
    _close(eager, after)
    assert set(REQUIRED_METRICS) <= set(after.metrics)
    chex.assert_trees_all_equal_structs(state, after)
    assert int(after.round) == int(state.round) + 1


def test_two_scanned_rounds_equal_two_jitted_rounds(built):
    _, algorithm, state, round_fn, after = built
    batches = [_batch(COHORT, 0), _batch((1, 2, 4, 5), 1)]
    stacked = jax.tree.map(lambda *b: jnp.stack(b), *batches)
    scanned, metrics = jax.jit(lambda s, b: jax.lax.scan(
        lambda s, b: (algorithm.round(s, b),) * 2, s, b))(state, stacked)
    chex.assert_tree_shape_prefix(metrics, (2,))
    _close(scanned, round_fn(after, batches[1]))
    assert jax.tree.structure(scanned.metrics) == jax.tree.structure(state.metrics)


def test_predict_has_one_logit_row_per_example(built):
    _, algorithm, _, _, after = built
    batch = _batch(COHORT)
    logits = jax.jit(algorithm.predict)(after, batch)
    chex.assert_shape(logits, (len(COHORT), NUM_EXAMPLES, NUM_CLASSES))
    chex.assert_tree_all_finite(logits)
    for view in (algorithm.predict_global,):
        if view is not None:
            chex.assert_shape(view(after, batch), (len(COHORT), NUM_EXAMPLES, NUM_CLASSES))
    if algorithm.adapted_predict is not None:
        query = _batch(COHORT)
        chex.assert_shape(algorithm.adapted_predict(after, batch, query),
                          (len(COHORT), NUM_EXAMPLES, NUM_CLASSES))


def test_a_padded_client_changes_nothing(built):
    name, _, state, round_fn, after = built
    # Client 1 rides along as padding: the result equals the round without it, and its
    # per-client state row (if any) is untouched.
    padded = round_fn(state, _batch((0, 2, 1, 3, 5), padded=(1,)))
    assert_states_close(name, _without_metrics(padded), _without_metrics(after), rtol=2e-5,
                        atol=1e-5)
    client_states = getattr(state, "client_states", ())
    if jax.tree.leaves(client_states):
        row = lambda s: jax.tree.map(lambda leaf: leaf[1], s.client_states)
        chex.assert_trees_all_equal(row(state), row(padded))


def test_checkpoint_restores_the_state_bit_for_bit(built, tmp_path):
    _, _, state, round_fn, after = built
    checkpoint.save(str(tmp_path), after, [], [])
    restored = checkpoint.load_latest(str(tmp_path), state).state
    chex.assert_trees_all_equal(restored, after)
    batch = _batch((1, 2, 4, 5), 1)
    chex.assert_trees_all_equal(round_fn(restored, batch), round_fn(after, batch))


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_config_round_trips_through_its_file(name, tmp_path):
    spec = REGISTRY[name]
    model = "split_mlp" if spec.model_kind == "split" else "mlp"
    config = run_config.config_from_dict({"algorithm": {"name": name}, "model": {"name": model},
                                          "run": {"rounds": 3}})
    path = tmp_path / "config.json"
    path.write_text(__import__("json").dumps(config.to_dict()))
    assert run_config.load_config(str(path)) == config
    assert options.from_dict(spec.config, options.to_dict(spec.config())) == spec.config()
    assert dataclasses.is_dataclass(spec.config) and spec.config.__dataclass_params__.frozen


def test_replace_paths_sets_nested_options_and_names_unknown_ones():
    config = REGISTRY["fedprox"].config()
    traced = jnp.float32(0.5)
    replaced = options.replace_paths(config, {"client.lr": traced, "mu": 0.1})
    assert replaced.client.lr is traced and replaced.mu == 0.1
    assert replaced.client.epochs == config.client.epochs and config.client.lr == 0.01
    with pytest.raises(options.OptionError, match=r"^client\.rate=.*unknown option; allowed: lr"):
        options.replace_paths(config, {"client.rate": 0.1})
    with pytest.raises(options.OptionError, match=r"^mu\.x=.*mu has no sub-options"):
        options.replace_paths(config, {"mu.x": 0.1})


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
