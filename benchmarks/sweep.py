"""Sweeps against separate runs, the persistent compilation cache, and vmapped grid throughput.

    python -m benchmarks.sweep [--rounds 200] [--caches off,on] [--skip-commands] [--points 1,8,64]

1. Eight seeds of the default job (FedAvg, MLP, digits; `--rounds` rounds) as one
   `fedjax-lab sweep --seeds 0-7`, against eight `fedjax-lab run --seed i --data-seed 0`
   commands (the sweep's points draw the data with seed 0 too), each a fresh process, with the
   persistent compilation cache off and then on (a folder of its own for the sweep); wall time
   including start-up and compiling. The sweep runs twice: its chunks one at a time
   (`--chunks-at-once 1`), then as many at once as the default (the cores, on CPU).
2. The same `fedjax-lab run` twice with a fresh cache folder: the compile seconds each records.
3. Rounds per second per grid point of the vmapped sweep program for logistic regression and the
   MLP at 1, 8 and 64 points (a timed block of 20 rounds, 2 at 64 points, after a warm-up
   block), and XLA's memory per point (arguments, outputs and temporaries of the block).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import jax

from fedjax_lab import config as run_config
from fedjax_lab import options, sweep_grid
from fedjax_lab.stacked import StackedRuns

SEEDS = 8


def _command(argv: list[str], cache: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fedjax_lab.cli"] + argv + ["--compile-cache", cache],
                   check=True, capture_output=True)
    return time.perf_counter() - start


def seeds_as_sweep_and_runs(rounds: int, folder: str, cache_name: str,
                            one_at_a_time: bool = True) -> dict:
    """Wall seconds of SEEDS separate `fedjax-lab run` processes and of one `fedjax-lab sweep`
    over the same seeds, with the compilation cache "off" or "on"; with `one_at_a_time`, also of
    the sweep with `--chunks-at-once 1`."""
    job = ["--rounds", str(rounds)]
    cache = "off" if cache_name == "off" else os.path.join(folder, f"cache-{rounds}")
    separate = sum(_command(["run", "--seed", str(seed), "--data-seed", "0", "--output",
                             os.path.join(folder, f"run-{cache_name}-{seed}")] + job, cache)
                   for seed in range(SEEDS))
    sweep_flags = {"sweep_s": []}
    if one_at_a_time:
        sweep_flags["sweep_one_at_a_time_s"] = ["--chunks-at-once", "1"]
    measured = {"separate_runs_s": separate}
    for name, flags in sweep_flags.items():
        measured[name] = _command(
            ["sweep", "--seeds", f"0-{SEEDS - 1}", "--output",
             os.path.join(folder, f"{name}-{cache_name}")] + job + flags,
            "off" if cache_name == "off" else os.path.join(folder, f"cache-{name}"))
        measured[name.replace("sweep", "ratio").removesuffix("_s")] = separate / measured[name]
    return measured


def commands(rounds: int, folder: str, caches=("off", "on")) -> dict:
    job = ["--rounds", str(rounds)]
    result = {}
    for cache_name in caches:
        result[f"cache {cache_name}"] = seeds_as_sweep_and_runs(rounds, folder, cache_name)
        _report({f"cache {cache_name}": result[f"cache {cache_name}"]})
    cache = os.path.join(folder, "cache-twice")
    compile_seconds = []
    for attempt in ("first", "second"):
        output = os.path.join(folder, f"twice-{attempt}")
        _command(["run", "--output", output] + job, cache)
        with open(os.path.join(output, "summary.json")) as f:
            compile_seconds.append(json.load(f)["compile_seconds"])
    result["compile_seconds_first_second"] = compile_seconds
    _report({"compile_seconds_first_second": compile_seconds})
    return result


def _report(measured: dict) -> None:
    # Printed as measured, so a run cut short keeps what it finished.
    print(json.dumps(measured), flush=True)


def throughput(model: str, points: int, rounds: int | None = None) -> dict:
    """Seconds per round of the vmapped block over `points` grid points, and bytes per point;
    `rounds` timed rounds (by default 20, fewer above 8 points: 160 point-rounds, at least 2)."""
    rounds = max(2, min(20, 160 // points)) if rounds is None else rounds
    base = {"model": {"name": model}, "run": {"rounds": rounds, "eval_every": rounds}}
    grid = sweep_grid.grid_points(base, range(points), {}, tempfile.mkdtemp())
    dataset = run_config.load_data(grid[0].config)
    runs = StackedRuns([point.config for point in grid], dataset)
    population = jax.device_put(dataset.train.pad())
    states = runs.init()
    stats = runs.lower(states, population, rounds).compile().memory_analysis()
    states, _ = runs.advance(states, population, rounds)  # warm-up, compiling the jitted block
    jax.block_until_ready(states)
    start = time.perf_counter()
    states, metrics = runs.advance(states, population, rounds)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / rounds
    memory = stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes
    return {"model": model, "points": points, "rounds_per_s_per_point": 1 / seconds,
            "point_rounds_per_s": points / seconds, "mib_per_point": memory / points / 2**20}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--points", default="1,8,64")
    parser.add_argument("--skip-commands", action="store_true")
    parser.add_argument("--caches", default="off,on",
                        help="the compilation-cache settings of step 1 (off, on or both)")
    args = parser.parse_args(argv)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{jax.devices()[0].device_kind}, jax {jax.__version__}, load "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    if not args.skip_commands:
        with tempfile.TemporaryDirectory() as folder:
            commands(args.rounds, folder, tuple(args.caches.split(",")))
    for model in ("logistic", "mlp"):
        for points in options.parse_text("points", args.points, tuple[int, ...]):
            _report(throughput(model, points))


if __name__ == "__main__":
    main()
