"""Stacked runs: the configs' values and keys in order, one compiled program per structure, one
evaluation per run, and configs of two structures refused with the config that differs."""

import jax
import numpy as np
import pytest

from fedjax_lab import options
from fedjax_lab import config as run_config
from fedjax_lab.core.types import experiment_key
from fedjax_lab.stacked import StackedRuns

BASE = {"algorithm": {"name": "fedprox"}, "data": {"name": "digits", "num_clients": 8},
        "model": {"name": "logistic"}, "run": {"rounds": 2, "cohort_size": 4, "data_seed": 0}}


def _configs(*changes) -> list[run_config.Config]:
    return [run_config.config_from_dict(options.merge(BASE, change)) for change in changes]


def _points(points) -> list[run_config.Config]:
    return _configs(*[{"algorithm": {"mu": mu}, "run": {"seed": seed}} for mu, seed in points])


def test_runs_share_one_program_whatever_their_seeds_and_values():
    configs = _points([(0.0, 0), (0.5, 1), (1.0, 2)])
    dataset = run_config.load_data(configs[0])
    runs = StackedRuns(configs, dataset)
    np.testing.assert_array_equal(runs.hyperparameters["mu"], [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(
        jax.random.key_data(runs.keys),
        jax.random.key_data(jax.numpy.stack([experiment_key(seed) for seed in (0, 1, 2)])))
    population = jax.device_put(dataset.train.pad())
    states, metrics = runs.advance(runs.init(), population, 2)
    assert np.asarray(metrics["train_loss"]).shape == (3, 2)
    np.testing.assert_array_equal(states.round, [2, 2, 2])
    evaluations = runs.evaluator(dataset.test.pad())(states, per_client=True)
    assert len(evaluations) == 3
    assert all(len(e["client_accuracies"]) == dataset.test.num_clients for e in evaluations)
    # Other seeds and values of the same structure reuse the compiled block.
    compiled_blocks = runs._block._cache_size()
    others = StackedRuns(_points([(0.1, 5), (2.0, 6), (0.0, 7)]), dataset)
    assert others._block is runs._block
    others.advance(others.init(), population, 2)
    assert runs._block._cache_size() == compiled_blocks


@pytest.mark.parametrize("change", [{"algorithm": {"client": {"epochs": 2}}},
                                    {"run": {"cohort_size": 2}},
                                    {"algorithm": {"name": "fedavg"}}],
                         ids=["epochs", "cohort_size", "algorithm"])
def test_configs_of_two_structures_are_refused(change):
    configs = _configs({}, {"run": {"seed": 1}}, change)
    dataset = run_config.load_data(configs[0])
    with pytest.raises(ValueError, match="one structure.*config 2"):
        StackedRuns(configs, dataset)


def test_no_configs_are_refused():
    with pytest.raises(ValueError, match="at least one config"):
        StackedRuns([], None)
