"""Smoke test of the FedGKT / FedGen reproduction script (experiments/knowledge_transfer.py)."""

import json

import pytest

pytest.importorskip("matplotlib")

from experiments.knowledge_transfer import GKT, main, measure_fedgkt, run  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def test_run_writes_results_and_figures(tmp_path):
    returned = run(rounds=2, seeds=[0], output=str(tmp_path), eval_every=1,
                   fedgen_alphas=(0.1,), fedgen_sharings=("head",))
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    assert results == json.loads(json.dumps(returned))
    assert results["settings"]["rounds"] == 2 and results["settings"]["seeds"] == [0]

    gkt = results["fedgkt"]
    for name in ("alpha_1", "alpha_0"):
        run_0 = gkt["runs"][name]["0"]
        assert len(run_0["server_accuracy"]) == 2
        assert set(run_0["final_accuracy"]) == {"server_own", "server_all", "client_own",
                                                "client_all"}
        assert all(0.0 <= a <= 1.0 for a in run_0["final_accuracy"].values())
        assert run_0["parameter_bytes_per_round"] == 0.0
    examples_bytes = gkt["summary"]["bytes_down_per_round"]["mean"]
    assert examples_bytes > 0 and gkt["summary"]["bytes_up_per_round"]["mean"] == pytest.approx(
        examples_bytes * (16 * 4 + 10 * 4 + 4) / (10 * 4))
    for test in ("own", "all"):
        summary = gkt["summary"][f"{test}_test_data"]
        assert summary["local_only_small_models"]["std"] == 0.0
        assert summary["server_minus_local_only"]["mean"] == pytest.approx(
            summary["fedgkt_server_on_client_features"]["mean"]
            - summary["local_only_small_models"]["mean"])
    gkt_claim = measure_fedgkt(results)
    assert gkt_claim.checks[-1] == ("zero parameters moved", True)
    assert GKT["num_clients"] == 10

    head = results["fedgen"]["dirichlet_0.1"]["summary"]["head"]
    assert set(results["fedgen"]) == {"dirichlet_0.1"}
    assert head["fedgen_bytes_down_per_round"] > head["fedavg_bytes_down_per_round"]
    assert head["fedgen_minus_fedavg"]["mean"] == pytest.approx(
        head["fedgen_final_accuracy"]["mean"] - head["fedavg_final_accuracy"]["mean"])
    for name in ("fedgkt.png", "fedgen.png"):
        with open(tmp_path / name, "rb") as f:
            assert f.read(8) == PNG


def test_main_rejects_a_bad_round_count(capsys):
    with pytest.raises(SystemExit):
        main(["--rounds", "0"])
    assert "--rounds 0 is invalid" in capsys.readouterr().err
