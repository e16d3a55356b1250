"""Sweeps: seeds x hyperparameters, run as few compiled programs as the grid allows.

`fedjax-lab sweep --algorithm fedprox --seeds 0-7 --algorithm.mu 0,0.01,0.1,1` runs 32 grid
points. The options a config marks sweepable (learning rates, mu, lambda, ...) are traced
arguments of the compiled program (`config.traced_algorithm`), so the points that differ only in
them and in the seed form one group and run as one program that `vmap`s whole runs (server state,
client states, metrics, evaluations) over a leading run axis (`fedjax_lab.stacked`). Points that
differ in structure (epochs, batch size, cohort size, model widths, data seed) are separate
groups. A group whose stacked runs would not fit the memory budget runs in chunks of points, each
chunk the same program (the last chunk is padded by repeating its final point, whose copies are
dropped). On CPU a group runs in chunks of one point by default, each the single run's own
program (compiled once for all of them), because stacking made each run slower there
(`_plan`); `points_per_program` stacks them anyway. There, as many chunks as the process
has cores run at once, each in a thread of its own (a chunk's program is mostly XLA running
without Python's lock), as many as fit the memory budget; `chunks_at_once` sets it. Every group
is loaded and sized before anything is written, so a grid that cannot run is refused whole.

A sweep's seeds vary the run (initial model, cohorts, client keys); every point draws its data
with the base config's `run.data_seed` (default: its `run.seed`), so a group trains on one
population, and each point's saved config names that data seed. Each point writes the folder a
single run writes (config.json, metrics.jsonl, evaluations.jsonl, summary.json; its config reruns
it alone, see `tests/test_sweep.py` for the equality; a DP point records the ε its run alone
records, and a point whose privacy budget would stop its run early is refused), and the sweep
writes `summary.json`, `summary.md` (mean ± std over seeds per setting, the best setting by a
metric) and `sweep.png`.
Checkpoints are the sweep's (stacked states per chunk), so `resume` continues after a kill -9.
"""

import concurrent.futures
import json
import os
import sys
import threading
import time
import warnings
from typing import Any, NamedTuple, Sequence

import jax
import numpy as np

from fedjax_lab import checkpoint, experiment
from fedjax_lab import config as run_config
from fedjax_lab.options import OptionError
from fedjax_lab.stacked import StackedRuns
from fedjax_lab.sweep_grid import Point, first_config, grid_points, group_key
from fedjax_lab.sweep_report import write_report

SWEEP_FILE = "sweep.json"
# The share of memory the stacked runs of one program may take when no budget is given.
DEFAULT_MEMORY_SHARE = 0.5


def memory_budget() -> int:
    """`DEFAULT_MEMORY_SHARE` of the device's memory (of the host's on the CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    total = stats.get("bytes_limit") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(DEFAULT_MEMORY_SHARE * total)


# `[P]` bool: whether each stacked run's inexact leaves are all finite: one program per structure
# (the 80 checks of an 8-point sweep took 0.3-1.0 s as eager leaf-by-leaf operations, 0.2 s so).
_finite_runs = jax.jit(jax.vmap(experiment.all_finite))


class _Chunk:
    """The points of one program run together: their states, files and progress."""

    def __init__(self, points: list[Point], real: int, dataset, folder: str):
        self.points, self.real, self.folder = points, real, folder
        self.runs = StackedRuns([p.config for p in points], dataset)
        # Each DP point's accounting, so that its files record ε as its run alone's do.
        self.privacy = [run_config.private_run(p.config, dataset)[1] for p in points]
        self.evaluate = self.runs.evaluator(dataset.test.pad(), train_clients=dataset.train.pad())
        self.histories = [[] for _ in points]
        self.evaluations = [[] for _ in points]
        self.diverged: list[dict | None] = [None] * len(points)

    def outputs(self) -> list[str]:
        """The real points' folders (a padded chunk's repeated copies write nothing)."""
        return [p.config.run.output for p in self.points[:self.real]]

    def rough_bytes(self, population) -> int:
        """A lower bound of the program's memory: states, population and cohorts."""
        states = jax.eval_shape(self.runs.init)
        state_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(states))
        population_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(population))
        cohort = population_bytes * self.points[0].config.run.cohort_size // max(
            1, population.y.shape[0])
        return state_bytes + population_bytes + len(self.points) * cohort


def _point_rows(metrics, index: int, first_round: int) -> list[dict]:
    run_metrics = jax.tree.map(lambda m: m[index], metrics)
    length = len(next(iter(jax.tree.leaves(run_metrics))))
    return [{"round": first_round + i + 1,
             **experiment.to_python(jax.tree.map(lambda m: m[i], run_metrics))}
            for i in range(length)]


def _run_chunk(chunk: _Chunk, population, rounds: int, eval_every: int,
               checkpoint_every: int | None, resume: bool, progress: bool,
               stop_requested: threading.Event) -> None:
    states = chunk.runs.init()
    checkpoint_dir = chunk.folder
    if resume:
        restored = checkpoint.load_latest(checkpoint_dir, states)
        if restored is not None:
            states = restored.state
            chunk.histories = restored.history["histories"]
            chunk.evaluations = restored.evaluations
            chunk.diverged = restored.history["diverged"]
    for index, output in enumerate(chunk.outputs() if resume else ()):
        experiment.write_jsonl_atomic(os.path.join(output, experiment.METRICS_FILE),
                                      chunk.histories[index])
        experiment.write_jsonl_atomic(os.path.join(output, experiment.EVALUATIONS_FILE),
                                      chunk.evaluations[index])
    done = int(np.asarray(states.round)[0])
    start = time.perf_counter()
    while done < rounds:
        if stop_requested.is_set():  # another chunk failed: left as a kill -9 leaves it
            return
        stop = experiment.next_stop(done, rounds, eval_every, checkpoint_every)
        states, metrics = chunk.runs.advance(states, population, stop - done)
        metrics = jax.device_get(metrics)  # on the host once, as a single run's are
        finite = np.asarray(_finite_runs(states))
        evaluation = None
        if stop % eval_every == 0 or stop == rounds:
            evaluation = chunk.evaluate(states, per_client=stop == rounds)
        for index, output in enumerate(chunk.outputs()):
            if chunk.diverged[index] is not None:
                continue
            rows = _point_rows(metrics, index, done)
            bad = experiment.first_non_finite(rows)
            if bad is None and not finite[index]:
                bad = (stop, "parameters", float("nan"))
            if bad is not None:
                rows = [row for row in rows if row["round"] <= bad[0]]
                chunk.diverged[index] = {"round": bad[0], "metric": bad[1]}
            privacy = chunk.privacy[index]
            experiment.record_epsilon(privacy, rows, evaluation is not None and bad is None)
            chunk.histories[index].extend(rows)
            with open(os.path.join(output, experiment.METRICS_FILE), "a") as out:
                out.writelines(json.dumps(row) + "\n" for row in rows)
            if evaluation is not None and bad is None:
                row = {"round": stop, "test": evaluation[index]}
                if privacy is not None:
                    row.update(epsilon=privacy.epsilon(stop), delta=privacy.delta)
                chunk.evaluations[index].append(row)
                with open(os.path.join(output, experiment.EVALUATIONS_FILE), "a") as out:
                    out.write(json.dumps(row) + "\n")
        done = stop
        if progress and evaluation is not None:
            best = max(e["accuracy"] for e in evaluation)
            print(f"{os.path.basename(chunk.folder)}: round {done}/{rounds} | best test_accuracy "
                  f"{best:.4f} | {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
        if done == rounds or (checkpoint_every and done % checkpoint_every == 0):
            checkpoint.save(checkpoint_dir, states,
                            {"histories": chunk.histories, "diverged": chunk.diverged},
                            chunk.evaluations, round_index=done)
    seconds = time.perf_counter() - start
    for index, output in enumerate(chunk.outputs()):
        history, evaluations = chunk.histories[index], chunk.evaluations[index]
        summary = {"rounds": rounds, "seconds": seconds,
                   "final": evaluations[-1] if evaluations else None,
                   "final_train_loss": history[-1]["train_loss"] if history else None}
        if chunk.diverged[index] is not None:
            summary["diverged"] = chunk.diverged[index]
        experiment.write_json_atomic(os.path.join(output, experiment.SUMMARY_FILE), summary)


def default_chunks_at_once() -> int:
    """The chunks a sweep runs at once: the process's cores on CPU, one elsewhere."""
    if jax.default_backend() != "cpu":
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


class _Group(NamedTuple):
    """The points of one structure (one program), their data and how their chunks run."""

    members: list[Point]
    dataset: Any
    points_per_program: int
    chunks_at_once: int

    def chunk(self, start: int, folder: str) -> _Chunk:
        """The `points_per_program` points from `start`, the last repeated to fill the chunk."""
        chosen = self.members[start:start + self.points_per_program]
        padding = [chosen[-1]] * (self.points_per_program - len(chosen))
        return _Chunk(chosen + padding, len(chosen), self.dataset, folder)


def _plan(members: list[Point], dataset, budget: int, points_per_program: int | None,
          chunks_at_once: int) -> _Group:
    """The group of `members` on `dataset`, refused if it cannot run; unless `points_per_program`
    is given, the most points per program whose memory fits `budget` bytes (halving from all;
    one on CPU), then up to `chunks_at_once` such chunks at once.

    A group far below the budget (8x its rough size) is not compiled to be measured, nor one whose
    rough size alone exceeds it; otherwise XLA's memory analysis of the compiled block decides
    (the sweep then runs that compiled program). On XLA:CPU a stacked run costs more than a run
    alone (two cores; benchmarks/RESULTS.md, "Sweeps"): the default job's MLP made 95
    point-rounds per second alone and 41 with 8 points stacked (logistic regression 1,231 and
    1,275).
    """
    first = members[0].config
    if experiment.padded_bytes(dataset.train) > experiment.DEVICE_POPULATION_BYTES:
        raise OptionError("data", first.data.name, "a sweep keeps the population on the "
                          "device, and this one is too large; run its points one by one")
    for point in members:
        # The accountant plans a run once (cached) and warns then, so its warnings are held
        # here: the sweep refuses a point whose run would stop early instead of warning that
        # it does, and shows the others' warnings.
        with warnings.catch_warnings(record=True) as accountant_warnings:
            warnings.simplefilter("always")
            private = run_config.private_run(point.config, dataset)[1]
        if private is not None and private.rounds < point.config.run.rounds:
            raise OptionError("algorithm.dp.target_epsilon", private.options.target_epsilon,
                              f"spent after round {private.rounds} of {point.config.run.rounds} "
                              f"at {point.name}, where a run alone would stop (on_budget="
                              "'stop'); a sweep runs every point for run.rounds: lower "
                              "run.rounds, raise the noise multiplier or set on_budget='warn'")
        for caught in accountant_warnings:
            warnings.warn_explicit(caught.message, caught.category, caught.filename, caught.lineno)
    experiment.check_metrics(run_config.traced_algorithm(first, dataset.info()))
    if points_per_program:
        return _Group(members, dataset, points_per_program, chunks_at_once)
    population = jax.device_put(dataset.train.pad())
    size = 1 if jax.default_backend() == "cpu" else len(members)
    while True:
        chunk = _Group(members, dataset, size, chunks_at_once).chunk(0, "")
        needed = chunk.rough_bytes(population)  # a lower bound
        if 8 * chunks_at_once * needed <= budget:
            return _Group(members, dataset, size, chunks_at_once)
        if needed <= budget:  # then the compiled program's own count decides
            stats = chunk.runs.lower(chunk.runs.init(), population, 1).compile().memory_analysis()
            needed = 0 if stats is None else (stats.temp_size_in_bytes +
                                              stats.argument_size_in_bytes +
                                              stats.output_size_in_bytes)
        if needed <= budget:
            return _Group(members, dataset, size, min(chunks_at_once, budget // max(1, needed)))
        if size == 1:
            raise OptionError("memory_budget", budget, f"one grid point alone needs at least "
                              f"{needed} bytes; lower the cohort size or the model, or raise "
                              "the budget")
        size = max(1, size // 2)


def _run_at_once(jobs: list, run, chunks_at_once: int) -> None:
    """`run(job, stop_requested)` for every job, `chunks_at_once` in threads at a time; the first
    failure stops the others at their next block and is raised."""
    stop_requested = threading.Event()
    if chunks_at_once <= 1 or len(jobs) <= 1:
        for job in jobs:
            run(job, stop_requested)
        return
    with concurrent.futures.ThreadPoolExecutor(chunks_at_once) as pool:
        futures = [pool.submit(run, job, stop_requested) for job in jobs]
        try:
            for future in futures:
                future.result()
        except BaseException:
            stop_requested.set()
            for future in futures:
                future.cancel()
            raise


def sweep(base: dict, seeds: Sequence[int], grid: dict[str, Sequence], output: str, *,
          metric: str = "accuracy", points_per_program: int | None = None,
          chunks_at_once: int | None = None, memory_budget_bytes: int | None = None,
          resume: bool = False, progress: bool = True) -> dict:
    """Runs every point of `grid` x `seeds` over the nested config mapping `base`; returns the
    sweep summary (also written to `output`). See the module docstring; `chunks_at_once`
    (default `default_chunks_at_once()`) only changes how fast, never what a point computes."""
    for name, count in (("points_per_program", points_per_program),
                        ("chunks_at_once", chunks_at_once),
                        ("memory_budget", memory_budget_bytes)):
        if count is not None and (not isinstance(count, int) or count < 1):
            raise OptionError(name, count, "expected a whole number >= 1")
    spec = {"base": base, "seeds": [int(s) for s in seeds],
            "grid": {dotted: list(values) for dotted, values in grid.items()},
            "metric": metric, "points_per_program": points_per_program,
            "memory_budget_bytes": memory_budget_bytes}
    points = grid_points(base, seeds, grid, output)
    checkpoint_every = first_config(base, grid, output).run.checkpoint_every
    sweep_file = os.path.join(output, SWEEP_FILE)
    if resume:
        if not os.path.exists(sweep_file):
            raise FileNotFoundError(f"cannot resume {output!r}: it has no {SWEEP_FILE}")
        with open(sweep_file) as f:
            saved = json.load(f)
        saved.setdefault("memory_budget_bytes", None)  # sweeps before 6f13930 did not save it
        if saved != json.loads(json.dumps(spec)):
            raise experiment.ConfigMismatchError(
                f"cannot resume {output!r} with a different sweep than its {SWEEP_FILE}")
    elif os.path.exists(sweep_file):
        raise FileExistsError(f"output folder {output!r} already holds a sweep")
    structures: dict[Any, list[Point]] = {}
    for point in points:
        structures.setdefault(group_key(point.config), []).append(point)
    # Every group is loaded and sized before anything is written, so what cannot run (data too
    # large, a cohort larger than the data, a point over the memory budget) leaves no trace.
    budget = memory_budget() if memory_budget_bytes is None else memory_budget_bytes
    datasets = {}
    groups = []
    for members in structures.values():
        run = members[0].config.run
        key = (members[0].config.data, run.data_seed, run.cohort_size)
        if key not in datasets:
            datasets[key] = run_config.load_data(members[0].config)
        groups.append(_plan(members, datasets[key], budget, points_per_program,
                            chunks_at_once or default_chunks_at_once()))
    if not resume:
        experiment.prepare_output_dir(output)
        for point in points:
            experiment.prepare_output_dir(point.config.run.output)
            experiment.write_json_atomic(
                os.path.join(point.config.run.output, experiment.CONFIG_FILE),
                point.config.to_dict())
        experiment.write_json_atomic(sweep_file, spec)
    for group_index, group in enumerate(groups):
        population = jax.device_put(group.dataset.train.pad())
        first, size = group.members[0].config, group.points_per_program
        jobs = []
        for index, start in enumerate(range(0, len(group.members), size)):
            finished = resume and all(
                os.path.exists(os.path.join(p.config.run.output, experiment.SUMMARY_FILE))
                for p in group.members[start:start + size])
            if not finished:
                jobs.append((index, start))

        def run_job(job, stop_requested):
            index, start = job
            folder = os.path.join(output, experiment.CHECKPOINT_DIR,
                                  f"group{group_index}-chunk{index}")
            _run_chunk(group.chunk(start, folder), population, first.run.rounds,
                       first.run.eval_every, checkpoint_every, resume, progress,
                       stop_requested)

        _run_at_once(jobs, run_job, group.chunks_at_once)
    return write_report(output, points, metric)
