"""A run as data: a nested, validated configuration of data, model, algorithm and run options.

```toml
[algorithm]          # any name of fedjax_lab.algorithms.REGISTRY, then that algorithm's options
name = "ditto"
lam = 0.5
client = { lr = 0.05, epochs = 2 }

[data]               # fedjax_lab.data.REGISTRY
name = "digits"
num_clients = 50

[model]              # fedjax_lab.models.REGISTRY
name = "mlp"

[run]                # RunOptions
rounds = 100
```

A config comes from defaults, then a TOML or JSON file, then command-line overrides
(`--algorithm.lam 0.5`, `--data.alpha 0.1`, `--rounds 5`; `config_from_sources`). Each section's
options are the fields of the chosen entry's config dataclass, so nothing here names an
algorithm, data set or model. `to_dict` gives the `config.json` a run saves, which reruns it
exactly (`load_config`). Every bad value is an `OptionError` naming the option (and the file and
line of a file that does not parse) before anything is built, compiled or written.
"""

import dataclasses
import json
import os
import sys
from typing import Any

import jax.numpy as jnp

from fedjax_lab import compiled
from fedjax_lab import data as data_layer
from fedjax_lab import models as model_layer
from fedjax_lab import options, privacy
from fedjax_lab.algorithms import REGISTRY as ALGORITHMS
from fedjax_lab.compiled import TracedAlgorithm
from fedjax_lab.core.client_execution import STRATEGIES, ClientExecution
from fedjax_lab.core.types import DataInfo
from fedjax_lab.experiment import ExperimentResult, run_experiment
from fedjax_lab.options import (OptionError, one_of, option, optional, optional_positive_int,
                                positive_int)

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

SECTIONS = ("algorithm", "data", "model")
DEFAULT_NAMES = {"algorithm": "fedavg", "data": "digits"}
# The model an algorithm gets when none is named, by what it needs (`AlgorithmSpec.model_kind`).
DEFAULT_MODEL = {"any": "mlp", "split": "split_mlp"}


def registries() -> dict[str, dict]:
    return {"algorithm": ALGORITHMS, "data": data_layer.REGISTRY, "model": model_layer.REGISTRY}


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How long and how a run goes; the default job is 200 rounds of 10 clients."""

    rounds: int = option(200, "rounds to run", positive_int)
    cohort_size: int = option(10, "clients per round", positive_int)
    seed: int = option(0, "experiment seed: initial model, cohorts, client keys",
                       options.non_negative_int)
    data_seed: int | None = option(None, "seed of data generation and partitioning; none = seed",
                                   optional(options.non_negative_int))
    eval_every: int = option(20, "evaluate every this many rounds (and after the last)",
                             positive_int)
    output: str | None = option(None, "folder for config, metrics, evaluations, summary, "
                                "checkpoints")
    checkpoint_every: int | None = option(None, "checkpoint every this many rounds (and at the "
                                          "end); needs output", optional_positive_int)
    allow_divergence: bool = option(False, "keep training past a non-finite loss or parameter")
    execution: str = option("auto", "how clients run", one_of(*STRATEGIES))
    chunk_size: int | None = option(None, "clients per chunk of the chunked strategy",
                                    optional_positive_int)

    def check(self) -> None:
        if self.checkpoint_every is not None and self.output is None:
            raise OptionError("checkpoint_every", self.checkpoint_every,
                              "checkpoints are written under output, which is not set")
        if self.execution == "chunked" and self.chunk_size is None:
            raise OptionError("chunk_size", None, "the chunked strategy needs a chunk size")


@dataclasses.dataclass(frozen=True)
class Selected:
    """A registry entry by name, with its options (an instance of the entry's config class)."""

    name: str
    options: Any


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run: what to train, on what, with which model, and how the run goes."""

    algorithm: Selected
    data: Selected
    model: Selected
    run: RunOptions = RunOptions()

    def to_dict(self) -> dict:
        """The nested plain dict saved as `config.json`; `config_from_dict` inverts it."""
        result = {section: {"name": getattr(self, section).name,
                            **options.to_dict(getattr(self, section).options)}
                  for section in SECTIONS}
        result["run"] = options.to_dict(self.run)
        return result


def _spec(section: str, name: Any):
    registry = registries()[section]
    if name not in registry:
        raise OptionError(f"{section}.name", name,
                          f"unknown {section}; allowed: {', '.join(registry)}")
    return registry[name]


def config_from_dict(mapping: dict) -> Config:
    """A validated `Config` from a nested mapping; missing sections and options take defaults."""
    if not isinstance(mapping, dict):
        raise OptionError("config", mapping, "expected a table with sections "
                          f"{', '.join(SECTIONS + ('run',))}")
    unknown = sorted(set(mapping) - set(SECTIONS + ("run",)))
    if unknown:
        raise OptionError(unknown[0], mapping[unknown[0]], "unknown section; allowed: "
                          f"{', '.join(SECTIONS + ('run',))}")
    chosen = {}
    for section in SECTIONS:
        table = mapping.get(section, {})
        if isinstance(table, str):
            table = {"name": table}
        if not isinstance(table, dict):
            raise OptionError(section, table, "expected a table with a name and options")
        spec = _spec(section, chosen_name(section, mapping))
        values = {key: value for key, value in table.items() if key != "name"}
        if section == "model" and "name" not in table:
            proposed = _data_default_model(mapping)
            if proposed is not None and proposed["name"] == spec.name:
                values = {**{k: v for k, v in proposed.items() if k != "name"}, **values}
        chosen[section] = (spec, options.from_dict(spec.config, values, f"{section}."))
    run = options.from_dict(RunOptions, mapping.get("run", {}), "run.")
    algorithm_spec, model_spec = chosen["algorithm"][0], chosen["model"][0]
    algorithm_spec.check_model_kind(model_spec.name, model_spec.kind)
    return Config(**{section: Selected(spec.name, values)
                     for section, (spec, values) in chosen.items()}, run=run)


def read_config_file(path: str) -> dict:
    """The nested mapping in a TOML (.toml) or JSON (.json) file; errors name the file and line."""
    if not os.path.isfile(path):
        raise OptionError("config", path, "no such file")
    extension = os.path.splitext(path)[1].lower()
    try:
        if extension == ".toml":
            with open(path, "rb") as f:
                return tomllib.load(f)
        if extension == ".json":
            with open(path) as f:
                return json.load(f)
    except tomllib.TOMLDecodeError as error:
        raise OptionError("config", path, f"not valid TOML: {error}") from None
    except json.JSONDecodeError as error:
        raise OptionError("config", path, f"not valid JSON: {error.msg} at line {error.lineno} "
                          f"column {error.colno}") from None
    raise OptionError("config", path, "expected a .toml or .json file")


def load_config(path: str) -> Config:
    """The `Config` of a TOML or JSON file (a run's saved `config.json` reruns it exactly)."""
    try:
        return config_from_dict(read_config_file(path))
    except OptionError as error:
        if error.path == "config":
            raise
        raise OptionError(error.path, error.value, f"{error.expected} (in {path})") from None


def config_from_sources(file: str | None = None, overrides: dict | None = None) -> Config:
    """Defaults, then `file`'s values, then `overrides` (a nested mapping), validated."""
    mapping = {} if file is None else read_config_file(file)
    if overrides:
        mapping = options.merge(mapping, overrides)
    try:
        return config_from_dict(mapping)
    except OptionError as error:
        if file is None:
            raise
        raise OptionError(error.path, error.value, f"{error.expected} (from {file} and the "
                          "command line)") from None


def default_config() -> Config:
    return config_from_dict({})


def chosen_name(section: str, mapping: dict) -> str:
    """The registry name a nested mapping chooses for `section`, defaults applied: a model
    defaults to the data set's own (`DataSpec.default_model`: a text model for text) when the
    chosen algorithm takes any model, else to the kind the algorithm needs."""
    table = mapping.get(section, {})
    name = table.get("name") if isinstance(table, dict) else table
    if name is not None:
        return name
    if section != "model":
        return DEFAULT_NAMES[section]
    kind = _spec("algorithm", chosen_name("algorithm", mapping)).model_kind
    data_model = _data_default_model(mapping)
    return data_model["name"] if kind == "any" and data_model is not None else DEFAULT_MODEL[kind]


def _data_default_model(mapping: dict) -> dict | None:
    """The model table the chosen data set proposes (`DataSpec.default_model`), or None."""
    data_spec = _spec("data", chosen_name("data", mapping))
    data_table = mapping.get("data", {})
    values = {key: value for key, value in data_table.items() if key != "name"} \
        if isinstance(data_table, dict) else {}
    proposed = data_spec.default_model(options.from_dict(data_spec.config, values, "data."))
    return {"name": proposed} if isinstance(proposed, str) else proposed


def override_annotation(dotted: str, mapping: dict):
    """The type of option `dotted` (e.g. "algorithm.lam") given the names `mapping` chooses."""
    section, _, rest = dotted.partition(".")
    if section == "run":
        return options.field_annotation(RunOptions, rest, "run.")
    if section not in SECTIONS or not rest:
        raise OptionError(dotted, "", f"unknown option; sections: {', '.join(SECTIONS)}, run")
    spec = _spec(section, chosen_name(section, mapping))
    return options.field_annotation(spec.config, rest, f"{section}.")


class _Traced:
    """Stands for a traced hyperparameter in the structure of a config (hashable, one value)."""

    def __repr__(self) -> str:
        return "<traced>"


TRACED = _Traced()


def traced_options(spec, options_value) -> dict[str, Any]:
    """`{dotted path: value}` of the options of `options_value` that are traced: those its
    config marks sweepable, except the ones set to None (None switches code, so it is part of
    the structure)."""
    values = options.flatten(options.to_dict(options_value))
    return {path: values[path] for path in options.sweepable_paths(spec.config)
            if values.get(path) is not None}


@compiled.per_structure
def _algorithm_builder(name: str, structure, model, info: DataInfo, execution: ClientExecution):
    spec = _spec("algorithm", name)
    return lambda hyperparameters: spec.build(options.replace_paths(structure, hyperparameters),
                                              model, info, execution)


def algorithm_structure(config: Config):
    """(structure, traced values) of `config`'s algorithm: its options with the traced ones
    (`traced_options`) replaced by `TRACED`, and `{dotted path: value}` of those."""
    return _structure(config.algorithm.name, config.algorithm.options)


def _structure(name: str, algorithm_options):
    traced = traced_options(_spec("algorithm", name), algorithm_options)
    return options.replace_paths(algorithm_options, {path: TRACED for path in traced}), traced


def traced_registered_algorithm(name: str, algorithm_options, model, info: DataInfo,
                                execution: ClientExecution = ClientExecution()
                                ) -> TracedAlgorithm:
    """The registered algorithm `name` with `algorithm_options` (its typed config) for `model`
    and data described by `info`, its sweepable options traced: every call with the same model
    object (`fedjax_lab.models` gives equal factory calls one), the same `info` and options
    differing only in those values shares one builder, hence one compiled program for every
    seed and value (`fedjax_lab.compiled`)."""
    structure, traced = _structure(name, algorithm_options)
    build = _algorithm_builder(name, structure, model, info, execution)
    return TracedAlgorithm(build, {path: jnp.asarray(value) for path, value in traced.items()})


def traced_algorithm(config: Config, info: DataInfo) -> TracedAlgorithm:
    """`config`'s algorithm for data described by `info`, its sweepable options traced
    (`traced_registered_algorithm`): configs differing only in those values and the seed share
    one compiled program."""
    algorithm_spec = _spec("algorithm", config.algorithm.name)
    model_spec = _spec("model", config.model.name)
    algorithm_spec.check_labels(config.data.name, info)
    model_spec.check_targets(config.data.name, info.label_shape)
    model = model_spec.build(config.model.options, info.feature_shape, info.num_classes)
    algorithm_spec.check_model(config.model.name, model)
    return traced_registered_algorithm(config.algorithm.name, config.algorithm.options, model,
                                       info, ClientExecution(config.run.execution,
                                                             config.run.chunk_size))


def load_data(config: Config):
    """The data set `config` names, checked against its cohort size."""
    data_spec = _spec("data", config.data.name)
    seed = config.run.seed if config.run.data_seed is None else config.run.data_seed
    dataset = data_spec.load(config.data.options, seed)
    if config.run.cohort_size > dataset.num_clients:
        raise OptionError("run.cohort_size", config.run.cohort_size,
                          f"expected at most {dataset.num_clients}, the number of clients of "
                          f"data set {config.data.name!r}")
    return dataset


def build(config: Config):
    """(algorithm, dataset, model) of a config: loads the data and builds the model and algorithm."""
    algorithm_spec = _spec("algorithm", config.algorithm.name)
    model_spec = _spec("model", config.model.name)
    dataset = load_data(config)
    model = model_spec.build(config.model.options, dataset.feature_shape, dataset.num_classes)
    algorithm_spec.check_model(config.model.name, model)
    algorithm_spec.check_labels(config.data.name, dataset.info())
    model_spec.check_targets(config.data.name, dataset.info().label_shape)
    execution = ClientExecution(config.run.execution, config.run.chunk_size)
    private_config, _ = private_run(config, dataset)
    algorithm = algorithm_spec.build(private_config.algorithm.options, model, dataset.info(),
                                     execution)
    return algorithm, dataset, model


def private_run(config: Config, dataset):
    """(`config` with its DP noise calibrated to `dp.target_epsilon` when not given, the run's
    accounting `fedjax_lab.privacy.PrivateRun`); `config` and None without DP."""
    algorithm_options, private = privacy.resolve(
        config.algorithm.options, num_clients=dataset.info().num_clients,
        cohort_size=config.run.cohort_size, rounds=config.run.rounds)
    if private is None:
        return config, None
    return dataclasses.replace(config, algorithm=Selected(config.algorithm.name,
                                                          algorithm_options)), private


def run(config: Config, *, progress: bool = True, resume: bool = False) -> ExperimentResult:
    """Builds `config`'s pieces and runs the experiment (resuming from `config.run.output`)."""
    if resume and config.run.output is None:
        raise OptionError("run.output", None, "resuming needs the folder of the run to continue")
    dataset = load_data(config)
    private_config, private = private_run(config, dataset)
    algorithm = traced_algorithm(private_config, dataset.info())
    # A DP run whose budget is spent early stops there (privacy.DPOptions.on_budget).
    rounds = config.run.rounds if private is None else private.rounds
    return run_experiment(algorithm, dataset, num_rounds=rounds,
                          cohort_size=config.run.cohort_size, seed=config.run.seed,
                          eval_every=config.run.eval_every, output_dir=config.run.output,
                          config=config.to_dict(),
                          complete_config=lambda saved: config_from_dict(saved).to_dict(),
                          progress=progress,
                          checkpoint_every=config.run.checkpoint_every, resume=resume,
                          allow_divergence=config.run.allow_divergence, privacy=private)
