"""`fedjax-lab plot`: PNGs from real run folders, per-client accuracies saved, one-line errors."""

import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from fedjax_lab.cli import main  # noqa: E402
from fedjax_lab.evaluation import summarize  # noqa: E402
from fedjax_lab.plotting import load_run  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY_RUN = ["--data", "synthetic", "--model", "logistic", "--data.num_clients", "8",
            "--cohort-size", "4", "--algorithm.client.epochs", "1", "--rounds", "4",
            "--eval-every", "2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two real runs (FedAvg and Ditto, personalised) written by `fedjax-lab run --output`."""
    root = tmp_path_factory.mktemp("runs")
    folders = [str(root / "baseline"), str(root / "personal_run")]
    assert main(["run", *TINY_RUN, "--output", folders[0]]) == 0
    assert main(["run", *TINY_RUN, "--algorithm", "ditto", "--algorithm.lam", "0.1",
                 "--output", folders[1]]) == 0
    return folders


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_MAGIC and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def assert_valid_png(path) -> None:
    assert os.path.getsize(path) > 10_000
    width, height = png_size(path)
    assert width >= 400 and height >= 300


def test_last_evaluation_keeps_every_clients_accuracy(runs):
    with open(os.path.join(runs[0], "evaluations.jsonl")) as f:
        evaluations = [json.loads(line) for line in f]
    assert [row["round"] for row in evaluations] == [2, 4]
    assert "client_accuracies" not in evaluations[0]["test"]
    final = evaluations[-1]["test"]
    accuracies = final["client_accuracies"]
    assert len(accuracies) == 8 and all(0 <= a <= 1 for a in accuracies)
    assert np.mean(accuracies) == pytest.approx(final["client_accuracy_mean"], abs=1e-12)
    assert min(accuracies) == final["client_accuracy_min"]
    with open(os.path.join(runs[0], "summary.json")) as f:
        assert json.load(f)["final"]["test"]["client_accuracies"] == accuracies


def test_summarize_per_client_marks_clients_without_examples():
    stats = summarize(np.array([3.0, 0.0, 1.0]), np.array([1.0, 0.0, 2.0]),
                      np.array([4.0, 0.0, 2.0]), per_client=True)
    assert stats["client_accuracies"] == [0.75, None, 0.5]
    assert stats["client_accuracy_mean"] == 0.625 and stats["num_clients"] == 2
    assert "client_accuracies" not in summarize(np.ones(2), np.ones(2), np.ones(2))


def test_plot_two_runs_into_a_folder(runs, tmp_path, capsys):
    out = tmp_path / "figures"
    assert main(["plot", *runs, "--output", str(out)]) == 0
    written = capsys.readouterr().out.split()
    assert written == [str(out / "curves.png"), str(out / "client_accuracy.png")]
    for path in written:
        assert_valid_png(path)
    assert png_size(written[0])[0] > png_size(written[0])[1]  # loss and accuracy side by side
    assert sorted(os.listdir(out)) == ["client_accuracy.png", "curves.png"]  # no temporaries


def test_legend_names_folder_and_algorithm(runs):
    assert load_run(runs[0]).label == "baseline (fedavg)"
    assert load_run(runs[1]).label == "personal_run (ditto)"
    assert len(load_run(runs[1]).metrics) == 4


def test_png_file_name_and_default_folder(runs, tmp_path, capsys):
    target = tmp_path / "compare.png"
    assert main(["plot", runs[0], "--output", str(target)]) == 0
    assert_valid_png(target)
    assert_valid_png(tmp_path / "compare_clients.png")
    copy = tmp_path / "copy"
    shutil.copytree(runs[1], copy)
    assert main(["plot", str(copy)]) == 0
    assert_valid_png(copy / "curves.png")
    assert_valid_png(copy / "client_accuracy.png")


def test_run_saved_without_per_client_accuracies_plots_its_deciles(runs, tmp_path):
    legacy = tmp_path / "legacy"
    shutil.copytree(runs[0], legacy)
    path = legacy / "evaluations.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        row["test"].pop("client_accuracies", None)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["plot", str(legacy), runs[1], "--output", str(tmp_path / "out")]) == 0
    assert_valid_png(tmp_path / "out" / "client_accuracy.png")


def _bad_folders(tmp_path, runs):
    empty = tmp_path / "empty"
    empty.mkdir()
    no_rows = tmp_path / "no_rows"
    no_rows.mkdir()
    (no_rows / "metrics.jsonl").write_text("")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(runs[0], corrupt)
    with open(corrupt / "metrics.jsonl", "a") as f:
        f.write('{"round": 5, "train_lo\n')
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("not a run")
    return {"missing": (tmp_path / "missing", "is not a folder"),
            "file": (a_file, "is not a folder"),
            "empty": (empty, "is not a run folder: it has no metrics.jsonl"),
            "no_rows": (no_rows, "has no metrics"),
            "corrupt": (corrupt / "metrics.jsonl", "line 5 is not JSON")}


@pytest.mark.parametrize("case", ["missing", "file", "empty", "no_rows", "corrupt"])
def test_bad_run_folder_is_one_line_naming_it(case, runs, tmp_path, capsys):
    named, message = _bad_folders(tmp_path, runs)[case]
    folder = named.parent if case == "corrupt" else named
    out = tmp_path / "out"
    assert main(["plot", runs[0], str(folder), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("fedjax-lab: error: ") and str(named) in err and message in err
    assert not out.exists()  # every folder is checked before anything is drawn


def test_console_error_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fedjax_lab.cli", "plot",
                             str(tmp_path / "nope")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"fedjax-lab: error: {str(tmp_path / 'nope')!r} "
                                     "is not a folder")
