"""docs/RESULTS.md is exactly what `python -m experiments.report` makes of the committed results."""

import os
import re

import pytest

from experiments.claims import Check, verdict
from experiments.report import EXPERIMENTS, OUTPUT, ROOT, ROWS, main, measure_rows, render

ALGORITHMS = ["FedAvg", "FedProx", "Noisy signSGD / medianSGD", "FetchSGD", "Robust aggregation",
              "Ditto", "FedAMP", "FedProto", "pFedHN", "FedMeta (MAML, Meta-SGD, FOMAML)",
              "Per-FedAvg", "FedGKT", "FedGen", "DP-FedAvg", "SCAFFOLD", "q-FFL",
              "Personalisation table", "FedAdam / FedYogi (text)"]


def test_results_page_is_generated_from_the_committed_results():
    with open(OUTPUT) as f:
        assert f.read() == render(), "docs/RESULTS.md is stale: run python -m experiments.report"
    assert main(["--check"]) == 0


def test_one_row_per_algorithm_each_with_numbers_and_a_computed_verdict():
    assert [row.algorithm for row in ROWS] == ALGORITHMS
    table = [line for line in render().splitlines() if line.startswith("| **")]
    assert len(table) == len(ALGORITHMS)
    for (row, measured), line in zip(measure_rows(), table):
        assert measured.numbers and measured.checks, row.algorithm
        assert re.search(r"\d\.\d+ ± \d\.\d+", " ".join(measured.numbers)), row.algorithm
        assert line.rstrip(" |").endswith(verdict(measured.checks))
        assert line.count(" | ") == 5  # six cells: no stray pipe split a cell


def test_every_link_points_to_a_file():
    links = re.findall(r"\]\(([^)]+)\)", render())
    assert len(links) >= 2 * len(ROWS)
    for link in links:
        assert os.path.isfile(os.path.join(ROOT, "docs", link)), link


def test_verdict_rule():
    yes, no = Check("a", True), Check("b", False)
    assert verdict([yes, yes]) == "**yes**"
    assert verdict([no, no]) == "**no**"
    assert verdict([yes, no, no]) == "**partly** (1/3)"


def test_missing_results_are_named_and_stale_page_detected(tmp_path, capsys):
    assert main(["--results", str(tmp_path), "--check"]) == 2
    assert "results.json is missing" in capsys.readouterr().err
    stale = tmp_path / "RESULTS.md"
    stale.write_text("old\n")
    assert main(["--output", str(stale), "--check"]) == 1
    assert stale.read_text() == "old\n"
    assert main(["--output", str(stale)]) == 0
    assert stale.read_text() == render()


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_each_experiment_declares_claims_and_has_recorded_results(experiment):
    assert any(row.experiment == experiment for row in ROWS)
    assert os.path.isfile(os.path.join(ROOT, "docs", "results", experiment, "results.json"))
    assert os.path.isfile(os.path.join(ROOT, "experiments", f"{experiment}.py"))
