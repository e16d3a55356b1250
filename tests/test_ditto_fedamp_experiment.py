"""Smoke test of the Ditto and FedAMP experiment script (experiments/ditto_fedamp.py)."""

import json

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from experiments.ditto_fedamp import (DITTO, corrupt, group_recovery,  # noqa: E402
                                      grouped_digits, main, run)
from fedjax_lab.data import digits  # noqa: E402

SCORE_KEYS = {"mean", "worst10", "std", "pooled"}


def test_run_writes_results_and_figures(tmp_path):
    returned = run(rounds=1, seeds=[0], output=str(tmp_path), fedamp_rounds=1,
                   ditto_methods=("fedavg_ft", "ditto_1"), fedamp_methods=("fedamp",))
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    assert results == json.loads(json.dumps(returned))
    assert results["settings"]["seeds"] == [0] and results["settings"]["rounds"] == 1
    for setting in ("clean", "corrupted"):
        run_0 = results["ditto"][setting]["runs"]["0"]
        assert set(run_0["scores"]) == {"fedavg_ft", "ditto_1"}
        assert run_0["global_equals_fedavg"] is True
        for scores in run_0["scores"].values():
            assert set(scores) == SCORE_KEYS
            assert 0.0 <= scores["worst10"] <= scores["mean"] <= 1.0
        assert set(results["ditto"][setting]["summary"]) == {"fedavg_ft", "ditto_1"}
    fedamp_run = results["fedamp"]["runs"]["0"]
    xi = np.array(fedamp_run["attention"]["fedamp"])
    assert xi.shape == (12, 12)
    np.testing.assert_allclose(xi.sum(axis=1), 1, rtol=1e-5)
    assert set(results["fedamp"]["recovery"]) == {"fedamp"}
    for name in ("ditto.png", "fedamp_attention.png"):
        with open(tmp_path / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_corruption_changes_only_the_chosen_clients_training_labels():
    clean = digits(20, partition="dirichlet", alpha=0.1, seed=1)
    corrupted, bad = corrupt(clean, DITTO["corrupted_fraction"], seed=1)
    assert len(bad) == 4 and corrupted.metadata["corrupted_clients"] == bad.tolist()
    for i in range(20):
        same = np.array_equal(corrupted.train.y[i], clean.train.y[i])
        assert same or i in bad
        np.testing.assert_array_equal(corrupted.test.y[i], clean.test.y[i])
    changed = sum(not np.array_equal(corrupted.train.y[i], clean.train.y[i]) for i in bad)
    assert changed >= 3


def test_groups_share_a_label_permutation_and_recovery_scores_block_structure():
    dataset, groups = grouped_digits(0, 12, 3, 0.6)
    assert np.bincount(groups).tolist() == [4, 4, 4]
    permutations = dataset.metadata["label_permutations"]
    assert len({tuple(p) for p in permutations}) == 3
    blocks = np.where(groups[:, None] == groups[None, :], 0.2, 0.01)
    recovery = group_recovery(blocks, groups)
    assert recovery["top_peers_in_group_fraction"] == 1.0
    assert recovery["within_group_weight"] == pytest.approx(0.2)
    assert recovery["across_group_weight"] == pytest.approx(0.01)
    shuffled = group_recovery(np.where(groups[:, None] == groups[None, :], 0.01, 0.2), groups)
    assert shuffled["top_peers_in_group_fraction"] == 0.0


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match=r"ditto_methods=\('fedprox',\) is invalid"):
        run(rounds=1, ditto_methods=("fedprox",))
    with pytest.raises(SystemExit):
        main(["--rounds", "0"])
