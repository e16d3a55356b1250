"""The run loop: blocks of rounds as one compiled `lax.scan`, evaluation between blocks.

The training population is placed on the device once; inside the scan each round samples its
cohort from (seed, round), gathers it and calls the algorithm's pure round, so `eval_every` rounds
cost one dispatch. Per-round metrics come out of the scan as stacked arrays and are written as
JSON lines; evaluations and the final summary are written beside them.
"""

import dataclasses
import json
import os
import sys
import tempfile
import time
from functools import partial
from typing import Any

import jax
import numpy as np

from fedjax_lab.core.types import Algorithm, experiment_key, init_key
from fedjax_lab.data.sampling import check_cohort_size, cohort_batch, sample_cohort
from fedjax_lab.evaluation import make_evaluator

METRICS_FILE = "metrics.jsonl"
EVALUATIONS_FILE = "evaluations.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"


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


def make_round_block(algorithm: Algorithm, key: jax.Array, num_clients: int, cohort_size: int):
    """`run_block(state, population, num_rounds) -> (state, stacked metrics)`, one jit."""

    def one_round(population, state, _):
        ids = sample_cohort(key, state.round, num_clients, cohort_size)
        state = algorithm.round(state, cohort_batch(population, ids, key, state.round))
        return state, state.metrics

    @partial(jax.jit, static_argnums=2, donate_argnums=0)
    def run_block(state, population, num_rounds):
        return jax.lax.scan(partial(one_round, population), state, None, length=num_rounds)

    return run_block


def _to_python(tree) -> Any:
    return jax.tree.map(lambda leaf: np.asarray(leaf).item(), tree)


def _progress(round_index: int, num_rounds: int, metrics: dict, evaluation: dict | None,
              seconds: float) -> None:
    parts = [f"round {round_index}/{num_rounds}", f"train_loss {metrics['train_loss']:.4f}"]
    if evaluation is not None:
        parts.append(f"test_accuracy {evaluation['test']['accuracy']:.4f}")
    parts.append(f"{seconds:.1f}s")
    end = "\r" if sys.stderr.isatty() and round_index < num_rounds else "\n"
    print(" | ".join(parts), end=end, file=sys.stderr, flush=True)


def run_experiment(algorithm: Algorithm, dataset, *, num_rounds: int, cohort_size: int,
                   seed: int = 0, eval_every: int = 10, eval_train: bool = False,
                   output_dir: str | None = None, config: dict | None = None,
                   progress: bool = True) -> ExperimentResult:
    """Trains `algorithm` on `dataset` for `num_rounds` rounds.

    Args:
        algorithm: the algorithm to run.
        dataset: a `FederatedDataset`; training clients are sampled from `dataset.train`, and
            evaluation scores `algorithm.predict` on every client of `dataset.test`.
        num_rounds: rounds to run.
        cohort_size: clients per round.
        seed: the experiment seed; the same seed gives the same run, bit for bit.
        eval_every: evaluate (and report progress) every this many rounds, and after the last.
        eval_train: also evaluate on the training data (the training loss FedProx plots).
        output_dir: optional folder for metrics.jsonl, evaluations.jsonl, summary.json and
            config.json; refused if it already holds results.
        config: optional description of the run, saved as config.json.
        progress: print a progress line to standard error.
    """
    for name, value in (("num_rounds", num_rounds), ("eval_every", eval_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid; expected a positive integer")
    check_cohort_size(cohort_size, dataset.train.num_clients)
    if output_dir is not None:
        prepare_output_dir(output_dir)
        if config is not None:
            write_json_atomic(os.path.join(output_dir, CONFIG_FILE), config)

    key = experiment_key(seed)
    population = jax.device_put(dataset.train.pad())
    evaluators = {"test": make_evaluator(algorithm, dataset.test.pad(), key)}
    if eval_train:
        evaluators["train"] = make_evaluator(algorithm, dataset.train.pad(), key)
    run_block = make_round_block(algorithm, key, dataset.train.num_clients, cohort_size)

    start = time.perf_counter()
    state = algorithm.init(init_key(key))
    history, evaluations = [], []
    done = 0
    while done < num_rounds:
        block = min(eval_every, num_rounds - done)
        state, metrics = run_block(state, population, block)
        rows = [{"round": done + i + 1, **_to_python(jax.tree.map(lambda m: m[i], metrics))}
                for i in range(block)]
        done += block
        evaluation = {"round": done, **{name: evaluate(state)
                                        for name, evaluate in evaluators.items()}}
        history.extend(rows)
        evaluations.append(evaluation)
        if output_dir is not None:
            with open(os.path.join(output_dir, METRICS_FILE), "a") as out:
                out.writelines(json.dumps(row) + "\n" for row in rows)
            with open(os.path.join(output_dir, EVALUATIONS_FILE), "a") as out:
                out.write(json.dumps(evaluation) + "\n")
        if progress:
            _progress(done, num_rounds, rows[-1], evaluation, time.perf_counter() - start)
    seconds = time.perf_counter() - start
    summary = {"rounds": num_rounds, "seconds": seconds, "final": evaluations[-1],
               "final_train_loss": history[-1]["train_loss"]}
    if output_dir is not None:
        write_json_atomic(os.path.join(output_dir, SUMMARY_FILE), summary)
    return ExperimentResult(state=state, history=history, evaluations=evaluations,
                            summary=summary, seconds=seconds)
