"""Smoke test of the DP-FedAvg script (experiments/dp_fedavg.py): one cohort, one ε, 2 rounds.

The ε is 1: calibrating the noise for it took 2.9 s of PLD accounting on two cores, against 8.7 s
for ε = 8 (PLD's cost grows as the noise multiplier shrinks: z = 0.67 against 0.30)."""

import json

import pytest

pytest.importorskip("matplotlib")

from experiments.dp_fedavg import CLAIMS, capacity, run  # noqa: E402


def test_run_writes_results_and_figure(tmp_path):
    returned = run(rounds=2, seeds=[0], output=str(tmp_path), paper_rounds=(10,),
                   settings={"num_clients": 60, "cohorts": (6,), "epsilons": (1.0,)})
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    assert results == json.loads(json.dumps(returned))
    assert (tmp_path / "dp_fedavg.png").stat().st_size > 10_000
    entry = results["cohorts"]["6"]
    assert entry["capacity"] == capacity(6) == 16
    private = entry["private"]["1"]
    run_0 = private["runs"]["0"]
    assert run_0["epsilon"] == private["epsilon_spent"] <= 1.0
    assert run_0["noise_std"] == pytest.approx(private["noise_multiplier"] * 0.5 / 6)
    assert 0 <= run_0["test_accuracy"] <= 1 and run_0["participants"] < 16
    assert "epsilon" not in entry["non_private"]["runs"]["0"]
    (row,) = [r for r in results["paper_setting"] if r["users"] == 10 ** 5]
    assert row["rounds"] == [10] and row["pld"][0] <= row["rdp"][0] <= row["moments_accountant"][0]
    for claim in CLAIMS:
        claim.measure(results)  # every claim reads this file's numbers
