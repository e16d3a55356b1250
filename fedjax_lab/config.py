"""A run's configuration: validated in full before anything is built, compiled or written.

`RunConfig` is what `fedjax-lab run` parses and what a script can build directly; `run(config)`
builds the data set, model and algorithm from the registries below and calls `run_experiment`.
Every bad value is reported as one line naming the option, the value and what is allowed.
"""

import dataclasses
import json
import math
import os
from typing import Any, Callable

import optax

from fedjax_lab.algorithms import fedavg, fedprox
from fedjax_lab.core.aggregation import WEIGHTINGS
from fedjax_lab.core import factored
from fedjax_lab.core.client_execution import STRATEGIES, ClientExecution
from fedjax_lab.data import digits, fedprox_synthetic
from fedjax_lab.data.mnist1d import mnist1d
from fedjax_lab.data.partitioned import PARTITIONS
from fedjax_lab.experiment import CONFIG_FILE, ExperimentResult, run_experiment
from fedjax_lab.models import MODELS, get_model

ALGORITHMS = {"fedavg": "FedAvg (McMahan et al., 2017)",
              "fedprox": "FedProx (Li et al., 2020): proximal term mu, keeps stragglers"}
DATASETS = {
    "digits": "scikit-learn's 8x8 digits over --num-clients clients (default 50; --partition, "
              "--alpha)",
    "synthetic": "FedProx Synthetic(--alpha, --beta), --num-clients devices (default 30), sizes "
                 "capped at 1000",
    "synthetic_iid": "FedProx Synthetic-IID, --num-clients devices (default 30), sizes capped at "
                     "1000",
    "mnist1d": "MNIST-1D generated locally (needs pip install 'fedjax_lab[data]') over "
               "--num-clients clients (default 50; --partition, --alpha)",
}
DEFAULT_NUM_CLIENTS = {"digits": 50, "synthetic": 30, "synthetic_iid": 30, "mnist1d": 50}
SERVER_OPTIMIZERS: dict[str, Callable[[float], optax.GradientTransformation]] = {
    "sgd": optax.sgd, "adam": optax.adam, "yogi": optax.yogi, "adagrad": optax.adagrad}


class ConfigError(ValueError):
    """A bad option: `option`, the offending `value` and what is `expected`."""

    def __init__(self, option: str, value: Any, expected: str):
        self.option, self.value, self.expected = option, value, expected
        super().__init__(f"{option}={value!r} is invalid; {expected}")

    def as_flag(self) -> str:
        """The same message with the option spelt as a command-line flag."""
        return f"--{self.option.replace('_', '-')} {self.value!r} is invalid; {self.expected}"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run. Defaults are the CLI's default job: FedAvg on digits."""

    algorithm: str = "fedavg"
    dataset: str = "digits"
    model: str = "mlp"
    rounds: int = 200
    cohort_size: int = 10
    num_clients: int | None = None
    partition: str = "dirichlet"
    alpha: float = 0.5
    beta: float = 1.0
    local_epochs: int = 5
    batch_size: int | None = 10
    client_lr: float = 0.05
    server_optimizer: str = "sgd"
    server_lr: float = 1.0
    mu: float = 0.0
    stragglers: float = 0.0
    weighting: str = "num_examples"
    execution: str = "auto"
    chunk_size: int | None = None
    seed: int = 0
    eval_every: int = 20
    output: str | None = None
    checkpoint_every: int | None = None
    allow_divergence: bool = False

    def validate(self) -> None:
        """Raises `ConfigError` for the first invalid option."""
        _choice("algorithm", self.algorithm, ALGORITHMS)
        _choice("dataset", self.dataset, DATASETS)
        _choice("model", self.model, MODELS)
        _choice("partition", self.partition, PARTITIONS)
        _choice("server_optimizer", self.server_optimizer, SERVER_OPTIMIZERS)
        _choice("weighting", self.weighting, WEIGHTINGS)
        _choice("execution", self.execution, STRATEGIES)
        for option in ("rounds", "local_epochs", "eval_every"):
            _positive_int(option, getattr(self, option))
        if self.checkpoint_every is not None:
            _positive_int("checkpoint_every", self.checkpoint_every)
            if self.output is None:
                raise ConfigError("checkpoint_every", self.checkpoint_every,
                                  "checkpoints are written under --output, which is not set")
        if not isinstance(self.allow_divergence, bool):
            raise ConfigError("allow_divergence", self.allow_divergence, "expected True or False")
        if self.num_clients is not None:
            _positive_int("num_clients", self.num_clients)
        if self.batch_size is not None:
            _positive_int("batch_size", self.batch_size)
        if self.execution == "chunked" or self.chunk_size is not None:
            _positive_int("chunk_size", self.chunk_size)
        for option in ("client_lr", "server_lr", "alpha"):
            _positive_float(option, getattr(self, option))
        _non_negative_float("beta", self.beta)
        _non_negative_float("mu", self.mu)
        if self.mu > 0 and self.algorithm != "fedprox":
            raise ConfigError("mu", self.mu, "the proximal term belongs to --algorithm fedprox")
        if not (isinstance(self.stragglers, (int, float)) and 0 <= self.stragglers <= 1):
            raise ConfigError("stragglers", self.stragglers, "expected a fraction in [0, 1]")
        if self.stragglers > 0 and self.local_epochs < 2:
            raise ConfigError("stragglers", self.stragglers,
                              "stragglers run 1..E-1 epochs, so they need --local-epochs >= 2")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError("seed", self.seed, "expected a non-negative integer")
        population = self.population_size()
        if isinstance(self.cohort_size, bool) or not isinstance(self.cohort_size, int) or not (
                1 <= self.cohort_size <= population):
            raise ConfigError("cohort_size", self.cohort_size,
                              f"expected an integer in 1..{population}, the number of clients "
                              f"of data set {self.dataset!r}")

    def population_size(self) -> int:
        return self.num_clients or DEFAULT_NUM_CLIENTS[self.dataset]


def _choice(option: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(option, value, f"allowed: {', '.join(allowed)}")


def _positive_int(option: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(option, value, "expected a positive integer")


def _positive_float(option: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0):
        raise ConfigError(option, value, "expected a positive number")


def _non_negative_float(option: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value >= 0):
        raise ConfigError(option, value, "expected a number >= 0")


def build_dataset(config: RunConfig):
    if config.dataset in ("digits", "mnist1d"):
        options = {"alpha": config.alpha} if config.partition == "dirichlet" else {}
        build = digits if config.dataset == "digits" else mnist1d
        return build(config.population_size(), partition=config.partition, seed=config.seed,
                     **options)
    return fedprox_synthetic(config.alpha, config.beta, iid=config.dataset == "synthetic_iid",
                             num_clients=config.population_size(), seed=config.seed)


def build_algorithm(config: RunConfig, model):
    options = dict(
        server_optimizer=SERVER_OPTIMIZERS[config.server_optimizer](config.server_lr),
        num_epochs=config.local_epochs, batch_size=config.batch_size,
        weighting=config.weighting, straggler_fraction=config.stragglers,
        execution=ClientExecution(config.execution, config.chunk_size))
    if config.algorithm == "fedprox":
        return fedprox(model, factored.sgd(config.client_lr), mu=config.mu, **options)
    return fedavg(model, factored.sgd(config.client_lr), **options)


def run(config: RunConfig, *, progress: bool = True, resume: bool = False) -> ExperimentResult:
    """Validates `config`, builds its pieces and runs the experiment.

    With `resume=True`, continues the run saved in `config.output` from its newest usable
    checkpoint; a configuration that differs from the saved one is refused, naming the fields.
    """
    config.validate()
    if resume and config.output is None:
        raise ConfigError("output", None, "resuming needs the folder of the run to continue")
    dataset = build_dataset(config)
    model = get_model(config.model, dataset.feature_shape, dataset.num_classes)
    return run_experiment(build_algorithm(config, model), dataset, num_rounds=config.rounds,
                          cohort_size=config.cohort_size, seed=config.seed,
                          eval_every=config.eval_every, output_dir=config.output,
                          config=dataclasses.asdict(config), progress=progress,
                          checkpoint_every=config.checkpoint_every, resume=resume,
                          allow_divergence=config.allow_divergence)


def load_saved_config(output_dir: str) -> RunConfig:
    """The `RunConfig` saved in a run's folder (for `fedjax-lab run --resume DIR`)."""
    path = os.path.join(output_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"cannot resume {output_dir!r}: it has no {CONFIG_FILE}")
    with open(path) as f:
        saved = json.load(f)
    known = {field.name for field in dataclasses.fields(RunConfig)}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise ValueError(f"{path} has unknown options {', '.join(unknown)}")
    return RunConfig(**saved)
