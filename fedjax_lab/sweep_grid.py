"""A sweep's grid: its points (setting x seed), each a validated config with its own folder, and
the structure that groups them into compiled programs (`fedjax_lab.sweep` runs them).

    base = {"algorithm": {"name": "fedprox"}}
    points = grid_points(base, parse_seeds("0-7"), {"algorithm.mu": [0.0, 0.1]}, "out")
    points[0].name    # "algorithm.mu=0.0,seed=0": 16 points, the first's folder out/points/<name>
"""

import dataclasses
import itertools
import os
from typing import Any, NamedTuple, Sequence

from fedjax_lab import config as run_config
from fedjax_lab import options
from fedjax_lab.options import OptionError

POINTS_DIR = "points"
# Run options a grid may vary (other run options are how a run goes, not what it computes).
GRID_RUN_OPTIONS = ("cohort_size", "data_seed")


class Point(NamedTuple):
    """One grid point: its grid values (without the seed), its seed and its validated config."""

    setting: tuple[tuple[str, Any], ...]
    seed: int
    config: run_config.Config

    @property
    def name(self) -> str:
        return ",".join([f"{path}={value}" for path, value in self.setting] +
                        [f"seed={self.seed}"])


def parse_seeds(text: str) -> tuple[int, ...]:
    """"0-7" (inclusive), "0,3,5" or "4"; an empty or malformed range is an `OptionError`."""
    seeds = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            low, high = int(first), int(last) if dash else int(first)
        except ValueError:
            raise OptionError("seeds", text, "expected seeds like 0-7 or 0,3,5") from None
        if low < 0 or high < low:
            raise OptionError("seeds", text, f"range {part.strip()!r} is empty or negative")
        seeds.extend(range(low, high + 1))
    if len(set(seeds)) != len(seeds):
        raise OptionError("seeds", text, "a seed is listed twice")
    return tuple(seeds)


def check_grid_option(dotted: str, values: Sequence, mapping: dict) -> None:
    """Refuses a grid over an option that is not a number or not a hyperparameter of the run."""
    section, _, rest = dotted.partition(".")
    values = list(values)
    if dotted == "run.seed":
        raise OptionError(dotted, values, "the seeds are given by --seeds")
    if section == "run" and rest not in GRID_RUN_OPTIONS:
        raise OptionError(dotted, values, "not a hyperparameter (a sweep may vary "
                          f"{', '.join('run.' + name for name in GRID_RUN_OPTIONS)} among the "
                          "run options)")
    annotation = run_config.override_annotation(dotted, mapping)
    kinds = set(getattr(annotation, "__args__", (annotation,))) - {type(None)}
    if not kinds or not kinds <= {int, float}:
        raise OptionError(dotted, values, "not numeric, so not sweepable; list the values of a "
                          "number option (`fedjax-lab list NAME` marks the sweepable ones)")


def first_config(base: dict, grid: dict[str, Sequence], output: str) -> run_config.Config:
    """`base` with every grid option at its first value, validated: the base alone may be
    invalid (DP's noise multiplier given only by the grid) where every point is not."""
    mapping = options.merge(base, {"run": {"output": output}})
    for dotted, values in grid.items():
        mapping = options.merge(mapping, options.nest(dotted, values[0]))
    return run_config.config_from_dict(mapping)


def grid_points(base: dict, seeds: Sequence[int], grid: dict[str, Sequence],
                output: str) -> list[Point]:
    """Every (setting, seed) of `grid` over the nested mapping `base`, each validated, with its
    own output folder and the sweep's data seed."""
    if not seeds:
        raise OptionError("seeds", "", "expected at least one seed")
    for dotted, values in grid.items():
        check_grid_option(dotted, values, base)
        if not len(values):
            raise OptionError(dotted, [], "expected at least one value")
    base_config = first_config(base, grid, output)
    data_seed = (base_config.run.seed if base_config.run.data_seed is None
                 else base_config.run.data_seed)
    points = []
    for values in itertools.product(*grid.values()):
        setting = tuple(zip(grid, values))
        for seed in seeds:
            point = Point(setting, int(seed), None)
            mapping = base
            for dotted, value in setting:
                mapping = options.merge(mapping, options.nest(dotted, value))
            mapping = options.merge(mapping, {"run": {
                "seed": int(seed), "checkpoint_every": None,
                "output": os.path.join(output, POINTS_DIR, point.name),
                "data_seed": dict(setting).get("run.data_seed", data_seed)}})
            points.append(point._replace(config=run_config.config_from_dict(mapping)))
    return points


def group_key(config: run_config.Config):
    """What makes a program: the algorithm's structure, model, data and run options, all but
    the traced values, the seed and where the results go."""
    structure, _ = run_config.algorithm_structure(config)
    run = dataclasses.replace(config.run, seed=0, output=None, checkpoint_every=None,
                              allow_divergence=False)
    return config.algorithm.name, structure, config.model, config.data, run
