"""Smoke test of the FedProto / pFedHN comparison script (experiments/fedproto_pfedhn.py)."""

import json

import pytest

pytest.importorskip("matplotlib")

from experiments.fedproto_pfedhn import SCORE_KEYS, main, run  # noqa: E402


def test_run_writes_results_and_figures(tmp_path):
    # The costliest paths only: two architectures scored by nearest own-class prototype, and
    # pFedHN-PC with its private heads.
    returned = run(rounds=2, seeds=[0], output=str(tmp_path), pfedhn_rounds=2, eval_every=1,
                   fedproto_methods=["fedproto_mixed_local_prototype"],
                   pfedhn_methods=["pfedhn_pc"])
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    assert results == json.loads(json.dumps(returned))
    assert results["settings"]["seeds"] == [0] and results["settings"]["rounds"] == 2
    for experiment, method in (("fedproto", "fedproto_mixed_local_prototype"),
                               ("pfedhn", "pfedhn_pc")):
        scores = results[experiment]["runs"]["0"]["scores"]
        assert list(scores) == [method]
        assert all(0.0 <= scores[method][key] <= 1.0 for key in SCORE_KEYS)
        assert scores[method]["worst10"] <= scores[method]["mean"]
        assert [round_ for round_, _ in scores[method]["curve"]] == [1, 2]
        assert scores[method]["bytes_up"] > 0
        summary = results[experiment]["summary"][method]
        assert summary["mean"]["std"] == 0.0 and summary["mean"]["mean"] == scores[method]["mean"]
        with open(tmp_path / f"{experiment}.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_bad_options_are_refused_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="fedproto_methods=\\('fedprox',\\) is invalid"):
        run(rounds=1, output=str(tmp_path), fedproto_methods=["fedprox"])
    with pytest.raises(ValueError, match="pfedhn_rounds=0 is invalid"):
        run(rounds=1, output=str(tmp_path), pfedhn_rounds=0)
    with pytest.raises(SystemExit):
        main(["--rounds", "0", "--output", str(tmp_path)])
