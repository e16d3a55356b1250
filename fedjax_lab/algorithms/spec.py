"""What an algorithm module declares so that everything else can run it: `AlgorithmSpec`.

Each algorithm module defines a frozen config dataclass (fields declared with
`fedjax_lab.options.option`, defaults the paper's) and a builder
`build(config, model, data: DataInfo, execution) -> Algorithm`, and exports `SPECS`, a tuple of
`AlgorithmSpec`s. `fedjax_lab.algorithms.REGISTRY` collects them; the command line, config files,
`fedjax-lab list`, experiments and the contract test read only the registry, so adding an
algorithm is one module and one line in the registry, and nothing outside the module names it.

`ClientTraining` and `ServerOptimizer` are the option groups most algorithms share, nested in
their configs (`--algorithm.client.lr`, `--algorithm.server.optimizer`).
"""

import dataclasses
from typing import Any, Callable

import optax

from fedjax_lab.core import factored
from fedjax_lab.core.client_execution import ClientExecution
from fedjax_lab.core.server_optimizers import ADAPTIVE_RULES, adaptive_server_optimizer
from fedjax_lab.core.types import Algorithm, DataInfo
from fedjax_lab.core.validation import is_zero
from fedjax_lab.options import (OptionError, below_one, fraction, non_negative, one_of, option,
                                optional, optional_positive_int, positive, positive_int)

# build(config, model, data, execution) -> Algorithm
Builder = Callable[[Any, Any, DataInfo, ClientExecution], Algorithm]
# What a builder needs of its model: any `Model`, or a `SplitModel` (extractor + head).
MODEL_KINDS = ("any", "split")


# Plain and momentum SGD (FedAvgM), optax's adaptive optimisers as they are (FedMeta's outer Adam),
# and Reddi et al.'s server forms of them (`fedjax_lab.core.server_optimizers`).
SERVER_OPTIMIZERS = ("sgd", "adam", "yogi", "adagrad") + ADAPTIVE_RULES
_OPTAX_ADAPTIVE = {"adam": optax.adam, "yogi": optax.yogi, "adagrad": optax.adagrad}


@dataclasses.dataclass(frozen=True)
class ClientTraining:
    """Local training: SGD at rate `lr`, `epochs` passes of minibatches of `batch_size`; plain
    by default, with the momentum, weight decay and clipping of reference optimisers on request
    (pFedHN's inner SGD: clip 50, weight decay 5e-5, momentum 0.9)."""

    lr: float = option(0.01, "client SGD learning rate", positive, sweepable=True)
    epochs: int = option(1, "local epochs E", positive_int)
    batch_size: int | None = option(10, "examples per local step; none = full batch",
                                    optional_positive_int)
    momentum: float = option(0.0, "SGD momentum (0: plain SGD)", fraction)
    weight_decay: float = option(0.0, "weight decay added to the gradient", non_negative)
    clip_norm: float | None = option(None, "clip each gradient to this global norm; none = no "
                                     "clipping", optional(positive), sweepable=True)

    def optimizer(self) -> optax.GradientTransformation:
        # A traced momentum or weight decay (never a concrete 0) keeps its step in the program.
        if is_zero(self.momentum) and is_zero(self.weight_decay) and self.clip_norm is None:
            return factored.sgd(self.lr)  # declared plain SGD: the factored update applies
        # The references' order (pFedHN's inner optimiser): clip, then decay, then SGD.
        steps = ([] if self.clip_norm is None else [optax.clip_by_global_norm(self.clip_norm)]) + (
            [] if is_zero(self.weight_decay) else [optax.add_decayed_weights(self.weight_decay)])
        sgd = optax.sgd(self.lr, momentum=None if is_zero(self.momentum) else self.momentum)
        return optax.chain(*steps, sgd) if steps else sgd


@dataclasses.dataclass(frozen=True)
class ServerOptimizer:
    """The server's optimiser on the mean client delta; sgd at lr 1 is plain averaging.

    sgd with `momentum` beta is FedAvgM (Hsu, Qi, Brown, arXiv 1909.06335: v <- beta v + delta,
    w <- w - lr v); fedadagrad, fedadam and fedyogi are Reddi et al.'s Algorithm 2 (ICLR 2021,
    arXiv 2003.00295) with b1, b2 and tau; adam, yogi and adagrad are optax's, bias-corrected.
    """

    optimizer: str = option("sgd", "server optimiser", one_of(*SERVER_OPTIMIZERS))
    lr: float = option(1.0, "server learning rate", positive, sweepable=True)
    momentum: float = option(0.0, "sgd's server momentum beta (FedAvgM); 0: none", below_one)
    b1: float = option(0.9, "first-moment decay of fedadagrad/fedadam/fedyogi", below_one,
                       sweepable=True)
    b2: float = option(0.99, "second-moment decay of fedadam/fedyogi", below_one, sweepable=True)
    tau: float = option(1e-3, "degree of adaptivity tau of fedadagrad/fedadam/fedyogi", positive,
                        sweepable=True)

    def check(self) -> None:
        if self.optimizer != "sgd" and self.momentum != 0:
            raise OptionError("momentum", self.momentum, f"server momentum is sgd's (FedAvgM); "
                              f"optimizer {self.optimizer!r} has its own moments")

    def build(self) -> optax.GradientTransformation:
        if self.optimizer in ADAPTIVE_RULES:
            return adaptive_server_optimizer(self.optimizer, self.lr, b1=self.b1, b2=self.b2,
                                             tau=self.tau)
        if self.optimizer == "sgd":
            return optax.sgd(self.lr, momentum=None if is_zero(self.momentum) else self.momentum)
        return _OPTAX_ADAPTIVE[self.optimizer](self.lr)


@dataclasses.dataclass(frozen=True)
class AlgorithmSpec:
    """One registered algorithm.

    Attributes:
        name: the registry name (`--algorithm NAME`).
        config: the frozen config dataclass; `config()` is the paper's defaults.
        build: `build(config, model, data, execution) -> Algorithm`.
        paper: authors, title, venue and arXiv id, one line.
        summary: what it does, one line.
        model_kind: "any" or "split" (needs an extractor + head `SplitModel`).
        trains_model_state: whether its clients train through `model_loss` and `local_train`, so
            models with a training mode (dropout keys, BatchNorm statistics) train as they
            should; the others refuse such models rather than silently run them in inference
            mode.
        class_labels_only: why the algorithm needs one class label per example (prototypes
            per class, a label-conditioned generator), refusing next-token data sets; None
            where it also trains on sequence targets (`DataInfo.label_shape` (T,)).
    """

    name: str
    config: type
    build: Builder
    paper: str
    summary: str
    model_kind: str = "any"
    trains_model_state: bool = False
    class_labels_only: str | None = None

    def __post_init__(self):
        if self.model_kind not in MODEL_KINDS:
            raise ValueError(f"model_kind {self.model_kind!r} is unknown; allowed: "
                             f"{', '.join(MODEL_KINDS)}")

    def check_model(self, model_name: str, model) -> None:
        """Raises `OptionError` naming the model when it has a training mode this algorithm
        does not run (see `trains_model_state`)."""
        if getattr(model, "has_train_mode", False) and not self.trains_model_state:
            raise OptionError("model.name", model_name,
                              f"this model has a training mode (dropout or BatchNorm), which "
                              f"algorithm {self.name!r} does not run; use it without them, or "
                              "with an algorithm that trains through model_loss (fedavg, ...)")

    def check_labels(self, data_name: str, info: DataInfo) -> None:
        """Raises `OptionError` naming the data set when it has sequence targets and this
        algorithm needs class labels (see `class_labels_only`)."""
        if info.label_shape and self.class_labels_only is not None:
            raise OptionError("data.name", data_name,
                              f"this data set has next-token targets {info.label_shape}, and "
                              f"algorithm {self.name!r} needs one class label per example "
                              f"({self.class_labels_only})")

    def check_model_kind(self, model_name: str, model_kind: str) -> None:
        """Raises `OptionError` naming the model when this algorithm cannot use its kind
        ("plain" or "split", as the model registry declares)."""
        if self.model_kind == "split" and model_kind != "split":
            raise OptionError("model.name", model_name,
                              f"algorithm {self.name!r} needs a split model (feature extractor "
                              "+ head); `fedjax-lab list` marks those [split]")
