"""Small hand-built clients shared by the engine and algorithm tests, and the comparison of two
algorithm states that knows which leaves are rounding noise."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.algorithms import REGISTRY
from fedjax_lab.core import ClientBatch, client_keys, experiment_key
from fedjax_lab.models import logistic_regression

NUM_FEATURES = 5
NUM_CLASSES = 3


def make_clients(sizes, *, padded_length=None, seed=0, dtype=np.float32):
    """Ragged clients as numpy lists: x_i [n_i, NUM_FEATURES], y_i [n_i]."""
    rng = np.random.default_rng(seed)
    xs = [rng.normal(size=(n, NUM_FEATURES)).astype(dtype) for n in sizes]
    ys = [rng.integers(0, NUM_CLASSES, size=n).astype(np.int32) for n in sizes]
    return xs, ys


def stack_clients(xs, ys, padded_length=None, *, round_index=0, seed=0, client_ids=None):
    """A `ClientBatch` of the given ragged clients, padded to `padded_length`."""
    sizes = [len(y) for y in ys]
    padded_length = padded_length or max(max(sizes), 1)
    num = len(xs)
    x = np.zeros((num, padded_length, NUM_FEATURES), xs[0].dtype)
    y = np.zeros((num, padded_length), np.int32)
    mask = np.zeros((num, padded_length), bool)
    for i, (xi, yi) in enumerate(zip(xs, ys)):
        x[i, :len(yi)], y[i, :len(yi)], mask[i, :len(yi)] = xi, yi, True
    ids = jnp.arange(num, dtype=jnp.int32) if client_ids is None else jnp.asarray(client_ids)
    return ClientBatch(x=jnp.asarray(x), y=jnp.asarray(y), mask=jnp.asarray(mask),
                       num_examples=jnp.asarray(sizes, jnp.int32), client_ids=ids,
                       rng=client_keys(experiment_key(seed), round_index, ids))


def small_model():
    return logistic_regression((NUM_FEATURES,), NUM_CLASSES)


def float64_params(model, seed=0):
    """The model's initial parameters in float64 (call inside `jax.enable_x64`)."""
    return jax.tree.map(lambda p: p.astype(jnp.float64), model.init(jax.random.key(seed)))


# Bit-for-bit equality of two pytrees.
assert_trees_equal = chex.assert_trees_all_equal


def assert_trees_close(a, b, rtol=1e-12, atol=1e-12):
    """Closeness at the float64 tolerances the exactness tests claim."""
    chex.assert_trees_all_close(a, b, rtol=rtol, atol=atol)


def run_config(**dotted):
    """A validated run `Config` from dotted options: `run_config(**{"run.rounds": 5})`."""
    from fedjax_lab import options
    from fedjax_lab.config import config_from_dict

    mapping = {}
    for path, value in dotted.items():
        mapping = options.merge(mapping, options.nest(path, value))
    return config_from_dict(mapping)


def small_digits_config(**dotted):
    """FedAvg with logistic regression on 8 digits clients, 5 rounds of 4: a quick real run."""
    options = {"data.name": "digits", "data.num_clients": 8, "model.name": "logistic",
               "algorithm.client.epochs": 1, "run.rounds": 5, "run.cohort_size": 4,
               "run.eval_every": 2}
    options.update(dotted)
    return run_config(**options)


# Leaves whose change is pure rounding: FedGen's generator has a bias just before BatchNorm, which
# cancels it, and Adam scales that bias's rounding-noise gradient to steps of up to its rate; the
# BatchNorm's running mean includes it. Two computations that sum in another order (vmapped or
# not, a padded client or not) differ there by up to generator.steps * generator.lr (measured:
# 2.6e-5 and 3.2e-6 after one round).
NOISE_ONLY = {"fedgen": (("generator", "params", "Dense_0", "bias"),
                         ("generator", "batch_stats", "BatchNorm_0", "mean"))}


def assert_states_close(name: str, a, b, *, rtol: float, atol: float) -> None:
    """Algorithm `name`'s states `a` and `b` within (rtol, atol), its `NOISE_ONLY` leaves within
    the steps Adam may take on rounding noise."""
    a, b = _state_dict(a), _state_dict(b)
    for *group, leaf in NOISE_ONLY.get(name, ()):
        generator = REGISTRY[name].config().generator
        noisy = [functools.reduce(dict.get, group, tree).pop(leaf) for tree in (a, b)]
        chex.assert_trees_all_close(*noisy, rtol=0, atol=generator.steps * generator.lr)
    chex.assert_trees_all_close(a, b, rtol=rtol, atol=atol)


def _state_dict(state):
    """A state as nested plain dicts (named tuples by field), so a leaf can be set aside."""
    if hasattr(state, "_asdict"):
        state = state._asdict()
    if isinstance(state, dict):
        return {key: _state_dict(value) for key, value in state.items()}
    return state
