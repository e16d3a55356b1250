"""The run loop: blocks of rounds as one compiled `lax.scan`, evaluation between blocks.

The training population is placed on the device once; inside the scan each round samples its
cohort from (seed, round), gathers it and calls the algorithm's pure round, so `eval_every` rounds
cost one dispatch. Per-round metrics come out of the scan as stacked arrays and are written as
JSON lines; evaluations and the final summary are written beside them.
"""

import dataclasses
import json
import math
import os
import sys
import tempfile
import time
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab import checkpoint, compiled, distributed
from fedjax_lab.compiled import TracedAlgorithm
from fedjax_lab.core import sharding
from fedjax_lab.core.types import REQUIRED_METRICS, Algorithm, experiment_key, init_key
from fedjax_lab.data.sampling import check_cohort_size
from fedjax_lab.data.stream import HostCohortStream
from fedjax_lab.evaluation import has_adapted_view, make_evaluator
from fedjax_lab.options import flatten

METRICS_FILE = "metrics.jsonl"
EVALUATIONS_FILE = "evaluations.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
# Populations up to this size (padded) live on the device; larger ones are fed from the host.
DEVICE_POPULATION_BYTES = 2**30


@dataclasses.dataclass
class ExperimentResult:
    """Attributes: the final server state, per-round metrics, evaluations, summary, seconds."""

    state: Any
    history: list[dict]
    evaluations: list[dict]
    summary: dict
    seconds: float


def write_json_atomic(path: str, value: Any) -> None:
    """Writes JSON to a temporary file in the same folder, then renames it over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(handle, "w") as out:
            json.dump(value, out, indent=2, sort_keys=True)
            out.write("\n")
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def prepare_output_dir(output_dir: str) -> None:
    """Creates `output_dir`, refusing one that already holds results (they would be lost)."""
    if os.path.isdir(output_dir):
        existing = [name for name in (METRICS_FILE, EVALUATIONS_FILE, SUMMARY_FILE)
                    if os.path.exists(os.path.join(output_dir, name))]
        if existing:
            raise FileExistsError(f"output folder {output_dir!r} already holds results "
                                  f"({', '.join(existing)}); choose another folder")
    elif os.path.exists(output_dir):
        raise NotADirectoryError(f"output folder {output_dir!r} exists and is not a folder")
    os.makedirs(output_dir, exist_ok=True)


def padded_bytes(clients) -> int:
    """Bytes of a population once padded to its largest client (inputs, labels and mask)."""
    per_example = np.prod(clients.feature_shape, dtype=np.int64) * 4 + 4 + 1
    return int(clients.num_clients * int(clients.num_examples.max(initial=1)) * per_example)


def to_python(tree) -> Any:
    return jax.tree.map(lambda leaf: np.asarray(leaf).item(), tree)


def _progress(round_index: int, num_rounds: int, metrics: dict, evaluation: dict | None,
              seconds: float) -> None:
    parts = [f"round {round_index}/{num_rounds}", f"train_loss {metrics['train_loss']:.4f}"]
    if evaluation is not None:
        parts.append(f"test_accuracy {evaluation['test']['accuracy']:.4f}")
        if "epsilon" in evaluation:
            parts.append(f"epsilon {evaluation['epsilon']:.4g} (delta {evaluation['delta']:.3g})")
    parts.append(f"{seconds:.1f}s")
    end = "\r" if sys.stderr.isatty() and round_index < num_rounds else "\n"
    print(" | ".join(parts), end=end, file=sys.stderr, flush=True)


class DivergenceError(RuntimeError):
    """Training produced a non-finite metric or parameter; the message names round and metric."""


class ConfigMismatchError(ValueError):
    """A resumed run's configuration differs from the saved one; the message names the fields."""


# Options that change how a run is carried out but not its results, so a resume may change them
# (top-level keys of a flat config, or the last part of a nested one's dotted paths).
RESUMABLE_CHANGES = frozenset({"output", "checkpoint_every", "allow_divergence"})


def _check_same_config(output_dir: str, config: dict,
                       complete: Callable[[dict], dict] | None) -> None:
    path = os.path.join(output_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"cannot resume {output_dir!r}: it has no {CONFIG_FILE}")
    with open(path) as f:
        saved = json.load(f)
    saved = flatten(json.loads(json.dumps(saved if complete is None else complete(saved))))
    current = flatten(json.loads(json.dumps(config)))
    differing = [name for name in sorted(set(saved) | set(current))
                 if name.rpartition(".")[2] not in RESUMABLE_CHANGES
                 and saved.get(name) != current.get(name)]
    if differing:
        details = ", ".join(f"{name} (saved {saved.get(name)!r}, now {current.get(name)!r})"
                            for name in differing)
        raise ConfigMismatchError(f"cannot resume {output_dir!r} with a different configuration: "
                                  f"{details}")


def write_jsonl_atomic(path: str, rows: list[dict]) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".jsonl")
    with os.fdopen(handle, "w") as out:
        out.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(temporary, path)


def first_non_finite(rows: list[dict]) -> tuple[int, str, float] | None:
    for row in rows:
        for name, value in row.items():
            if isinstance(value, float) and not math.isfinite(value):
                return row["round"], name, value
    return None


def record_epsilon(privacy, rows: list[dict], evaluated: bool) -> None:
    """Writes a DP run's ε spent (`privacy`: its `fedjax_lab.privacy.PrivateRun`; None: no DP)
    into a block's metric rows: every round's where the accountant composes cheaply (RDP), else
    the last row's when the block ends in an evaluation (a PLD composition each)."""
    if privacy is None:
        return
    for row in rows:
        if privacy.mechanism.cheap_per_round or (evaluated and row is rows[-1]):
            row["epsilon"] = privacy.epsilon(row["round"])


@jax.jit
def all_finite(state) -> jax.Array:
    """Whether every inexact leaf of `state` is finite (a scalar bool)."""
    # One program for the whole state: checked leaf by leaf, every leaf shape compiled its own
    # pair of small programs, again in every process (most of a cached run's compile time).
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(state)
                              if jax.dtypes.issubdtype(leaf.dtype, jnp.inexact)] or [True]))


def next_stop(done: int, num_rounds: int, *periods: int | None) -> int:
    """The next round at which to evaluate, checkpoint or finish."""
    stops = [num_rounds] + [(done // period + 1) * period for period in periods if period]
    return min(stops)


def check_metrics(traced: TracedAlgorithm) -> None:
    """Refuses an algorithm whose rounds do not report `REQUIRED_METRICS` (before compiling)."""
    missing = [name for name in REQUIRED_METRICS if name not in compiled.metric_shapes(traced)]
    if missing:
        raise ValueError(f"the algorithm's metrics lack {', '.join(missing)}; every round "
                         f"reports {', '.join(REQUIRED_METRICS)} (core.metrics.round_metrics)")


def make_evaluators(traced: TracedAlgorithm, dataset, key: jax.Array,
                    eval_train: bool = False) -> dict:
    """`{"test": evaluate}` (and "train" with `eval_train`) of a run; an adapting algorithm
    adapts on each client's training data and is scored on its test data."""
    train_clients = dataset.train.pad() if has_adapted_view(traced) else None
    evaluators = {"test": make_evaluator(traced, dataset.test.pad(), key,
                                         train_clients=train_clients)}
    if eval_train:
        evaluators["train"] = make_evaluator(traced, dataset.train.pad(), key)
    return evaluators


def run_experiment(algorithm: Algorithm | TracedAlgorithm, dataset, *, num_rounds: int, cohort_size: int,
                   seed: int = 0, eval_every: int = 10, eval_train: bool = False,
                   output_dir: str | None = None, config: dict | None = None,
                   complete_config: Callable[[dict], dict] | None = None,
                   progress: bool = True, checkpoint_every: int | None = None,
                   resume: bool = False, allow_divergence: bool = False,
                   population_on_device: bool | None = None,
                   mesh: jax.sharding.Mesh | None = None, privacy=None) -> ExperimentResult:
    """Trains `algorithm` on `dataset` for `num_rounds` rounds.

    Runs of the same structure (the same `Algorithm` object, or `TracedAlgorithm`s sharing their
    `build`, with the same population and cohort sizes) reuse one compiled program, whatever the
    seed and the hyperparameters' values (`fedjax_lab.compiled`).

    Args:
        algorithm: the algorithm to run, or a `TracedAlgorithm` (built inside the compiled
            program from its hyperparameters: `fedjax_lab.config.traced_algorithm`).
        dataset: a `FederatedDataset`; training clients are sampled from `dataset.train`, and
            evaluation scores `algorithm.predict` on every client of `dataset.test` (plus the
            "global" view of `predict_global`, and the "adapted" view of `adapted_predict`:
            each client adapts on its `dataset.train` examples and is scored on its test ones).
        num_rounds: rounds to run (in total, counting rounds run before a resume).
        cohort_size: clients per round.
        seed: the experiment seed; the same seed gives the same run, bit for bit.
        eval_every: evaluate (and report progress) every this many rounds, and after the last.
        eval_train: also evaluate on the training data (the training loss FedProx plots).
        output_dir: optional folder for metrics.jsonl, evaluations.jsonl, summary.json,
            config.json and checkpoints/; refused if it already holds results, unless resuming.
            The last evaluation (and so summary["final"]) also lists `client_accuracies`.
        config: optional description of the run, saved as config.json; on resume it must equal
            the saved one except for RESUMABLE_CHANGES.
        complete_config: on resume, fills the saved config.json in before that comparison (so a
            run saved before an option existed resumes when today's value is the default):
            `fedjax_lab.config.run` passes its registries' defaults.
        progress: print a progress line to standard error.
        checkpoint_every: checkpoint every this many rounds (and at the end); needs output_dir.
            With an output_dir and no period, a checkpoint is written at the end only.
        resume: continue from the newest usable checkpoint in output_dir/checkpoints (from round
            0 if there is none yet); the result is bit-identical to a run that was never
            interrupted.
        allow_divergence: keep going when a metric or parameter becomes non-finite, instead of
            stopping with `DivergenceError` (for those who study divergence).
        population_on_device: place the padded training population on the device so sampling
            and gathering run inside the scan (True), or keep it on the host and feed each
            block of rounds from it (False); both draw the same cohorts and keys, so the run is
            the same. None chooses the device when the padded population takes at most
            DEVICE_POPULATION_BYTES.
        mesh: a device mesh with a `clients` axis (`fedjax_lab.core.sharding.client_mesh`):
            the population, the per-client state and host-fed cohorts are placed sharded along
            it (a leading axis that does not divide evenly is replicated). None uses every
            visible device when there are several, and places nothing on a single device.
        privacy: a DP run's accounting (`fedjax_lab.privacy.PrivateRun`): each evaluation
            records the `epsilon` spent so far at its `delta`, and so does each round's metrics
            row under the RDP accountant ("fixed" sampling; under PLD, "poisson", the rows of
            evaluated rounds, since each round count is a composition of its own).
    """
    for name, value in (("num_rounds", num_rounds), ("eval_every", eval_every),
                        ("checkpoint_every", 1 if checkpoint_every is None else checkpoint_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid; expected a positive integer")
    check_cohort_size(cohort_size, dataset.train.num_clients)
    traced = compiled.as_traced(algorithm)
    check_metrics(traced)
    if (checkpoint_every is not None or resume) and output_dir is None:
        raise ValueError("checkpoints and resume need an output_dir")
    if resume:
        if not os.path.isdir(output_dir):
            raise FileNotFoundError(f"cannot resume {output_dir!r}: no such folder")
        if config is not None:
            _check_same_config(output_dir, config, complete_config)
    elif output_dir is not None:
        prepare_output_dir(output_dir)
        if config is not None:
            write_json_atomic(os.path.join(output_dir, CONFIG_FILE), config)

    key = experiment_key(seed)
    mesh = sharding.default_mesh() if mesh is None else mesh
    if mesh is not None:
        traced = traced._replace(build=compiled.on_mesh(traced.build, mesh))
    hyperparameters = traced.hyperparameters
    if population_on_device is None:
        population_on_device = padded_bytes(dataset.train) <= DEVICE_POPULATION_BYTES
    if population_on_device:
        population = (jax.device_put(dataset.train.pad()) if mesh is None
                      else sharding.place_population(dataset.train.pad(), mesh))
        device_block = compiled.device_block(traced.build, dataset.train.num_clients,
                                             cohort_size)
        run_block = lambda state, first, length: device_block(state, population, key,
                                                              hyperparameters, length)
    else:
        stream = HostCohortStream(dataset.train, key, cohort_size,
                                  cohorts=traced.build(hyperparameters).cohorts)
        if jax.process_count() > 1:
            stream = distributed.ProcessCohortStream(stream, mesh)
        host_block = compiled.host_block(traced.build)
        run_block = lambda state, first, length: host_block(state, stream.block(first, length),
                                                            hyperparameters)
    evaluators = make_evaluators(traced, dataset, key, eval_train)
    checkpoint_dir = None if output_dir is None else os.path.join(output_dir, CHECKPOINT_DIR)

    start, compile_start = time.perf_counter(), compiled.compile_seconds()
    state = compiled.init_state(traced, init_key(key))
    history, evaluations = [], []
    if resume:
        restored = checkpoint.load_latest(checkpoint_dir, state)
        if restored is None:
            # Killed before its first checkpoint: round 0 is the newest state there is.
            warnings.warn(f"no usable checkpoint in {checkpoint_dir}; starting from round 0",
                          stacklevel=2)
        else:
            state, history, evaluations = (restored.state, restored.history,
                                           restored.evaluations)
        write_jsonl_atomic(os.path.join(output_dir, METRICS_FILE), history)
        write_jsonl_atomic(os.path.join(output_dir, EVALUATIONS_FILE), evaluations)
    if mesh is not None:
        state = sharding.place_state(state, mesh)
    done = int(state.round)
    if done > num_rounds:
        raise ValueError(f"num_rounds={num_rounds} is below the checkpoint's round {done}")
    while done < num_rounds:
        stop = next_stop(done, num_rounds, eval_every, checkpoint_every)
        state, metrics = run_block(state, done, stop - done)
        metrics = jax.device_get(metrics)
        rows = [{"round": done + i + 1, **to_python(jax.tree.map(lambda m: m[i], metrics))}
                for i in range(stop - done)]
        done = stop
        evaluating = done % eval_every == 0 or done == num_rounds
        bad = first_non_finite(rows)
        record_epsilon(privacy, rows, evaluating)
        history.extend(rows)
        if output_dir is not None:
            with open(os.path.join(output_dir, METRICS_FILE), "a") as out:
                out.writelines(json.dumps(row) + "\n" for row in rows)
        if bad is None and not bool(all_finite(state)):
            bad = (done, "parameters", math.nan)
        if bad is not None and not allow_divergence:
            kept = checkpoint.list_checkpoints(checkpoint_dir) if checkpoint_dir else []
            where = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint kept"
            raise DivergenceError(f"training diverged at round {bad[0]}: {bad[1]} is {bad[2]}; "
                                  f"stopped ({where}); allow_divergence continues past it")
        evaluation = None
        if evaluating:
            # The last evaluation also keeps every client's accuracy (for `fedjax-lab plot`).
            evaluation = {"round": done, **{name: evaluate(state, per_client=done == num_rounds)
                                            for name, evaluate in evaluators.items()}}
            if privacy is not None:
                evaluation.update(epsilon=privacy.epsilon(done), delta=privacy.delta)
            evaluations.append(evaluation)
            if output_dir is not None:
                with open(os.path.join(output_dir, EVALUATIONS_FILE), "a") as out:
                    out.write(json.dumps(evaluation) + "\n")
            if progress:
                _progress(done, num_rounds, rows[-1], evaluation, time.perf_counter() - start)
        if checkpoint_dir is not None and (
                done == num_rounds or (checkpoint_every and done % checkpoint_every == 0)):
            checkpoint.save(checkpoint_dir, state, history, evaluations)
    seconds = time.perf_counter() - start
    summary = {"rounds": num_rounds, "seconds": seconds,
               "compile_seconds": compiled.compile_seconds() - compile_start,
               "final": evaluations[-1], "final_train_loss": history[-1]["train_loss"],
               # What accuracy and loss count: examples, or the tokens of next-token targets.
               "counted": "tokens" if dataset.train.label_shape else "examples"}
    if output_dir is not None:
        write_json_atomic(os.path.join(output_dir, SUMMARY_FILE), summary)
    return ExperimentResult(state=state, history=history, evaluations=evaluations,
                            summary=summary, seconds=seconds)
