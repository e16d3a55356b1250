"""Stacked runs: runs of one structure advanced as one compiled program over a leading run axis.

Configs that differ only in their traced hyperparameters (the options a config marks sweepable:
learning rates, mu, q, lambda, ...; `config.traced_algorithm`) and in their seed share one
builder, so their whole runs (server state, client states, metrics, evaluations) can be stacked
along a leading run axis `[P]` and advanced together: `compiled.device_rounds` `vmap`ped over the
runs, jitted once per structure (`compiled.per_structure`) and reused by every sweep chunk and
experiment of that structure whatever their seeds and values (a new number of runs, or of rounds
per call, is a new shape and compiles once more). A sweep (`fedjax_lab.sweep`) runs its grid
points this way, experiments their seeds and method grids. Each stacked run is the run its config
makes alone (`config.run`: the same keys, cohorts and hyperparameters) to float32 rounding, and
bit for bit when it is stacked alone (`tests/test_sweep.py` checks both).

    runs = StackedRuns(configs, dataset)
    population = jax.device_put(dataset.train.pad())
    evaluate = runs.evaluator(dataset.test.pad(), train_clients=dataset.train.pad())
    states, metrics = runs.advance(runs.init(), population, 10)   # metrics: leaves [P, 10]
    evaluations = evaluate(states)                                  # one dict per run
"""

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from fedjax_lab import compiled
from fedjax_lab import config as run_config
from fedjax_lab.compiled import PyTree
from fedjax_lab.core.types import experiment_key, init_key
from fedjax_lab.evaluation import make_sweep_evaluator


class StackedRuns:
    """Runs of one structure stacked along a leading run axis `[P]`, in the configs' order.

    Attributes:
        build: the structure's builder (`compiled.TracedAlgorithm.build`), shared by the runs.
        hyperparameters: `{dotted algorithm option: [P] array}`, each run's traced values.
        keys: `[P]` experiment keys, one per run from its `run.seed`.
    """

    def __init__(self, configs: Sequence[run_config.Config], dataset):
        """`configs`: validated run configs that differ only in traced options and the seed;
        `dataset`: the data they share (`config.load_data`)."""
        if not configs:
            raise ValueError("StackedRuns needs at least one config")
        # DP noise is calibrated as a single run's is; the ε a single run records is the
        # caller's to write (`fedjax_lab.sweep` writes it into each point's files).
        configs = [run_config.private_run(config, dataset)[0] for config in configs]
        traced = [run_config.traced_algorithm(config, dataset.info()) for config in configs]
        first = configs[0]
        for index, (config, algorithm) in enumerate(zip(configs, traced)):
            if (algorithm.build is not traced[0].build
                    or config.run.cohort_size != first.run.cohort_size):
                raise ValueError(
                    f"StackedRuns needs configs of one structure (differing only in traced "
                    f"options and the seed); config {index} ({config.algorithm.name}, seed "
                    f"{config.run.seed}) makes another program than config 0 "
                    f"({first.algorithm.name}, seed {first.run.seed})")
        self.build = traced[0].build
        self.hyperparameters = _stack([algorithm.hyperparameters for algorithm in traced])
        self.keys = jnp.stack([experiment_key(config.run.seed) for config in configs])
        # The evaluators build the first run's algorithm only to see which views it has.
        self._first = traced[0]
        self._block = _stacked_block(self.build, dataset.train.num_clients,
                                     first.run.cohort_size)
        # One run goes through the single run's own program, so the two agree bit for bit.
        self._alone = (compiled.device_block(self.build, dataset.train.num_clients,
                                             first.run.cohort_size) if len(configs) == 1 else None)

    def init(self) -> PyTree:
        """The runs' initial states, stacked."""
        init = lambda values, key: self.build(values).init(init_key(key))
        return jax.vmap(init)(self.hyperparameters, self.keys)

    def advance(self, states: PyTree, population, num_rounds: int) -> tuple[PyTree, dict]:
        """`num_rounds` more rounds of every run, cohorts drawn from the padded `population` on
        the device; returns (states, metrics with leaves `[P, num_rounds]`). `states` is donated
        (do not use it again); each `num_rounds` compiles once per structure."""
        if self._alone is not None:
            state, key, values = compiled.only_run((states, self.keys, self.hyperparameters))
            return compiled.as_run_axis(self._alone(state, population, key, values, num_rounds))
        return self._block(states, population, self.keys, self.hyperparameters, num_rounds)

    def lower(self, states: PyTree, population, num_rounds: int) -> jax.stages.Lowered:
        """`advance`'s program lowered, for XLA's memory analysis of its compiled form."""
        if self._alone is not None:
            state, key, values = compiled.only_run((states, self.keys, self.hyperparameters))
            return self._alone.lower(state, population, key, values, num_rounds)
        return self._block.lower(states, population, self.keys, self.hyperparameters,
                                 num_rounds)

    def evaluator(self, clients, *, train_clients=None) -> Callable[..., list[dict]]:
        """`evaluate(states, per_client=False) -> [evaluation per run]` on the padded `clients`
        (`evaluation.make_sweep_evaluator`); with `train_clients`, the same clients' training
        splits, an algorithm that adapts also reports its adapted view."""
        evaluate = make_sweep_evaluator(self._first, clients, train_clients=train_clients)
        return functools.partial(evaluate, keys=self.keys, hyperparameters=self.hyperparameters)


@compiled.per_structure
def _stacked_block(build, num_clients: int, cohort_size: int):
    rounds = compiled.device_rounds(build, num_clients, cohort_size)

    def run(states, population, keys, hyperparameters, num_rounds):
        one = lambda state, key, values: rounds(state, population, key, values, num_rounds)
        return jax.vmap(one)(states, keys, hyperparameters)

    return jax.jit(run, static_argnums=4, donate_argnums=0)


def _stack(trees):
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)
