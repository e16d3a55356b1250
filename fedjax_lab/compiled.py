"""Compiled programs made once per structure and reused by every seed and hyperparameter value.

`jax.jit` compiles once per (function object, argument shapes and dtypes). So the functions the
run loop and the evaluators jit are made once per *structure* (the algorithm's builder, the
population and cohort sizes; `functools.lru_cache`), and everything that varies between runs of
one structure is an argument: the experiment key, the round (inside the state) and the numeric
hyperparameters. A `TracedAlgorithm` is an algorithm built inside the compiled program from
traced hyperparameters (`fedjax_lab.config.traced_algorithm` makes one from a registry config),
which is also what lets a sweep `vmap` whole runs over a leading run axis (`fedjax_lab.sweep`).

A plain `Algorithm` is the special case with no hyperparameters: the same object gives the same
builder, hence the same compiled program for every seed.
"""

import functools
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_lab.core import sharding
from fedjax_lab.core.types import Algorithm
from fedjax_lab.data.sampling import cohort_batch, sample_cohort

PyTree = Any
# Structures kept compiled at once; the least recently used one is dropped beyond this.
CACHED_STRUCTURES = 64


class TracedAlgorithm(NamedTuple):
    """An algorithm whose numeric hyperparameters are arguments of the compiled program.

    Attributes:
        build: `build(hyperparameters) -> Algorithm`, pure; the same object for every run of one
            structure, so that programs compiled for it are reused.
        hyperparameters: `{dotted option: 0-d array}` (a leading run axis in a sweep).
    """

    build: Callable[[Mapping[str, jax.Array]], Algorithm]
    hyperparameters: Mapping[str, jax.Array]


def per_structure(make: Callable) -> Callable:
    """`make` memoised on its arguments (the structure), so that what it returns, and the
    programs jitted from it, are made once; unhashable arguments are made afresh (correct, only
    compiled again)."""
    cached = functools.lru_cache(maxsize=CACHED_STRUCTURES)(make)

    @functools.wraps(make)
    def made(*args):
        try:
            hash(args)
        except TypeError:
            return make(*args)
        return cached(*args)

    return made


@per_structure
def _constant_builder(algorithm: Algorithm) -> Callable:
    return lambda hyperparameters: algorithm


def as_traced(algorithm: Algorithm | TracedAlgorithm) -> TracedAlgorithm:
    """`algorithm` as a `TracedAlgorithm` (a plain one has no hyperparameters)."""
    if isinstance(algorithm, TracedAlgorithm):
        return algorithm
    return TracedAlgorithm(_constant_builder(algorithm), {})


def only_run(stacked: PyTree) -> PyTree:
    """The run of a run axis of one, as its own arrays, for the single run's own compiled
    programs. Programs that squeezed the axis inside them or `vmap`ped over it rounded otherwise
    at XLA's full optimisation (FedAdam's state; FedAdam's, FedYogi's, APFL's and FedMeta's
    evaluation losses), and the `vmap` ran the default job's 200 rounds 1.8x slower on CPU."""
    return jax.tree.map(lambda leaf: leaf[0], stacked)


def as_run_axis(single: PyTree) -> PyTree:
    """`single` with a leading run axis of one, `only_run`'s inverse."""
    return jax.tree.map(lambda leaf: leaf[None], single)


@per_structure
def on_mesh(build: Callable, mesh: jax.sharding.Mesh) -> Callable:
    """`build` whose algorithms keep their state on `mesh` (`sharding.on_mesh`)."""
    return lambda hyperparameters: sharding.on_mesh(build(hyperparameters), mesh)


@per_structure
def device_rounds(build: Callable, num_clients: int, cohort_size: int) -> Callable:
    """`rounds(state, population, key, hyperparameters, num_rounds) -> (state, metrics)`, not
    jitted: `num_rounds` rounds scanned, each sampling and gathering its cohort from the padded
    `population` on the device. The single run jits it, a sweep jits its `vmap`."""

    def one_round(population, key, algorithm, state, _):
        ids = (algorithm.cohorts or sample_cohort)(key, state.round, num_clients, cohort_size)
        state = algorithm.round(state, cohort_batch(population, ids, key, state.round))
        return state, state.metrics

    def rounds(state, population, key, hyperparameters, num_rounds):
        step = functools.partial(one_round, population, key, build(hyperparameters))
        return jax.lax.scan(step, state, None, length=num_rounds)

    return rounds


@per_structure
def device_block(build: Callable, num_clients: int, cohort_size: int) -> Callable:
    """`device_rounds` jitted (the state is donated; `num_rounds` is static)."""
    return jax.jit(device_rounds(build, num_clients, cohort_size), static_argnums=4,
                   donate_argnums=0)


@per_structure
def host_block(build: Callable) -> Callable:
    """`run(state, batches, hyperparameters) -> (state, metrics)`, one jit scanning a block of
    host-gathered rounds (`data.stream.HostCohortStream.block`, whose batches carry the keys)."""

    def run(state, batches, hyperparameters):
        algorithm = build(hyperparameters)

        def one_round(state, batch):
            state = algorithm.round(state, batch)
            return state, state.metrics

        return jax.lax.scan(one_round, state, batches)

    return jax.jit(run, donate_argnums=0)


# Time JAX spends making programs: tracing, lowering and compiling (or reading the persistent
# compilation cache).
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_compile_seconds = [0.0]


def _count_compile_time(event: str, seconds: float, **_) -> None:
    if event in _COMPILE_EVENTS:
        _compile_seconds[0] += seconds


jax.monitoring.register_event_duration_secs_listener(_count_compile_time)


def compile_seconds() -> float:
    """Seconds this process has spent tracing, lowering and compiling programs so far."""
    return _compile_seconds[0]


def built(algorithm: Algorithm | TracedAlgorithm) -> Algorithm:
    """`algorithm` built at its hyperparameters' values, for eager use and for code that takes
    an `Algorithm` (jitted, the values are then constants of the program)."""
    traced = as_traced(algorithm)
    return traced.build(traced.hyperparameters)


def init_state(traced: TracedAlgorithm, key: jax.Array) -> PyTree:
    """The initial state, computed eagerly as a plain `algorithm.init(key)` is, with no buffer
    shared between two leaves (an eager `init` may put one array in two places, which the
    compiled rounds could not take as donated). Not jitted: compiled, an init's initialisers
    fuse differently per algorithm, and Ditto's global model would start a rounding away from
    FedAvg's instead of bit for bit."""
    return _unaliased(built(traced).init(key))


def _unaliased(tree: PyTree) -> PyTree:
    seen = set()

    def own_buffer(leaf):
        if not isinstance(leaf, jax.Array):
            return leaf
        if id(leaf) in seen:
            return jnp.copy(leaf)
        seen.add(id(leaf))
        return leaf

    return jax.tree.map(own_buffer, tree)


def metric_shapes(traced: TracedAlgorithm) -> dict:
    """The shapes of the metrics every round reports, without running anything (traced once
    per structure)."""
    shapes = tuple(sorted((path, jnp.shape(value), jnp.result_type(value))
                          for path, value in traced.hyperparameters.items()))
    return _metric_shapes(traced.build, shapes)


@per_structure
def _metric_shapes(build: Callable, hyperparameter_shapes: tuple) -> dict:
    hyperparameters = {path: jax.ShapeDtypeStruct(shape, dtype)
                       for path, shape, dtype in hyperparameter_shapes}
    return jax.eval_shape(lambda values, key: build(values).init(key), hyperparameters,
                          jax.random.key(0)).metrics
