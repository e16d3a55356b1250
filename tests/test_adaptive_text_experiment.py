"""Smoke test of the adaptive-server-optimiser text experiment (experiments/adaptive_text.py)."""

import copy
import json

import pytest

from experiments.adaptive_text import (CLAIMS, METHODS, best_point, config_for, rounds_to_target,
                                       rule, run, task_data)
from experiments.claims import verdict
from fedjax_lab.algorithms import get_algorithm
from fedjax_lab.options import OptionError, from_dict, to_dict

TINY = dict(rounds=2, seeds=[1], tune_seed=0, client_lr_grid=(0.5,),
            server_lr_grids={"fedavg": (1.0,), "fedadam": (0.03,), "fedyogi": (0.03,)},
            model={"name": "bigram", "embed": 4},
            dialects={"num_clients": 6, "mean_sequences": 4.0, "sequence_length": 8})


def _leaf_shakespeare(root, users=("r1", "r2", "r3", "r4", "r5")):
    line = ("To be, or not to be: that is the question. Whether 'tis nobler in the mind "
            "to suffer the slings and arrows of outrageous fortune")

    def examples(offset, n):
        return {"x": [line[offset + i:offset + i + 80] for i in range(n)],
                "y": [line[offset + i + 80] for i in range(n)]}

    for split, n in (("train", 3), ("test", 1)):
        content = {"users": list(users), "num_samples": [n] * len(users),
                   "user_data": {u: examples(k, n) for k, u in enumerate(users)}}
        (root / split).mkdir(parents=True)
        (root / split / "all.json").write_text(json.dumps(content))
    return str(root)


def test_rounds_to_target_is_the_first_round_at_or_above_it():
    assert rounds_to_target([0.1, 0.2, 0.25, 0.3], 0.25) == 3
    assert rounds_to_target([0.1, float("nan"), 0.2], 0.25) is None


def test_best_point_fewest_rounds_then_tail_accuracy():
    runs = [{"client_lr": 1.0, "server_lr": 1.0, "test_accuracy": [0.1, 0.3, 0.3]},
            {"client_lr": 3.0, "server_lr": 1.0, "test_accuracy": [0.3, 0.3, 0.3]},
            {"client_lr": 10.0, "server_lr": 1.0, "test_accuracy": [0.3, 0.3, 0.4]}]
    # lr 3 and 10 both reach 0.25 at round 1; lr 10 ends higher over the last rounds.
    assert best_point(runs, 3, 0.25) == {"client_lr": 10.0, "server_lr": 1.0}
    # Diverged runs (shorter curves) lose ties.
    runs[2]["test_accuracy"] = [0.3]
    assert best_point(runs, 3, 0.25) == {"client_lr": 3.0, "server_lr": 1.0}


def test_smoke_run_writes_results_claims_and_figure(tmp_path):
    returned = run(output=str(tmp_path), **TINY)
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    assert results == json.loads(json.dumps(returned))
    settings = results["settings"]
    assert settings["rounds"] == 2 and settings["seeds"] == [1] and settings["tune_seed"] == 0
    entry = results["tasks"]["dialects"]
    assert set(entry["methods"]) == set(METHODS)
    for method, record in entry["methods"].items():
        # Each method is its registry preset, changed only by the options given.
        config = record["config"]
        assert config["name"] == method
        overrides = {key: value for key, value in config.items() if key != "name"}
        expected = to_dict(from_dict(get_algorithm(method).config, overrides, "algorithm."))
        built = config_for(method, entry["data"], 2, 1, settings, config["client"]["lr"],
                           config["server"]["lr"])
        assert to_dict(built.algorithm.options) == expected
        assert expected["server"]["optimizer"] == ("sgd" if method == "fedavg" else method)
        assert record["best"] == {"client_lr": 0.5, "server_lr": config["server"]["lr"]}
        assert len(record["tuning"]) == 1 and set(record["runs"]) == {"1"}
        curve = record["runs"]["1"]["test_accuracy"]
        assert len(curve) == len(record["runs"]["1"]["test_perplexity"]) == 2
        assert all(0.0 <= a <= 1.0 for a in curve)
        assert set(record["summary"]["rounds_to_target"]) == {"0.18", "0.2"}
    measured = CLAIMS[0].measure(results)
    assert measured.numbers and len(measured.checks) == 4
    assert verdict(measured.checks).startswith("**")
    with open(tmp_path / "adaptive_text.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_rule_computes_verdicts_from_the_numbers():
    def entry(fedavg, fedadam, fedyogi):
        stats = lambda mean: {"summary": {"rounds_to_target": {"0.2": {"mean": mean}}}}
        return {"targets": [0.2], "methods": {"fedavg": stats(fedavg), "fedadam": stats(fedadam),
                                              "fedyogi": stats(fedyogi)}}

    assert verdict(rule(entry(50, 30, 40), "dialects")) == "**yes**"
    assert verdict(rule(entry(50, 30, 60), "dialects")) == "**partly** (1/2)"
    assert verdict(rule(entry(30, 30, 31), "dialects")) == "**no**"


def test_shakespeare_dir_runs_the_same_protocol_on_leaf_files(tmp_path):
    tiny = copy.deepcopy(TINY)
    results = run(output=str(tmp_path / "out"), methods=("fedavg", "fedadam"),
                  shakespeare_dir=_leaf_shakespeare(tmp_path / "leaf"), **tiny)
    entry = results["tasks"]["shakespeare"]
    assert entry["data"] == task_data("shakespeare", str(tmp_path / "leaf"))
    assert set(entry["methods"]) == {"fedavg", "fedadam"}
    assert len(entry["methods"]["fedadam"]["runs"]["1"]["test_accuracy"]) == 2
    # With FedYogi absent, each task's rule has one check per target.
    assert len(CLAIMS[0].measure(results).checks) == 4


def test_wrong_options_fail_before_anything_runs(tmp_path):
    with pytest.raises(OptionError, match="lr"):
        run(output=str(tmp_path), **{**TINY, "client_lr_grid": (-1.0,)})
    with pytest.raises(ValueError, match="held out"):
        run(output=str(tmp_path), **{**TINY, "seeds": [0]})
