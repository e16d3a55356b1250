"""Smoke test of the FedAvg-against-FedSGD script (experiments/fedavg_fedsgd.py)."""

import json

import pytest

pytest.importorskip("matplotlib")

from experiments.fedavg_fedsgd import rounds_to_target, run  # noqa: E402


def test_rounds_to_target_is_the_first_round_reaching_it():
    assert rounds_to_target([0.5, 0.91, 0.8, 0.95], 0.9) == 2
    assert rounds_to_target([0.5, 0.9], 0.9) == 2
    assert rounds_to_target([0.5, 0.89], 0.9) is None


def test_run_writes_results_and_figure(tmp_path):
    returned = run(rounds=2, seeds=[0], output=str(tmp_path), learning_rates=(0.5,),
                   partitions=("iid",))
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    assert results == json.loads(json.dumps(returned))
    assert (tmp_path / "fedavg_fedsgd.png").stat().st_size > 10_000
    entry = results["partitions"]["iid"]
    for method in ("fedavg", "fedsgd"):
        result = entry["methods"][method]
        run_0 = result["learning_rates"]["0.5"]["runs"]["0"]
        assert len(run_0["test_accuracy"]) == 2
        assert run_0["rounds_to_target"] == rounds_to_target(run_0["test_accuracy"], 0.9)
        counted = run_0["rounds_to_target"] or 3
        assert result["rounds_to_target"]["counted_mean"] == counted
    speedup = (entry["methods"]["fedsgd"]["rounds_to_target"]["counted_mean"]
               / entry["methods"]["fedavg"]["rounds_to_target"]["counted_mean"])
    assert entry["speedup"] == speedup
