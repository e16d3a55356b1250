"""The command line: listing, runs of any algorithm, config files, overrides, one-line errors."""

import json
import os
import subprocess
import sys

import pytest

from fedjax_lab.algorithms import REGISTRY
from fedjax_lab.cli import main

QUICK = ["--data.num_clients", "6", "--model", "logistic", "--rounds", "2", "--cohort-size", "3",
         "--eval-every", "2"]


def test_list_names_every_registered_choice_with_paper_and_options(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in list(REGISTRY) + ["digits", "synthetic", "leaf", "logistic", "mlp", "cnn",
                                  "split_mlp"]:
        assert f"  {name} " in out
    assert "arXiv 1812.06127" in out and "mu=1.0" in out and "rounds" in out


def test_list_one_algorithm_shows_its_options(capsys):
    assert main(["list", "ditto"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("algorithm ditto:") and "--algorithm.lam" in out


def test_short_run_prints_accuracy_and_saves_a_config_that_reruns_it(tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    argv = ["run", "--data", "synthetic", "--data.alpha", "0", "--data.beta", "0",
            "--algorithm", "fedprox", "--algorithm.mu", "0.5", "--algorithm.stragglers", "0.5",
            "--algorithm.client.epochs", "2", "--algorithm.client.batch_size", "none",
            "--model", "logistic", "--rounds", "3", "--cohort-size", "5", "--eval-every", "3"]
    assert main(argv + ["--output", str(first)]) == 0
    assert "fedprox on synthetic: test accuracy" in capsys.readouterr().out
    config = json.loads((first / "config.json").read_text())
    assert config["algorithm"]["mu"] == 0.5 and config["algorithm"]["client"]["batch_size"] is None
    assert config["data"]["alpha"] == 0.0
    assert main(["run", "--config", str(first / "config.json"), "--output", str(second)]) == 0
    for name in ("metrics.jsonl", "evaluations.jsonl"):
        assert (first / name).read_text() == (second / name).read_text()


def test_a_toml_file_with_command_line_overrides(tmp_path, capsys):
    path = tmp_path / "ditto.toml"
    path.write_text('[algorithm]\nname = "ditto"\nlam = 0.1\n\n[data]\nnum_clients = 6\n\n'
                    '[model]\nname = "logistic"\n\n[run]\nrounds = 2\ncohort_size = 3\n')
    out = tmp_path / "run"
    assert main(["run", "--config", str(path), "--algorithm.lam", "0.5", "--output",
                 str(out)]) == 0
    assert "ditto on digits" in capsys.readouterr().out
    saved = json.loads((out / "config.json").read_text())
    assert saved["algorithm"]["name"] == "ditto" and saved["algorithm"]["lam"] == 0.5
    assert saved["run"]["rounds"] == 2


@pytest.mark.parametrize("argv, message", [
    (["--algorithm", "fedsgd"], "--algorithm 'fedsgd' is invalid; unknown algorithm; allowed: "
                                "fedavg, fedprox"),
    (["--data", "mnist"], "--data 'mnist' is invalid; unknown data; allowed: digits"),
    (["--model", "resnet"], "--model 'resnet' is invalid; unknown model; allowed:"),
    (["--cohort-size", "51"], "--cohort-size 51 is invalid; expected at most 50"),
    (["--algorithm.client.lr", "-0.1"], "--algorithm.client.lr -0.1 is invalid; expected a "
                                        "number > 0"),
    (["--algorithm.client.batch_size", "0"], "--algorithm.client.batch_size 0 is invalid; "
                                             "expected a positive integer"),
    (["--rounds", "ten"], "--rounds 'ten' is invalid; expected int"),
    (["--algorithm.lam", "1"], "--algorithm.lam '1' is invalid; unknown option; allowed: client"),
    (["--algorithm", "fedproto", "--model", "mlp"], "--model 'mlp' is invalid; algorithm "
                                                    "'fedproto' needs a split model"),
    (["--algorithm.stragglers", "0.5", "--algorithm.client.epochs", "1"],
     "--algorithm.stragglers 0.5 is invalid; stragglers run 1..E-1 epochs"),
    (["--execution", "chunked"], "--chunk-size None is invalid"),
    (["--rounds"], "--rounds needs a value"),
    (["--algorithm", "sign_sgd", "--model.batch_norm", "true"],
     "--model 'mlp' is invalid; this model has a training mode (dropout or BatchNorm)"),
])
def test_bad_options_give_one_line_errors_and_write_nothing(argv, message, capsys, tmp_path):
    out = tmp_path / "never"
    # One round, so a case that wrongly passes validation ends quickly.
    assert main(["run", "--rounds", "1", "--output", str(out)] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fedjax-lab: error: {message}"), err
    assert len(err.splitlines()) == 1
    assert not out.exists()


def test_checkpoints_without_an_output_folder_are_refused(capsys):
    assert main(["run", "--checkpoint-every", "5"]) == 2
    assert capsys.readouterr().err.strip() == (
        "fedjax-lab: error: --checkpoint-every 5 is invalid; checkpoints are written under "
        "output, which is not set")


def test_bad_config_files_name_the_file_and_line(tmp_path, capsys):
    broken = tmp_path / "broken.toml"
    broken.write_text('[algorithm]\nname = "fedavg"\nlam = \n')
    assert main(["run", "--config", str(broken)]) == 2
    err = capsys.readouterr().err.strip()
    assert "broken.toml" in err and "line 3" in err and len(err.splitlines()) == 1
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"algorithm": {"name": "fedavg", "lam": 1.0}}))
    assert main(["run", "--config", str(unknown)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--algorithm.lam 1.0 is invalid; unknown option" in err and "unknown.json" in err


def test_data_describe_prints_the_default_data_set(capsys):
    assert main(["data", "describe", "--data.num_clients", "10"]) == 0
    out = capsys.readouterr().out
    assert "10" in out and "entropy" in out


def test_console_script_entry_point_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "fedjax_lab.cli", "run", "--model", "nope"],
                            capture_output=True, text=True, env={**os.environ})
    assert result.returncode == 2
    assert result.stderr.strip().startswith("fedjax-lab: error: --model 'nope' is invalid")


def test_sweep_command_writes_points_summary_and_plot(tmp_path, capsys):
    output = tmp_path / "sweep"
    argv = ["sweep", "--algorithm", "fedprox", "--seeds", "0-1", "--algorithm.mu", "0,0.5",
            "--output", str(output)] + QUICK
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "algorithm.mu=0.0** (best)" in out and "| algorithm.mu=0.5 | 2 | 0 |" in out
    points = sorted(os.listdir(output / "points"))
    assert points == ["algorithm.mu=0.0,seed=0", "algorithm.mu=0.0,seed=1",
                      "algorithm.mu=0.5,seed=0", "algorithm.mu=0.5,seed=1"]
    for name in ("summary.json", "summary.md", "sweep.png", "sweep.json"):
        assert (output / name).exists(), name
    saved = json.loads((output / "points" / points[3] / "config.json").read_text())
    assert saved["algorithm"]["mu"] == 0.5 and saved["run"]["seed"] == 1
    assert main(["sweep", "--resume", str(output)]) == 0  # finished points are kept


@pytest.mark.parametrize("argv, message", [
    (["--algorithm.server.optimizer", "sgd,adam"], "not numeric"),
    (["--seeds", "3-1"], "--seeds"),
    (["--algorithm.mu", "0,-1"], "--algorithm.mu"),
    (["--chunks-at-once", "0"], "--chunks-at-once"),
    (["--memory-budget", "1000"], "--memory-budget 1000 is invalid; one grid point alone needs"),
    (["--points-per-program", "two"], "--points-per-program"),
    ([], "--output"),
])
def test_sweep_command_refuses_bad_grids_in_one_line(tmp_path, capsys, argv, message):
    output = [] if not argv else ["--output", str(tmp_path / "out")]
    assert main(["sweep", "--algorithm", "fedprox"] + QUICK + output + argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "out").exists()


def test_second_identical_run_reads_its_programs_from_the_compile_cache(tmp_path):
    cache = tmp_path / "cache"
    argv = [sys.executable, "-m", "fedjax_lab.cli", "run", "--compile-cache", str(cache)] + QUICK
    summaries = []
    for run in ("first", "second"):
        subprocess.run(argv + ["--output", str(tmp_path / run)], check=True,
                       capture_output=True)
        summaries.append(json.loads((tmp_path / run / "summary.json").read_text()))
        assert os.listdir(cache)
    assert summaries[0]["final"] == summaries[1]["final"]
    # Compile time is measured (the ratio is a benchmark, not a test): both runs record it.
    assert all(summary["compile_seconds"] > 0 for summary in summaries)
