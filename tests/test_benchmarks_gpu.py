"""`python -m benchmarks.gpu --smoke`: the GPU table's command runs on this machine and prints,
and writes as JSON, the rows it was asked for, each with a real time, under the device's name.

The fast test runs one row of each kind that needs no fresh process (a throughput workload, a
stacked sweep); the whole smoke table compiles the CNNs and takes about a minute on two cores,
so it is marked slow.
"""

import json
import math
import re

import jax
import pytest

from benchmarks import gpu


def table_rows(printed: str) -> dict[str, list[str]]:
    """{row name: its cells} of the markdown table in `printed`."""
    lines = [line for line in printed.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[0] == "row", lines[0]
    return {cells[0]: cells for cells in
            ([cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:])}


def check_smoke_table(rows: list[str], capsys, tmp_path) -> None:
    output = tmp_path / "gpu.json"
    returned = gpu.main(["--smoke", "--output", str(output), "--rows", *rows])
    printed, warned = capsys.readouterr()

    device = jax.devices()[0]
    assert f"**{device.device_kind}** ({device.platform}" in printed
    if device.platform != "gpu":
        assert "WARNING: no GPU" in warned and "**not a GPU**" in printed
    printed_rows = table_rows(printed)
    assert list(printed_rows) == rows
    seconds_column = [title for _, title in gpu.COLUMNS].index("seconds")
    for name, cells in printed_rows.items():
        assert math.isfinite(float(cells[seconds_column])) and float(cells[seconds_column]) > 0, (
            name, cells)
        assert re.search(rf"^# {re.escape(name)}: .* row took \d+\.\d s$", printed, re.MULTILINE)

    written = json.loads(output.read_text())
    assert written == json.loads(json.dumps(returned))
    assert [row["row"] for row in written["rows"]] == rows
    for row in written["rows"]:
        assert math.isfinite(row["seconds"]) and row["seconds"] > 0, row
        assert 0 < row["elapsed_s"] <= written["total_s"], row
        assert f"{row['seconds']:.4g}" == printed_rows[row["row"]][seconds_column]
    assert written["machine"]["device_kind"] == device.device_kind
    assert written["machine"]["smoke"] is True


def test_smoke_rows_printed_and_written_with_real_times(capsys, tmp_path):
    check_smoke_table(["logreg-10000", "sweep-logistic-1"], capsys, tmp_path)


def test_the_table_has_the_issues_rows():
    names = [row.name for row in gpu.all_rows()]
    assert {"cnn-100", "cifar-50", "logreg-10000", "sweep-logistic-1", "sweep-logistic-8",
            "sweep-logistic-64", "sweep-mlp-1", "sweep-mlp-8", "sweep-mlp-64",
            gpu.PROCESSES_ROW} <= set(names)
    assert len(set(names)) == len(names)


def test_rows_finished_are_kept_when_a_later_row_fails():
    def failing(scale):
        raise RuntimeError("the lease ran out")

    done = {"seconds": 1.0, "seconds_are": "s"}
    kept = []
    with pytest.raises(RuntimeError, match="lease"):
        gpu.measure_rows([gpu.Row("done", lambda scale: done), gpu.Row("cut", failing)],
                         gpu.SMOKE, lambda measured: kept.append([r["row"] for r in measured]))
    assert kept == [["done"]]


@pytest.mark.slow
def test_whole_smoke_table(capsys, tmp_path):
    rows = [row.name for row in gpu.all_rows() if row.name != gpu.PROCESSES_ROW]
    check_smoke_table(rows, capsys, tmp_path)
