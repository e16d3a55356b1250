"""Smoke test of the FedMeta / Per-FedAvg reproduction script (experiments/meta_learning.py)."""

import json

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from experiments.meta_learning import (dominant_class_clients, permuted_label_clients,  # noqa: E402
                                       run)


def test_unseen_clients_are_held_out_and_labels_permuted_per_client():
    train, support, query = permuted_label_clients(seed=0)
    assert train.num_clients == 32 and support.num_clients == query.num_clients == 8
    assert not set(train.names) & set(support.names) and support.names == query.names
    assert all(len(s) and len(q) and abs(len(s) - len(q)) <= 1
               for s, q in zip(support.y, query.y))
    assert len({tuple(y[:5]) for y in train.y}) > 1


def test_dominant_classes_hold_most_of_each_clients_examples():
    train, test = dominant_class_clients(seed=0)
    assert train.num_clients == 50 and train.names == test.names
    shares = [np.sort(np.bincount(np.concatenate([a, b]), minlength=10))[-2:].sum()
              / (len(a) + len(b)) for a, b in zip(train.y, test.y)]
    assert 0.7 < np.mean(shares) < 0.9 and min(len(y) for y in test.y) >= 1


def test_run_writes_results_and_figures(tmp_path):
    methods = {"fedmeta": ["maml", "fedavg"], "perfedavg_alpha0.1": ["hf", "fedavg_one_step"]}
    returned = run(rounds=2, seeds=[0, 1], output=str(tmp_path), methods=methods, num_evals=2)
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    assert results == json.loads(json.dumps(returned))
    assert results["settings"]["rounds"] == 2 and results["settings"]["seeds"] == [0, 1]
    assert sorted(results["experiments"]) == sorted(methods)
    for name, chosen in methods.items():
        experiment = results["experiments"][name]
        assert sorted(experiment["methods"]) == sorted(chosen)
        for method in experiment["methods"].values():
            assert [point["round"] for point in method["runs"]["1"]["curve"]] == [1, 2]
            final = method["runs"]["0"]["final"]
            assert final["round"] == 2 and 0.0 <= final["accuracy"] <= 1.0
            accuracies = [run["final"]["accuracy"] for run in method["runs"].values()]
            assert method["final_accuracy"]["mean"] == pytest.approx(np.mean(accuracies))
        with open(tmp_path / f"{name}.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
