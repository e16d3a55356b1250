"""The command line: listing, a short run, and one-line errors naming the option."""

import json
import os
import subprocess
import sys

import pytest

from fedjax_lab.cli import main


def test_list_names_every_choice(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("fedavg", "fedprox", "digits", "synthetic_iid", "logistic", "mlp", "cnn"):
        assert name in out


def test_short_run_prints_accuracy_and_writes_results(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "--dataset", "synthetic", "--model", "logistic", "--rounds", "3",
                 "--cohort-size", "5", "--local-epochs", "2", "--algorithm", "fedprox", "--mu",
                 "0.5", "--stragglers", "0.5", "--batch-size", "full", "--eval-every", "3",
                 "--output", str(out)])
    assert code == 0
    assert "fedprox on synthetic: test accuracy" in capsys.readouterr().out
    with open(out / "config.json") as f:
        config = json.load(f)
    assert config["mu"] == 0.5 and config["batch_size"] is None


@pytest.mark.parametrize("argv, message", [
    (["--algorithm", "fedsgd"], "--algorithm 'fedsgd' is invalid; allowed: fedavg, fedprox"),
    (["--dataset", "mnist"], "--dataset 'mnist' is invalid; allowed: digits, synthetic"),
    (["--model", "resnet"], "--model 'resnet' is invalid; allowed: logistic, mlp, cnn"),
    (["--cohort-size", "51"], "--cohort-size 51 is invalid; expected an integer in 1..50"),
    (["--client-lr", "-0.1"], "--client-lr -0.1 is invalid; expected a positive number"),
    (["--batch-size", "0"], "--batch-size 0 is invalid; expected a positive integer"),
    (["--rounds", "ten"], "--rounds 'ten' is invalid; expected a positive integer"),
])
def test_bad_options_give_one_line_errors(argv, message, capsys):
    assert main(["run"] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"fedjax-lab: error: {message}" or err.startswith(f"fedjax-lab: error: {message}")
    assert len(err.splitlines()) == 1


def test_console_script_entry_point_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "fedjax_lab.cli", "run", "--model", "nope"],
                            capture_output=True, text=True, env={**os.environ})
    assert result.returncode == 2
    assert result.stderr.strip().startswith("fedjax-lab: error: --model 'nope' is invalid")
