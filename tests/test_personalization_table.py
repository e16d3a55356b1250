"""Smoke test of the personalisation table (experiments/personalization_table.py)."""

import json

import pytest

from experiments.claims import verdict
from experiments.personalization_table import CLAIMS, METHODS, config_for, run
from fedjax_lab.algorithms import get_algorithm
from fedjax_lab.options import OptionError, from_dict, to_dict

SUMMARY_KEYS = {"mean", "worst10", "p10", "pooled"}


def test_smoke_run_writes_the_table_claims_and_figure(tmp_path):
    methods = ("fedavg", "fedavg_ft", "local", "fedper")
    settings = {"num_clients": 6, "cohort_size": 3, "hidden": (16, 8), "fine_tuning_epochs": 1}
    returned = run(rounds=1, seeds=[0, 1], output=str(tmp_path), methods=methods,
                   settings=settings)
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    assert results == json.loads(json.dumps(returned))
    assert results["settings"]["rounds"] == 1 and results["settings"]["seeds"] == [0, 1]
    assert set(results["methods"]) == set(methods)
    for method, record in results["methods"].items():
        name, overrides, view = METHODS[method]
        assert record["view"] == view
        # Each row is its registry entry's config, changed only by the options given.
        config = record["config"]
        assert config == {"name": name, **overrides}
        built = config_for(config, 1, 0, results["settings"])
        expected = to_dict(from_dict(get_algorithm(name).config, overrides, "algorithm."))
        assert to_dict(built.algorithm.options) == expected
        assert set(record["runs"]) == {"0", "1"}
        assert set(record["summary"]) == SUMMARY_KEYS
        for scores in record["runs"].values():
            assert all(0.0 <= scores[key] <= 1.0 for key in SUMMARY_KEYS)
            assert scores["worst10"] <= scores["mean"]
    assert results["methods"]["local"]["config"] == {"name": "ditto", "lam": 0.0}
    for claim in CLAIMS:
        measured = claim.measure(results)
        assert measured.numbers and measured.checks
        # The rows keep METHODS' order (results.json sorts its keys); FedPer is the one
        # personalised method here, checked against FedAvg's global model.
        assert measured.numbers[0].index("FedAvg [global]") < measured.numbers[0].index("FedPer")
        assert [check.text for check in measured.checks] == [
            "FedPer: mean > FedAvg's global model's"]
        assert verdict(measured.checks).startswith("**")
    with open(tmp_path / "personalization_table.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_unknown_method_and_wrong_option_fail_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="unknown methods"):
        run(rounds=1, seeds=[0], output=str(tmp_path), methods=("fedavg", "nope"))
    settings = {"num_clients": 20, "shards_per_client": 2, "cohort_size": 10, "data_seed": 0,
                "model": "split_mlp", "hidden": (64, 32), "test_fraction": 0.2}
    with pytest.raises(OptionError, match="lr"):
        config_for({"name": "fedper", "client": {"lr": -1.0}}, 1, 0, settings)
