"""Smoke test of the q-FFL fairness experiment (experiments/qffl_fairness.py)."""

import json

import numpy as np
import pytest

from experiments.claims import verdict
from experiments.qffl_fairness import CLAIMS, SETTINGS, config_for, fairness, method_name, run
from fedjax_lab.algorithms import get_algorithm
from fedjax_lab.options import OptionError, from_dict, to_dict


def test_fairness_numbers_of_ten_clients():
    accuracies = [0.1 * k for k in range(10)] + [None]
    numbers = fairness(accuracies)
    assert numbers["mean"] == pytest.approx(0.45)
    assert numbers["worst10"] == pytest.approx(0.0) and numbers["best10"] == pytest.approx(0.9)
    assert numbers["variance"] == pytest.approx(np.var([0.1 * k for k in range(10)]))
    assert numbers["std"] ** 2 == pytest.approx(numbers["variance"])


def test_smoke_run_writes_results_claims_and_figure(tmp_path):
    returned = run(rounds=2, seeds=[0], output=str(tmp_path), q_grid=(1.0,), eval_every=1)
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    assert results == json.loads(json.dumps(returned))
    settings = results["settings"]
    assert settings["rounds"] == 2 and settings["seeds"] == [0]
    assert settings["q_grid"] == [0.0, 1.0]
    assert set(results["methods"]) == {method_name(0.0), method_name(1.0), "fedavg"}
    for name, record in results["methods"].items():
        # Each method is its registry entry's config, changed only by the options given.
        config = record["config"]
        overrides = {key: value for key, value in config.items() if key != "name"}
        expected = to_dict(from_dict(get_algorithm(config["name"]).config, overrides,
                                     "algorithm."))
        built = config_for(config, 2, 0, settings)
        assert to_dict(built.algorithm.options) == expected
        assert expected["client"]["lr"] == settings["client_learning_rate"]
        if config["name"] == "qffl":
            assert expected["q"] == float(name.removeprefix("qffl_q"))
            assert expected["lipschitz"] is None
        run_0 = record["runs"]["0"]
        assert run_0["rounds"] == [1, 2]
        assert len(run_0["client_accuracies"]) == SETTINGS["num_clients"]
        assert set(record["summary"]) == {"mean", "std", "variance", "worst10", "best10"}
        summary = record["summary"]
        assert 0.0 <= summary["worst10"]["mean"] <= summary["mean"]["mean"] <= 1.0
        assert summary["mean"]["std"] == 0.0
    # q = 0 is uniform FedAvg: its server step is never shortened.
    assert results["methods"][method_name(0.0)]["runs"]["0"]["step_scale"] == [1.0, 1.0]
    for claim in CLAIMS:
        measured = claim.measure(results)
        assert measured.numbers and len(measured.checks) == 3
        assert verdict(measured.checks).startswith("**")
    with open(tmp_path / "qffl_fairness.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_wrong_option_fails_before_anything_runs():
    with pytest.raises(OptionError, match="q"):
        config_for({"name": "qffl", "q": -1.0}, 1, 0, SETTINGS)
