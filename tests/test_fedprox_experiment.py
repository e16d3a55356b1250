"""Smoke test of the FedProx Figure 1 reproduction script (experiments/fedprox_synthetic.py)."""

import json

from experiments.fedprox_synthetic import DATASETS, METHODS, run

SUMMARY_KEYS = {"final_train_loss", "final_test_accuracy", "train_loss_increases",
                "train_loss_total_variation"}


def test_run_writes_results_and_figure(tmp_path):
    returned = run(rounds=2, seeds=[0], output=str(tmp_path), num_epochs=2)
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    assert results == json.loads(json.dumps(returned))
    settings = results["settings"]
    assert settings["rounds"] == 2 and settings["seeds"] == [0]
    assert settings["max_examples"] == {name: 1000 for name in DATASETS}
    assert any("capped" in text for text in settings["deviations"])
    assert "rounds=2 (paper: 200)" in settings["deviations"]
    assert set(results["datasets"]) == set(DATASETS)
    for data_result in results["datasets"].values():
        assert set(data_result["methods"]) == set(METHODS)
        for method in data_result["methods"].values():
            run_0 = method["runs"]["0"]
            assert len(run_0["train_loss"]) == len(run_0["test_accuracy"]) == 2
            assert all(0.0 <= a <= 1.0 for a in run_0["test_accuracy"])
            assert set(method["summary"]) == SUMMARY_KEYS
            assert method["summary"]["final_train_loss"]["std"] == 0.0
    with open(tmp_path / "fedprox_synthetic.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
