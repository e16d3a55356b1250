"""The whole GPU table in one command, printed as markdown for benchmarks/RESULTS.md.

Every benchmark a GPU should record, timed row by row, in one table headed by the card's name:

    python -m benchmarks.gpu [--output FILE] [--rows NAME ...]   # meant for < 8 min on an H100
    python -m benchmarks.gpu --smoke                            # a dry run, on any machine
    benchmarks/gpu.sh [...]                                     # the same, from any folder

Rows, all measured by the existing benchmarks (nothing is re-implemented here):

- `cnn-100`, `cifar-50`, `logreg-10000` (`benchmarks.throughput.measure`): a FedAvg round of the
  FEMNIST CNN with 100 clients, pfl-research's CIFAR-10 benchmark (50 clients) and logistic
  regression with 10,000 clients; median seconds per round, per round inside a scanned block,
  compile seconds, client steps per second, GFLOP/s, XLA's memory analysis of the round and the
  speed-up against a per-client loop. Each under "auto" and under "vmap" (expected to win on a
  GPU, where "auto" chunks a cohort whose working set exceeds its memory budget).
- `sweep-logistic-N`, `sweep-mlp-N` for N = 1, 8, 64 (`benchmarks.sweep.throughput`): the
  default job with logistic regression and with its MLP as a stacked sweep program of N grid
  points; point-rounds per second and XLA's memory of the block.
- `sweep-8-seeds` (`benchmarks.sweep.seeds_as_sweep_and_runs`): eight seeds of the default job
  (200 rounds) as one `fedjax-lab sweep` against eight `fedjax-lab run` processes, compilation
  cache off; wall seconds of the sweep and the ratio.

`--output FILE` writes the same rows as JSON. On a machine without a GPU it runs all the
same, under a warning that the table is not a GPU's. `--smoke` is a dry run of the command:
the same models, but every cohort cut to 2 clients of one local step, single timed rounds, no
per-client loop, and without `sweep-8-seeds` (its nine fresh processes take over two minutes on
two CPU cores). It still compiles every program: about two minutes on two busy CPU cores.
"""

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable, NamedTuple

import jax

from benchmarks import sweep, throughput
from fedjax_lab.core import ClientExecution

PROCESSES_ROW = "sweep-8-seeds"
SWEEP_MODELS = {"logistic": "logistic regression", "mlp": "its MLP 200-200"}


class Scale(NamedTuple):
    """How much of each benchmark to run: the recorded table, or a smoke test of the command."""
    repeats: int             # timed rounds per throughput row (median)
    scan_rounds: int         # rounds in throughput's scanned block
    references: bool         # throughput's per-client loop and ceiling
    sweep_rounds: int        # timed rounds of the stacked sweep block
    job_rounds: int | None   # rounds of the default job in `sweep-8-seeds` (None: row left out)
    smoke: bool


# Few repeats: on a GPU a round takes milliseconds, and compiling is most of each row's time.
FULL = Scale(repeats=5, scan_rounds=5, references=True, sweep_rounds=20, job_rounds=200,
             smoke=False)
SMOKE = Scale(repeats=1, scan_rounds=2, references=False, sweep_rounds=2, job_rounds=None,
              smoke=True)


class Row(NamedTuple):
    name: str
    measure: Callable[[Scale], dict]


def throughput_row(workload: str, model: str, strategy: str) -> Row:
    name = workload if strategy == "auto" else f"{workload}-{strategy}"

    def run(scale: Scale) -> dict:
        w = throughput.workloads()[workload]._replace(name=name,
                                                     execution=ClientExecution(strategy))
        if scale.smoke:
            w = w._replace(clients=2, examples=w.batch_size, epochs=1)
        measured = throughput.measure(w, scale.repeats, scale.scan_rounds, scale.references)
        return {
            "workload": (f"FedAvg {model}, {w.clients} clients x {w.examples} examples, "
                         f"batch {w.batch_size}, {w.epochs} epoch(s), {measured['dense']} dense"),
            "execution": measured["execution"],
            "seconds": measured["round_s"],
            "seconds_are": (f"s/round, median of {scale.repeats} (scanned block: "
                            f"{scale.scan_rounds} rounds)"),
            "scan_s": measured["scan_round_s"],
            "compile_s": measured["compile_s"],
            "rate": measured["steps_per_s"], "rate_unit": "client steps/s",
            "gflops": measured["gflops"],
            "xla_mib": measured["memory_mib"],
            "speedup_vs_loop": measured["speedup_vs_loop"] if scale.references else None,
        }

    return Row(name, run)


def sweep_row(model: str, points: int) -> Row:
    def run(scale: Scale) -> dict:
        measured = sweep.throughput(model, points, scale.sweep_rounds)
        return {
            "workload": f"the default job with {SWEEP_MODELS[model]}, {points} grid point(s) "
                        f"stacked",
            "execution": "StackedRuns (points vmapped)",
            "seconds": points / measured["point_rounds_per_s"],
            "seconds_are": f"s/round of all points, block of {scale.sweep_rounds}",
            "scan_s": None, "compile_s": None,
            "rate": measured["point_rounds_per_s"], "rate_unit": "point-rounds/s",
            "gflops": None,
            "xla_mib": measured["mib_per_point"] * points,
            "speedup_vs_loop": None,
        }

    return Row(f"sweep-{model}-{points}", run)


def processes_row() -> Row:
    def run(scale: Scale) -> dict:
        with tempfile.TemporaryDirectory() as folder:
            measured = sweep.seeds_as_sweep_and_runs(scale.job_rounds, folder, "off",
                                                     one_at_a_time=False)
        return {
            "workload": f"{sweep.SEEDS} seeds of the default job, {scale.job_rounds} rounds, "
                        f"cache off",
            "execution": "one `fedjax-lab sweep` process",
            "seconds": measured["sweep_s"],
            "seconds_are": (f"wall s of the sweep; {sweep.SEEDS} separate runs "
                            f"{measured['separate_runs_s']:.1f} s"),
            "scan_s": None, "compile_s": None,
            "rate": measured["ratio"], "rate_unit": "x faster than separate runs",
            "gflops": None, "xla_mib": None, "speedup_vs_loop": None,
        }

    return Row(PROCESSES_ROW, run)


def all_rows() -> list[Row]:
    models = {"cnn-100": "FEMNIST CNN", "cifar-50": "pfl-research's CIFAR-10 CNN",
              "logreg-10000": "logistic regression 60->10"}
    rows = [throughput_row(workload, model, strategy) for workload, model in models.items()
            for strategy in ("auto", "vmap")]
    return rows + [sweep_row(model, points) for model in SWEEP_MODELS for points in (1, 8, 64)] + [
        processes_row()]


def peak_device_mib() -> float | None:
    """The device allocator's peak so far (GPU and TPU report it; XLA:CPU does not)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else None


def git_commit() -> str:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=True, text=True,
                              capture_output=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    return "unknown"


def machine() -> dict:
    device = jax.devices()[0]
    return {"device_kind": device.device_kind, "platform": device.platform,
            "device_count": jax.device_count(), "jax": jax.__version__,
            "jaxlib": throughput.jaxlib_version(), "host_cpu": throughput.cpu_name(),
            "host_cpus": os.cpu_count(), "fedjax_lab_commit": git_commit(),
            "date": time.strftime("%Y-%m-%d %H:%M")}


COLUMNS = [("row", "row"), ("workload", "workload"), ("execution", "execution"),
           ("seconds", "seconds"), ("seconds_are", "seconds are"),
           ("scan_s", "s/round in a scanned block"), ("compile_s", "compile s"),
           ("rate", "rate"), ("gflops", "GFLOP/s"), ("xla_mib", "XLA MiB"),
           ("peak_device_mib", "peak device MiB so far"),
           ("speedup_vs_loop", "speed-up vs loop"), ("elapsed_s", "row elapsed s")]


def cell(row: dict, key: str) -> str:
    value = row[key]
    if value is None:
        return "—"
    if key == "rate":
        return f"{value:.4g} {row['rate_unit']}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown(info: dict, rows: list[dict], total_s: float) -> str:
    peak = rows[-1]["peak_device_mib"] if rows else None
    memory = (f"peak device memory {peak / 1024:.2f} GiB (`memory_stats`)" if peak is not None
              else f"no `memory_stats` on {info['platform']}: XLA's memory analysis per row")
    lines = [f"**{info['device_kind']}** ({info['platform']}, {info['device_count']} device(s)); "
             f"jax {info['jax']}, jaxlib {info['jaxlib']}; host {info['host_cpu']}, "
             f"{info['host_cpus']} CPUs; fedjax_lab at {info['fedjax_lab_commit']}; "
             f"{info['date']}; {memory}; whole table {total_s:.1f} s"
             + ("" if info["platform"] == "gpu" else "; **not a GPU**")
             + (" (`--smoke`: tiny cohorts, not a measurement)" if info["smoke"] else ""),
             "",
             "| " + " | ".join(title for _, title in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row, key) for key, _ in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str, result: dict) -> None:
    # Written whole or not at all: a temporary file beside the target, then renamed.
    folder = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as f:
        json.dump(result, f, indent=1)
    os.replace(f.name, path)


def measure_rows(rows: list[Row], scale: Scale,
                 finished: Callable[[list[dict]], None] = lambda rows: None) -> list[dict]:
    """The rows measured in order; `finished` is called with those done so far after each."""
    measured = []
    for row in rows:
        start = time.perf_counter()
        result = {"row": row.name, **row.measure(scale)}
        result["elapsed_s"] = time.perf_counter() - start
        result["peak_device_mib"] = peak_device_mib()
        # Printed as each row ends, so that a run cut short still shows what it finished.
        print(f"# {row.name}: {result['seconds']:.4g} {result['seconds_are']}; row took "
              f"{result['elapsed_s']:.1f} s", flush=True)
        measured.append(result)
        finished(measured)
    return measured


def main(argv=None) -> dict:
    names = [row.name for row in all_rows()]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", help="also write the table as JSON to this file")
    parser.add_argument("--smoke", action="store_true",
                        help=f"a dry run: 2-client cohorts, single rounds, no {PROCESSES_ROW} "
                             "(about two minutes on two CPU cores, mostly compiling); records "
                             "nothing worth keeping")
    parser.add_argument("--rows", nargs="+", choices=names, default=names,
                        help="measure only these rows, in this order (e.g. to finish a table cut "
                             "short)")
    args = parser.parse_args(argv)
    # JAX otherwise takes 75% of the card when it starts, and the `fedjax-lab` processes of
    # sweep-8-seeds, each wanting as much, would find it taken.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    scale = SMOKE if args.smoke else FULL
    by_name = {row.name: row for row in all_rows()}
    rows = [by_name[name] for name in dict.fromkeys(args.rows)
            if not (name == PROCESSES_ROW and scale.job_rounds is None)]
    info = {**machine(), "smoke": scale.smoke}
    if info["platform"] != "gpu":
        print(f"WARNING: no GPU: jax's device is {info['device_kind']!r} on {info['platform']}; "
              "this table is not the GPU table", file=sys.stderr, flush=True)
    start = time.perf_counter()

    def result(measured: list[dict]) -> dict:
        return {"machine": info, "rows": measured, "total_s": time.perf_counter() - start}

    def write_so_far(measured: list[dict]) -> None:
        # A table cut short (a lease running out) still leaves the rows it finished.
        if args.output:
            write_json(args.output, result(measured))

    whole = result(measure_rows(rows, scale, write_so_far))
    print(markdown(info, whole["rows"], whole["total_s"]), flush=True)
    if args.output:
        write_json(args.output, whole)
    return whole


if __name__ == "__main__":
    main()
