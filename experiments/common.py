"""What every experiment script shares: its command line, the loop over methods and seeds, the
statistics over seeds, the results file and the end of each figure.

An experiment declares the methods it compares as registry configs (`registry_method`: a name,
an algorithm of `fedjax_lab.algorithms.REGISTRY` and the options it changes, as a run's config
file would), runs each under every seed with `sweep`, summarises the per-seed numbers with
`mean_std` / `summarize`, writes `results.json` with `write_results` and saves each figure with
`save_figure`. A `Method` with a Python builder is left only where no config can say the method
(an attack, a custom loss), and the script's docstring says why. Its claims and the rule that
checks them live beside it (`experiments.claims`), read by `experiments.report`.
"""

import argparse
import dataclasses
import os
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from fedjax_lab.experiment import write_json_atomic


def experiment_parser(doc: str, *, rounds: int, seeds, output: str) -> argparse.ArgumentParser:
    """`--rounds`, `--seeds` and `--output` with the script's defaults; add its own options."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(seeds))
    parser.add_argument("--output", default=output)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv, counts=("rounds",)) -> argparse.Namespace:
    """Parses `argv`; each option named in `counts` must be a positive integer."""
    args = parser.parse_args(argv)
    for name in counts:
        value = getattr(args, name)
        if value < 1:
            parser.error(f"--{name.replace('_', '-')} {value} is invalid; "
                         "expected a positive integer")
    return args


# ---- methods and seeds --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Method:
    """One compared method: its name in the results and `build(*setting)`, an `Algorithm` or
    a `TracedAlgorithm` (`fedjax_lab.compiled`).

    `setting` is what the experiment makes for a seed (usually the model and the data set), so
    one declaration serves every seed and the list of methods reads as the experiment's design.
    """

    name: str
    build: Callable[..., Any]


def registry_method(name: str, algorithm: str, **overrides) -> Method:
    """A Method building the registered `algorithm` from its paper defaults changed by
    `overrides` (option groups as dicts: `client={"lr": 0.05}`); `build(model, data_info)`
    gives a `TracedAlgorithm` (`config.traced_registered_algorithm`), so the seeds of a method
    and the methods differing only in sweepable values (a learning-rate grid) compile one
    program.

    The overrides are validated here, so a wrong option fails before any run starts.
    """
    from fedjax_lab.algorithms import get_algorithm
    from fedjax_lab.config import traced_registered_algorithm
    from fedjax_lab.options import from_dict

    config = from_dict(get_algorithm(algorithm).config, overrides, "algorithm.")
    return Method(name, lambda model, data: traced_registered_algorithm(algorithm, config,
                                                                        model, data))


def choose(option: str, names, allowed: Sequence[str]) -> tuple[str, ...]:
    """The names in `names` (None: all of `allowed`) in `allowed`'s order; others are refused."""
    if names is None:
        return tuple(allowed)
    names = tuple(names)
    if not names or any(name not in allowed for name in names):
        raise ValueError(f"{option}={names!r} is invalid; expected a non-empty subset of "
                         f"{', '.join(allowed)}")
    return tuple(name for name in allowed if name in names)


def chosen(methods: Sequence[Method], names=None, option: str = "method_names") -> list[Method]:
    """The `methods` named in `names` (all when None), in declared order."""
    keep = choose(option, names, [method.name for method in methods])
    return [method for method in methods if method.name in keep]


def sweep(methods: Iterable[Method], seeds, run: Callable[[Method, int], dict]) -> dict:
    """`{method.name: {str(seed): run(method, seed)}}`: every method under every seed.

    Every method sees the same seeds, hence the same data draws, cohorts and shuffles; `run`
    returns the seed's record (numbers and curves) that `summarize` reduces over seeds.
    """
    return {method.name: {str(seed): run(method, int(seed)) for seed in seeds}
            for method in methods}


def mean_std(values) -> dict:
    """Mean, population std (numpy's default, as every recorded result uses) and range over
    seeds of one per-seed number."""
    values = np.asarray(values, np.float64)
    return {"mean": float(values.mean()), "std": float(values.std()),
            "min": float(values.min()), "max": float(values.max())}


def summarize(records: Iterable[Mapping], keys) -> dict:
    """`{key: mean_std}` over per-seed records (dicts holding each of `keys`)."""
    records = list(records)
    return {key: mean_std([record[key] for record in records]) for key in keys}


def summarize_by_method(runs: Mapping[str, Mapping[str, Mapping]], keys) -> dict:
    """`{method: {key: mean_std}}` of seed-major runs `{seed: {method: record}}` (experiments
    that score every method on one seed's data before drawing the next)."""
    methods = next(iter(runs.values()))
    return {method: summarize([run[method] for run in runs.values()], keys) for method in methods}


def client_scores(evaluation: dict) -> dict:
    """A personalised evaluation's client accuracies under the names every results file uses."""
    return {"mean": evaluation["client_accuracy_mean"],
            "worst10": evaluation["client_accuracy_worst10"],
            "std": evaluation["client_accuracy_std"], "pooled": evaluation["accuracy"]}


SCORE_KEYS = ("mean", "worst10", "std", "pooled")


def finals(runs: Mapping[str, Mapping], key: str) -> list:
    """The last point of each seed's curve `key` (final-round numbers, never best-of-run)."""
    return [record[key][-1] for record in runs.values()]


# ---- results and figures ------------------------------------------------------------------------

def start(output: str, seeds) -> tuple[list[int], float]:
    """Creates `output`; returns the seeds as ints and the start time `write_results` reads."""
    os.makedirs(output, exist_ok=True)
    return [int(seed) for seed in seeds], time.perf_counter()


def write_results(output: str, results: dict, started: float) -> dict:
    """Records the wall time in `results["settings"]`, writes `output/results.json`, returns it."""
    results["settings"]["wall_seconds"] = time.perf_counter() - started
    write_json_atomic(os.path.join(output, "results.json"), results)
    return results


def pyplot():
    """`matplotlib.pyplot` on the Agg back end (figures only go to files)."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("plotting needs matplotlib: pip install 'fedjax_lab[plot]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def band(ax, x, curves, label: str, **style):
    """The mean of per-seed `curves` against `x`, with their min-max range shaded (several
    seeds); returns the line, whose colour other panels may reuse."""
    curves = np.asarray(curves, np.float64)
    line, = ax.plot(x, curves.mean(axis=0), label=label, **style)
    if len(curves) > 1:
        ax.fill_between(x, curves.min(axis=0), curves.max(axis=0), color=line.get_color(),
                        alpha=0.2, linewidth=0)
    return line


def save_figure(fig, path: str) -> None:
    """Lays out, writes (100 dpi PNG) and closes `fig`."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
