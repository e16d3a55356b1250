"""The model registry: each model by name, with its typed options and its builder.

`REGISTRY[name]` is a `ModelSpec`; `spec.build(spec.config(), feature_shape, num_classes)` gives
the model with its default options. The run configuration's `[model]` section, `fedjax-lab list`
and `get_model` read only this table, so adding a model is a factory plus one entry here.
"""

import dataclasses
import functools
from typing import Any, Callable

from fedjax_lab.models.model import Model
from fedjax_lab.models.networks import cifar_cnn, femnist_cnn, logistic_regression, mlp
from fedjax_lab.models.split import SplitModel, split_cnn, split_mlp
from fedjax_lab.options import OptionError, all_positive, from_dict, option, positive_int

# build(config, feature_shape, num_classes) -> Model | SplitModel
Builder = Callable[[Any, tuple[int, ...], int], Model | SplitModel]
# "split": an extractor + head `SplitModel`, which algorithms with `model_kind="split"` need.
MODEL_KINDS = ("plain", "split")


def dropout_rate(value) -> str | None:
    return None if 0 <= value < 1 else "expected a dropout rate in [0, 1)"


def some_positive(value) -> str | None:
    return None if value and all(v > 0 for v in value) else "expected one or more positive widths"


@dataclasses.dataclass(frozen=True)
class LogisticConfig:
    """Multinomial logistic regression has no options."""


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    """The default widths are McMahan et al.'s 2NN (AISTATS 2017); no dropout, no BatchNorm."""

    hidden: tuple[int, ...] = option((200, 200), "hidden layer widths (none = logistic "
                                     "regression)", all_positive)
    dropout: float = option(0.0, "dropout rate after each hidden layer, in training only",
                            dropout_rate)
    batch_norm: bool = option(False, "BatchNorm in each hidden layer (running statistics kept "
                              "in the parameters and averaged like them)")


@dataclasses.dataclass(frozen=True)
class CNNConfig:
    """LEAF's FEMNIST CNN has no options (two 5x5 convolutions, dense 2048)."""


@dataclasses.dataclass(frozen=True)
class CifarCNNConfig:
    """pfl-research's CIFAR-10 benchmark CNN; its dropout rates are the defaults."""

    conv_dropout: float = option(0.25, "dropout rate after the pooled convolutions",
                                 dropout_rate)
    dense_dropout: float = option(0.5, "dropout rate after the dense 128 layer", dropout_rate)


@dataclasses.dataclass(frozen=True)
class SplitMLPConfig:
    """The extractor's widths (the last is the feature size) are the library's; no dropout."""

    hidden: tuple[int, ...] = option((64, 32), "extractor widths; the last is the feature size",
                                     some_positive)
    dropout: float = option(0.0, "dropout rate after each extractor layer, in training only",
                            dropout_rate)


@dataclasses.dataclass(frozen=True)
class SplitCNNConfig:
    """The FEMNIST CNN's dense width (2048) as the feature size by default."""

    latent_dim: int = option(2048, "feature size (the extractor's last dense layer)",
                             positive_int)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One registered model.

    Attributes:
        name: the registry name (`--model.name NAME`).
        config: the frozen options dataclass; `config()` is the defaults.
        build: `build(config, feature_shape, num_classes) -> Model | SplitModel`.
        summary: what it is, with its source, one line.
        kind: "plain" (a `Model`) or "split" (a `SplitModel`: feature extractor + head).
    """

    name: str
    config: type
    build: Builder
    summary: str
    kind: str = "plain"

    def __post_init__(self):
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"kind {self.kind!r} is unknown; allowed: {', '.join(MODEL_KINDS)}")


SPECS = (
    ModelSpec("logistic", LogisticConfig,
              lambda config, shape, classes: logistic_regression(shape, classes),
              "multinomial logistic regression (FedProx's mclr)"),
    ModelSpec("mlp", MLPConfig,
              lambda config, shape, classes: mlp(shape, classes, config.hidden,
                                                 dropout=config.dropout,
                                                 batch_norm=config.batch_norm),
              "ReLU MLP (McMahan et al.'s 2NN), optional dropout and BatchNorm"),
    ModelSpec("cnn", CNNConfig,
              lambda config, shape, classes: femnist_cnn(shape, classes),
              "LEAF's FEMNIST CNN (two 5x5 convolutions, dense 2048) for images"),
    ModelSpec("cifar_cnn", CifarCNNConfig,
              lambda config, shape, classes: cifar_cnn(
                  shape, classes, conv_dropout=config.conv_dropout,
                  dense_dropout=config.dense_dropout),
              "pfl-research's CIFAR-10 benchmark CNN (two 3x3 convolutions, dense 128, two "
              "dropout layers) for images"),
    ModelSpec("split_mlp", SplitMLPConfig,
              lambda config, shape, classes: split_mlp(shape, classes, config.hidden,
                                                       dropout=config.dropout),
              "ReLU MLP as feature extractor + linear head", kind="split"),
    ModelSpec("split_cnn", SplitCNNConfig,
              lambda config, shape, classes: split_cnn(shape, classes, config.latent_dim),
              "FEMNIST CNN as feature extractor (up to its dense layer) + linear head",
              kind="split"),
)

REGISTRY: dict[str, ModelSpec] = {spec.name: spec for spec in SPECS}


def model_spec(name: str) -> ModelSpec:
    """The registered `ModelSpec` called `name`, or an `OptionError` listing the names."""
    if name not in REGISTRY:
        raise OptionError("model.name", name, f"unknown model; allowed: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def get_model(name: str, feature_shape, num_classes: int, **options) -> Model | SplitModel:
    """Builds the registered model `name` for examples of `feature_shape`; `options` are its
    config's fields (`get_model("mlp", (64,), 10, hidden=(32,), dropout=0.2)`), validated."""
    spec = model_spec(name)
    return spec.build(from_dict(spec.config, options, "model."), tuple(feature_shape),
                      num_classes)


# name -> `factory(feature_shape, num_classes, **options)`, the table before the registry.
MODELS: dict[str, Callable[..., Model | SplitModel]] = {
    name: functools.partial(get_model, name) for name in REGISTRY}
