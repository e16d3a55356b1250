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
from fedjax_lab.models.resnet import resnet18_gn
from fedjax_lab.models.split import SplitModel, split_cnn, split_mlp
from fedjax_lab.models.text import bigram, char_lstm, transformer, word_lstm
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
class ResNet18GNConfig:
    """ResNet-18 with GroupNorm; two groups per layer as Reddi et al. (ICLR 2021), the paper's
    widths (64, 128, 256, 512)."""

    width: int = option(64, "first stage's width (doubled at each of the four stages)",
                        positive_int)
    groups: int = option(2, "GroupNorm groups per layer (must divide width)", positive_int)


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
class CharLSTMConfig:
    """LEAF's and fedjax's Shakespeare model: Embed(V, 8), two LSTM(256), Dense(V)."""

    embed: int = option(8, "character embedding width", positive_int)
    hidden: int = option(256, "LSTM width", positive_int)
    layers: int = option(2, "number of stacked LSTM layers", positive_int)


@dataclasses.dataclass(frozen=True)
class WordLSTMConfig:
    """Reddi et al.'s Stack Overflow model: Embed(V, 96), LSTM(670), Dense(96), Dense(V)."""

    embed: int = option(96, "word embedding width", positive_int)
    hidden: int = option(670, "LSTM width", positive_int)
    projection: int = option(96, "width of the dense layer between the LSTM and the "
                             "vocabulary layer", positive_int)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """A small decoder-only causal transformer (GPT-2 style, pre-LayerNorm); the widths are
    the library's."""

    width: int = option(128, "embedding and residual width", positive_int)
    layers: int = option(2, "number of transformer blocks", positive_int)
    heads: int = option(4, "attention heads per block (must divide width)", positive_int)
    hidden: int = option(512, "MLP hidden width of each block", positive_int)
    context: int = option(128, "longest sequence (rows of the learned positional "
                          "embedding); must be >= the data's sequence length", positive_int)


@dataclasses.dataclass(frozen=True)
class BigramConfig:
    """Embed(V, d) then Dense(V) per position: the next token from the current one."""

    embed: int = option(16, "token embedding width d", positive_int)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One registered model.

    Attributes:
        name: the registry name (`--model.name NAME`).
        config: the frozen options dataclass; `config()` is the defaults.
        build: `build(config, feature_shape, num_classes) -> Model | SplitModel`.
        summary: what it is, with its source, one line.
        kind: "plain" (a `Model`) or "split" (a `SplitModel`: feature extractor + head).
        next_token: whether it predicts the next token at every position of a sequence of token
            ids (logits `[B, T, V]`, for data with next-token targets) rather than one class
            per example (logits `[B, classes]`).
    """

    name: str
    config: type
    build: Builder
    summary: str
    kind: str = "plain"
    next_token: bool = False

    def __post_init__(self):
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"kind {self.kind!r} is unknown; allowed: {', '.join(MODEL_KINDS)}")

    def check_targets(self, data_name: str, label_shape: tuple) -> None:
        """Raises `OptionError` naming the model when it predicts other targets than the data
        set holds (a text model on images, a classifier on text)."""
        if self.next_token != bool(label_shape):
            has = f"next-token targets {label_shape}" if label_shape else "one class per example"
            wants = "next-token targets" if self.next_token else "one class per example"
            raise OptionError("model.name", self.name, f"this model predicts {wants}, and data "
                              f"set {data_name!r} has {has}; `fedjax-lab list` marks the text "
                              "models [text]")


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
    ModelSpec("resnet18_gn", ResNet18GNConfig,
              lambda config, shape, classes: resnet18_gn(shape, classes, width=config.width,
                                                         groups=config.groups),
              "ResNet-18 with GroupNorm (Hsieh et al. 2020, Reddi et al. 2021), 3x3 stem, for "
              "CIFAR-sized images"),
    ModelSpec("split_mlp", SplitMLPConfig,
              lambda config, shape, classes: split_mlp(shape, classes, config.hidden,
                                                       dropout=config.dropout),
              "ReLU MLP as feature extractor + linear head", kind="split"),
    ModelSpec("split_cnn", SplitCNNConfig,
              lambda config, shape, classes: split_cnn(shape, classes, config.latent_dim),
              "FEMNIST CNN as feature extractor (up to its dense layer) + linear head",
              kind="split"),
    ModelSpec("char_lstm", CharLSTMConfig,
              lambda config, shape, classes: char_lstm(shape, classes, embed=config.embed,
                                                       hidden=config.hidden,
                                                       layers=config.layers),
              "LEAF/fedjax Shakespeare next-character LSTM (Embed 8, two LSTM 256) for "
              "token sequences", next_token=True),
    ModelSpec("word_lstm", WordLSTMConfig,
              lambda config, shape, classes: word_lstm(shape, classes, embed=config.embed,
                                                       hidden=config.hidden,
                                                       projection=config.projection),
              "Reddi et al.'s Stack Overflow next-word LSTM (Embed 96, LSTM 670, Dense 96) "
              "for token sequences", next_token=True),
    ModelSpec("transformer", TransformerConfig,
              lambda config, shape, classes: transformer(
                  shape, classes, width=config.width, layers=config.layers,
                  heads=config.heads, hidden=config.hidden, context=config.context),
              "small decoder-only causal transformer (GPT-2 style) for token sequences",
              next_token=True),
    ModelSpec("bigram", BigramConfig,
              lambda config, shape, classes: bigram(shape, classes, embed=config.embed),
              "bigram model (Embed, Dense per position), a cheap text baseline",
              next_token=True),
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
