"""Smoke test of the SCAFFOLD client-drift experiment (experiments/scaffold_drift.py)."""

import json

import pytest

from experiments.claims import verdict
from experiments.scaffold_drift import (CLAIMS, METHODS, PARTITIONS, config_for,
                                        rounds_to_target, run)
from fedjax_lab.algorithms import get_algorithm
from fedjax_lab.options import OptionError, from_dict, to_dict

SUMMARY_KEYS = {"rounds_to_target", "final_train_loss", "final_test_accuracy"}


def test_rounds_to_target_is_the_first_round_at_or_below_it():
    assert rounds_to_target([1.0, 0.5, 0.2, 0.1], 0.2) == 3
    assert rounds_to_target([1.0, float("nan"), 0.3], 0.2) is None


def test_smoke_run_writes_results_claims_and_figure(tmp_path):
    returned = run(rounds=2, seeds=[0], output=str(tmp_path), epochs=1, lr_grid=(0.5,),
                   mu_grid=(0.1,))
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    assert results == json.loads(json.dumps(returned))
    settings = results["settings"]
    assert settings["rounds"] == 2 and settings["seeds"] == [0]
    assert settings["client_learning_rate"] == 0.5
    assert set(results["partitions"]) == set(PARTITIONS)
    for partition, entry in results["partitions"].items():
        assert entry["best_mu"] == 0.1
        assert tuple(entry["methods"]) == METHODS
        for method, record in entry["methods"].items():
            # Each method is its registry entry's config, changed only by the options given.
            config = record["config"]
            assert config["name"] == method
            overrides = {key: value for key, value in config.items() if key != "name"}
            spec = get_algorithm(method)
            expected = to_dict(from_dict(spec.config, overrides, "algorithm."))
            built = config_for(config, partition, 2, 0, settings)
            assert built.algorithm.name == method
            assert to_dict(built.algorithm.options) == expected
            assert expected["client"]["lr"] == 0.5 and expected["client"]["epochs"] == 1
            run_0 = record["runs"]["0"]
            assert len(run_0["train_loss"]) == len(run_0["test_accuracy"]) == 2
            assert all(0.0 <= a <= 1.0 for a in run_0["test_accuracy"])
            assert all(loss > 0 for loss in run_0["train_loss"])
            assert set(record["summary"]) == SUMMARY_KEYS
            assert set(record["summary"]["rounds_to_target"]) == {"0.2", "0.1"}
            assert record["summary"]["final_test_accuracy"]["std"] == 0.0
    for claim in CLAIMS:
        measured = claim.measure(results)
        assert measured.numbers and measured.checks
        assert verdict(measured.checks).startswith("**")
    with open(tmp_path / "scaffold_drift.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_wrong_option_fails_before_anything_runs():
    settings = {"num_clients": 50, "cohort_size": 10, "data_seed": 0, "model": "logistic"}
    with pytest.raises(OptionError, match="lr"):
        config_for({"name": "scaffold", "client": {"lr": -1.0}}, "iid", 1, 0, settings)
