"""The run loop, its output files, determinism, and the validated configuration (Python side)."""

import json
import os

import numpy as np
import optax
import pytest

from common import assert_trees_equal, small_digits_config
from fedjax_lab.algorithms import fedavg
from fedjax_lab.config import run
from fedjax_lab.data import digits
from fedjax_lab.evaluation import summarize
from fedjax_lab.experiment import run_experiment
from fedjax_lab.models import logistic_regression

def _small_run(**dotted):
    return run(small_digits_config(**dotted), progress=False)


def test_same_seed_same_run_and_another_seed_differs():
    a, b = _small_run(**{"run.seed": 3}), _small_run(**{"run.seed": 3})
    assert_trees_equal(a.state.params, b.state.params)
    assert a.history == b.history and a.evaluations == b.evaluations
    c = _small_run(**{"run.seed": 4})
    assert c.history != a.history


def test_outputs_are_written_and_an_existing_run_is_never_overwritten(tmp_path):
    out = str(tmp_path / "run")
    result = _small_run(**{"run.output": out})
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [row["round"] for row in rows] == [1, 2, 3, 4, 5]
    with open(os.path.join(out, "evaluations.jsonl")) as f:
        assert [json.loads(line)["round"] for line in f] == [2, 4, 5]
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["final"]["test"]["accuracy"] == result.summary["final"]["test"]["accuracy"]
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["run"]["rounds"] == 5
    before = _snapshot(out)
    with pytest.raises(FileExistsError, match="already holds results"):
        _small_run(**{"run.output": out})
    assert _snapshot(out) == before


def _snapshot(folder):
    """Every file under `folder` with its bytes."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                files[os.path.relpath(os.path.join(root, name), folder)] = f.read()
    return files


def test_training_improves_accuracy_on_digits():
    result = _small_run(**{"run.rounds": 30, "algorithm.client.epochs": 2, "run.eval_every": 30,
                           "algorithm.client.lr": 0.1})
    assert result.summary["final"]["test"]["accuracy"] > 0.8


def test_scan_blocks_do_not_change_the_trajectory():
    dataset = digits(6, seed=1)
    algorithm = fedavg(logistic_regression(dataset.feature_shape, 10), optax.sgd(0.1))
    one = run_experiment(algorithm, dataset, num_rounds=6, cohort_size=3, eval_every=6,
                         progress=False)
    many = run_experiment(algorithm, dataset, num_rounds=6, cohort_size=3, eval_every=4,
                          progress=False)
    assert_trees_equal(one.state.params, many.state.params)
    assert one.history == many.history


def test_an_init_that_puts_one_array_in_two_leaves_still_runs():
    """The rounds take the state donated, which XLA refuses for one buffer passed twice."""
    dataset = digits(6, seed=1)
    algorithm = fedavg(logistic_regression(dataset.feature_shape, 10), optax.sgd(0.1))

    def init(key):
        state = algorithm.init(key)
        return state._replace(metrics=dict(state.metrics, bytes_down=state.metrics["bytes_up"]))

    aliased = run_experiment(algorithm._replace(init=init), dataset, num_rounds=2, cohort_size=3,
                             eval_every=2, progress=False)
    plain = run_experiment(algorithm, dataset, num_rounds=2, cohort_size=3, eval_every=2,
                           progress=False)
    assert_trees_equal(aliased.state.params, plain.state.params)


def test_summary_of_per_client_scores():
    metrics = summarize(np.array([1, 3, 0, 9]), np.array([2.0, 1.0, 0.0, 3.0]),
                        np.array([2, 4, 0, 10]))
    assert metrics["accuracy"] == pytest.approx(13 / 16)
    assert metrics["loss"] == pytest.approx(6 / 16)
    assert metrics["client_accuracy_mean"] == pytest.approx((0.5 + 0.75 + 0.9) / 3)
    assert metrics["client_accuracy_min"] == 0.5
    assert metrics["client_accuracy_p10"] == pytest.approx(0.55)
    assert metrics["num_clients"] == 3


def test_host_fed_population_gives_the_same_run_as_the_device_population():
    dataset = digits(7, partition="dirichlet", seed=2)
    algorithm = fedavg(logistic_regression(dataset.feature_shape, 10), optax.sgd(0.1))
    runs = [run_experiment(algorithm, dataset, num_rounds=5, cohort_size=3, eval_every=2,
                           progress=False, population_on_device=on_device)
            for on_device in (True, False)]
    assert_trees_equal(runs[0].state.params, runs[1].state.params)
    assert runs[0].history == runs[1].history


def test_the_finiteness_check_looks_at_every_float_leaf_and_only_those():
    from fedjax_lab.experiment import all_finite
    state = {"params": {"w": np.ones((3, 2), np.float32), "b": np.zeros(2, np.float32)},
             "round": np.int32(4), "count": np.arange(3)}
    assert bool(all_finite(state))
    for bad in (np.nan, np.inf, -np.inf):
        broken = {**state, "params": {**state["params"], "b": np.array([0.0, bad], np.float32)}}
        assert not bool(all_finite(broken))
    assert bool(all_finite({"round": np.int32(1)}))
