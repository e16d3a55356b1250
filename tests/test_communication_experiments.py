"""Smoke tests of the communication and robustness experiments with tiny settings."""

import json

import pytest

from experiments import fetchsgd as fetchsgd_experiment
from experiments import median_mean_bridge, robust_aggregation
from fedjax_lab import compiled
from fedjax_lab.data import digits
from fedjax_lab.models import logistic_regression

PNG = b"\x89PNG\r\n\x1a\n"


def read_outputs(folder, figure):
    with open(folder / "results.json") as f:
        results = json.load(f)
    with open(folder / figure, "rb") as f:
        assert f.read(8) == PNG
    return results


def test_median_mean_bridge_writes_fixed_points_accuracies_and_figure(tmp_path):
    names = ["mean_gd", "sign_b0", "median_b0", "sign_b1"]
    returned = median_mean_bridge.run(rounds=2, seeds=[0], output=str(tmp_path),
                                      monte_carlo_steps=400, noise_scales=(0.0, 1.0),
                                      curve_points=2, method_names=names)
    results = read_outputs(tmp_path, "median_mean_bridge.png")
    assert results == json.loads(json.dumps(returned))
    row = results["one_dimensional"]["1"]
    assert row["sign_exact"] == pytest.approx(0.539, abs=1e-3)
    assert row["median_exact"] == pytest.approx(0.549, abs=1e-3)
    assert results["one_dimensional"]["0"]["sign_exact"] == 0.0
    assert set(results["data"]) == set(names)
    assert {method.name for method in median_mean_bridge.data_methods(
        median_mean_bridge.LEARNING_RATES)} == {
        "mean_gd", *(f"{rule}_b{b:g}" for rule in ("sign", "median")
                     for b in median_mean_bridge.RELATIVE_NOISE_SCALES)}
    for method in results["data"].values():
        assert 0.0 <= method["final_test_accuracy"]["mean"] <= 1.0
    assert results["data"]["sign_b0"]["bytes_up_per_round"] * 32 == \
        results["data"]["median_b0"]["bytes_up_per_round"]


def test_fetchsgd_experiment_reports_accuracy_and_compression(tmp_path):
    names = ["uncompressed", "fetchsgd", "local_topk_no_ef"]
    fetchsgd_experiment.run(rounds=2, seeds=[0], output=str(tmp_path), method_names=names)
    results = read_outputs(tmp_path, "fetchsgd.png")
    assert set(results["methods"]) == set(names)
    settings = results["settings"]
    assert settings["num_columns"] == settings["dim"] // 20 and settings["num_rows"] == 5
    summary = {name: method["summary"] for name, method in results["methods"].items()}
    assert summary["uncompressed"]["total_compression"] == 1.0
    assert summary["fetchsgd"]["upload_compression"] == pytest.approx(
        settings["dim"] / (settings["num_rows"] * settings["num_columns"]))
    assert all(0.0 <= s["final_test_accuracy"]["mean"] <= 1.0 for s in summary.values())


def test_robust_aggregation_experiment_fills_its_table_with_one_program_for_its_seeds(tmp_path):
    robust_aggregation.run(rounds=1, seeds=[0, 1], output=str(tmp_path),
                           attacks=("none", "scaled"), aggregators=("mean", "median"))
    results = read_outputs(tmp_path, "robust_aggregation.png")
    table = results["final_test_accuracy"]
    assert set(table) == {"none", "scaled"}
    assert all(set(row) == {"mean", "median"} for row in table.values())
    assert all(len(method["accuracies"]) == 2 for row in table.values() for method in row.values())
    dataset = digits(robust_aggregation.NUM_CLIENTS, partition="iid")
    model = logistic_regression(dataset.feature_shape, dataset.num_classes)
    for attack in table:
        for aggregator in table[attack]:
            build = robust_aggregation.attacked_fedavg(aggregator, attack, model,
                                                       dataset.num_classes)
            block = compiled.device_block(build, robust_aggregation.NUM_CLIENTS,
                                          robust_aggregation.COHORT_SIZE)
            assert block._cache_size() == 1
