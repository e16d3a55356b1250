"""The data sets a run can name: `REGISTRY` maps each name to a `DataSpec`.

A spec pairs a frozen config dataclass (fields declared with `fedjax_lab.options.option`, so
config files, command-line flags and `fedjax-lab list` come from the declarations) with
`load(config, seed) -> FederatedDataset`. `seed` is the data seed: it draws the partition and the
per-client train/test splits of the embedded data sets and generates the synthetic ones; the
files of LEAF and TFF are already split and ignore it.

  digits, mnist1d   a centralised data set split by any partition of `PARTITIONS`
  synthetic         FedProx's Synthetic(alpha, beta), alpha = beta = 0 included
  synthetic_iid     FedProx's Synthetic-IID
  dialects          generated next-character text, one Markov-chain dialect per client
  leaf              LEAF JSON folders (FEMNIST, Shakespeare, synthetic)
  tff_h5            TensorFlow Federated / fedjax HDF5 files (EMNIST, Shakespeare, Stack Overflow)

A spec also names the model a data set trains by default (`default_model(config)`: "char_lstm"
for character text, a one-layer 64-unit one for dialects, "word_lstm" for Stack Overflow's words;
None leaves the algorithm's default).

Every load validates its config first and checks that every file or folder it will read exists,
so a bad option or a missing path is one `OptionError` naming the option ("data.data_dir") and
the path, raised before anything is read.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

from fedjax_lab.data.dialects import dialects
from fedjax_lab.data.digits import digits
from fedjax_lab.data.federated import FederatedDataset
from fedjax_lab.data.h5 import (load_emnist_h5, load_shakespeare_h5, load_stackoverflow_h5,
                                read_word_counts)
from fedjax_lab.data.leaf import LEAF_DATASETS, load_leaf
from fedjax_lab.data.mnist1d import mnist1d
from fedjax_lab.data.partitioned import PARTITION_OPTIONS, PARTITIONS
from fedjax_lab.data.synthetic import fedprox_synthetic
from fedjax_lab.options import (OptionError, fraction, non_negative, non_negative_int, one_of,
                                option, optional, optional_positive_int, positive, positive_int,
                                validate)

# Where the data config sits in a run's config: the prefix of every option path reported.
PREFIX = "data."


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """One registered data set.

    Attributes:
        name: the registry name a run's config chooses.
        config: the frozen config dataclass; `config()` is the defaults.
        load: `load(config, seed) -> FederatedDataset`.
        summary: what it is, one line.
        default_model: `default_model(config)`, the model a run uses when it names none: a
            registry name, or a table `{"name": ..., option: value}` that also sets options
            (the run's own `--model.OPTION`s still win); None for the algorithm's default.
    """

    name: str
    config: type
    load: Callable[..., FederatedDataset]
    summary: str
    default_model: Callable[..., str | dict | None] = lambda config: None


def _below_one(value) -> str | None:
    return None if 0 <= value < 1 else "expected a fraction in [0, 1)"


def _at_least_two(value) -> str | None:
    return None if value >= 2 else "expected an integer >= 2"


def _refuse_unused(config, choice: str, users: dict[str, tuple[str, ...]]) -> None:
    """Refuses an option changed from its default that the chosen `choice` would ignore.

    `users` maps each option to the values of the field `choice` that read it; an unchanged
    default is allowed, so a saved config (which writes every field) reads back.
    """
    chosen, defaults = getattr(config, choice), type(config)()
    for name, owners in users.items():
        value = getattr(config, name)
        if chosen not in owners and value != getattr(defaults, name):
            raise OptionError(name, value, f"only {choice} {' or '.join(owners)} uses it, and "
                              f"{choice} is {chosen!r}")


def _check_paths(config, pair: tuple[str, str], needs: str) -> None:
    """Either `data_dir` or both options of `pair` (train and test), never both ways."""
    given = [name for name in pair if getattr(config, name) is not None]
    if config.data_dir is not None and given:
        raise OptionError(given[0], getattr(config, given[0]),
                          f"give data_dir or {' and '.join(pair)}, not both")
    if config.data_dir is None and not given:
        raise OptionError("data_dir", None, f"{needs} or both {' and '.join(pair)}")
    if config.data_dir is None and len(given) == 1:
        missing = next(name for name in pair if name not in given)
        raise OptionError(missing, None, f"{given[0]} is given, so {missing} is needed too")


def _require(option_name: str, value: str, path: str, folder: bool) -> str:
    """`path` if it exists, else an `OptionError` naming the option and the missing path."""
    if not (os.path.isdir(path) if folder else os.path.isfile(path)):
        kind = "folder" if folder else "file"
        raise OptionError(PREFIX + option_name, value, f"{kind} {path!r} does not exist")
    return path


# --- digits and MNIST-1D ------------------------------------------------------------------------

# Each partition option -> the partitions that read it.
_PARTITION_USERS = {name: tuple(p for p, names in PARTITION_OPTIONS.items() if name in names)
                    for names in PARTITION_OPTIONS.values() for name in names}


@dataclasses.dataclass(frozen=True)
class PartitionedConfig:
    """A centralised data set split into `num_clients` clients by `partition`, then each client
    into train and test. Each option after `partition` belongs to the partitions named in its
    documentation; changing one that the chosen partition does not use is refused."""

    num_clients: int = option(50, "number of clients", positive_int)
    partition: str = option("dirichlet", "how the examples are split into clients",
                            one_of(*PARTITIONS))
    alpha: float = option(0.5, "Dirichlet concentration, smaller is more skewed (dirichlet)",
                          positive)
    # 2, not the partitioners' 1 for quantity, so that every client can hold a test example.
    min_examples_per_client: int = option(2, "fewest examples per client (dirichlet, quantity)",
                                          non_negative_int)
    shards_per_client: int = option(2, "label-sorted shards per client (shards; McMahan et al.)",
                                    positive_int)
    classes_per_client: int = option(2, "classes per client (classes; NIID-Bench #C=k)",
                                     positive_int)
    ways: int = option(3, "mean classes per client (ways_shots; FedProto's n)", positive_int)
    # FedProto's MNIST setting has 100 shots; digits' ~180 examples per class feed 50 clients
    # at 5 shots (20 of 20 seeds tried), not at 10 (0 of 20 with stdev 1).
    shots: int = option(5, "mean examples per class per client (ways_shots)", positive_int)
    stdev: int = option(1, "half-width of the ranges of ways and shots (ways_shots)",
                        non_negative_int)
    sigma: float = option(1.0, "std of the log client sizes (quantity)", non_negative)
    test_fraction: float = option(0.2, "per-client held-out fraction", _below_one)

    def check(self) -> None:
        _refuse_unused(self, "partition", _PARTITION_USERS)

    def partition_options(self) -> dict:
        """The options of the chosen partitioner, as keyword arguments."""
        return {name: getattr(self, name) for name in PARTITION_OPTIONS[self.partition]}


@dataclasses.dataclass(frozen=True)
class DigitsConfig(PartitionedConfig):
    """scikit-learn's 1797 8x8 digits (64 features, 10 classes). The defaults are the library's
    default job: 50 clients with Dirichlet(0.5) label skew, 20 % of each client held out."""


@dataclasses.dataclass(frozen=True)
class MNIST1DConfig(PartitionedConfig):
    """MNIST-1D's 5000 examples (40 features, 10 classes; Greydanus & Kobak, arXiv 2011.14439),
    generated locally with the package's default arguments, split as digits is."""


def load_digits(config: DigitsConfig, seed: int) -> FederatedDataset:
    validate(config, PREFIX)
    return digits(config.num_clients, partition=config.partition, seed=seed,
                  test_fraction=config.test_fraction, **config.partition_options())


def load_mnist1d(config: MNIST1DConfig, seed: int) -> FederatedDataset:
    validate(config, PREFIX)
    return mnist1d(config.num_clients, partition=config.partition, seed=seed,
                   test_fraction=config.test_fraction, **config.partition_options())


# --- FedProx's synthetic data -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SyntheticIIDConfig:
    """FedProx's Synthetic-IID (Li et al., MLSys 2020, arXiv 1812.06127): 30 devices, 60
    features, 10 classes, one shared model. Device sizes are capped at 1000 examples (the paper's
    lognormal sizes reach tens of thousands), a deviation the data set's metadata records."""

    num_clients: int = option(30, "number of devices (paper: 30)", positive_int)
    max_examples: int | None = option(1000, "cap on a device's examples; none = the paper's "
                                      "uncapped sizes", optional_positive_int)


@dataclasses.dataclass(frozen=True)
class SyntheticConfig(SyntheticIIDConfig):
    """FedProx's Synthetic(alpha, beta): per-device models drawn around u_k ~ N(0, alpha^2) and
    inputs around B_k ~ N(0, beta^2). The paper's three sets are (0, 0), (0.5, 0.5) and (1, 1);
    the default is (1, 1), the most heterogeneous. (0, 0) is still not IID."""

    alpha: float = option(1.0, "std of the per-device model prior u_k", non_negative)
    beta: float = option(1.0, "std of the per-device input prior B_k", non_negative)


def load_synthetic(config: SyntheticConfig, seed: int) -> FederatedDataset:
    validate(config, PREFIX)
    return fedprox_synthetic(config.alpha, config.beta, num_clients=config.num_clients,
                             max_examples=config.max_examples, seed=seed)


def load_synthetic_iid(config: SyntheticIIDConfig, seed: int) -> FederatedDataset:
    validate(config, PREFIX)
    return fedprox_synthetic(iid=True, num_clients=config.num_clients,
                             max_examples=config.max_examples, seed=seed)


# --- generated text -----------------------------------------------------------------------------

def _at_least_two_sequences(value) -> str | None:
    return None if value >= 2 else "expected a number >= 2"


@dataclasses.dataclass(frozen=True)
class DialectsConfig:
    """Generated next-character text (`fedjax_lab.data.dialects`): each client writes in its own
    dialect, an order-2 character Markov chain drawn around a shared one, 30 symbols. The
    defaults are the text default job: 50 clients of ~40 sequences of 80 characters, where a
    client's own chain predicts 0.43 of the characters and the population's average chain 0.35
    (exact Bayes accuracies, recorded in the data set's metadata)."""

    num_clients: int = option(50, "number of clients (writers)", positive_int)
    sequence_length: int = option(80, "characters per sequence (T)", positive_int)
    mean_sequences: float = option(40.0, "mean sequences per client, train and test "
                                   "(lognormal sizes, at least 2)", _at_least_two_sequences)
    heterogeneity: float = option(1.0, "scale of the per-client dialect perturbation; 0 = every "
                                  "client the same chain (IID)", non_negative)
    num_families: int = option(4, "dialect families sharing part of their perturbation",
                               positive_int)
    family_share: float = option(0.5, "fraction of a dialect's perturbation variance shared "
                                 "with its family", fraction)
    test_fraction: float = option(0.2, "per-client held-out fraction of sequences", _below_one)


# The Shakespeare LSTM sized for 30 symbols and order-2 dialects: one layer of 64 instead of two
# of 256 makes the default text job's round ~10x cheaper on two CPU cores (200 rounds in minutes).
DIALECTS_MODEL = {"name": "char_lstm", "hidden": 64, "layers": 1}


def load_dialects(config: DialectsConfig, seed: int) -> FederatedDataset:
    validate(config, PREFIX)
    return dialects(config.num_clients, sequence_length=config.sequence_length,
                    mean_sequences=config.mean_sequences, heterogeneity=config.heterogeneity,
                    num_families=config.num_families, family_share=config.family_share,
                    test_fraction=config.test_fraction, seed=seed)


# --- LEAF JSON ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LeafConfig:
    """LEAF's JSON files (Caldas et al., arXiv 1812.01097) as written by its preprocess.sh:
    `data_dir` holds the `train/` and `test/` folders (e.g. leaf/data/femnist/data), or
    `train_dir` and `test_dir` name them. Every `.json` file of a folder is read."""

    dataset: str = option("femnist", "which LEAF data set the files hold (shakespeare: "
                          "next-character sequences)",
                          one_of(*LEAF_DATASETS))
    data_dir: str | None = option(None, "folder holding train/ and test/")
    train_dir: str | None = option(None, "folder of the train .json files (instead of data_dir)")
    test_dir: str | None = option(None, "folder of the test .json files (instead of data_dir)")
    num_classes: int | None = option(None, "number of classes; none = 62 (femnist), 80 "
                                     "(shakespeare) or the largest label + 1",
                                     optional(_at_least_two))

    def check(self) -> None:
        _check_paths(self, ("train_dir", "test_dir"),
                     "LEAF needs data_dir (a folder holding train/ and test/)")

    def folders(self) -> tuple[str, str]:
        """(train folder, test folder), each checked to exist."""
        if self.data_dir is not None:
            return tuple(_require("data_dir", self.data_dir, os.path.join(self.data_dir, split),
                                  True) for split in ("train", "test"))
        return (_require("train_dir", self.train_dir, self.train_dir, True),
                _require("test_dir", self.test_dir, self.test_dir, True))


def load_leaf_folders(config: LeafConfig, seed: int) -> FederatedDataset:
    del seed  # LEAF's files are already split into clients, train and test
    validate(config, PREFIX)
    train_dir, test_dir = config.folders()
    return load_leaf(train_dir, test_dir, config.dataset, num_classes=config.num_classes)


def leaf_model(config: LeafConfig) -> str | None:
    return "char_lstm" if config.dataset == "shakespeare" else None


# --- TFF / fedjax HDF5 --------------------------------------------------------------------------

# The file names TFF's `load_data` downloads, used when only data_dir is given.
H5_FILES = {"emnist": "fed_emnist", "emnist_digits": "fed_emnist_digitsonly",
            "shakespeare": "shakespeare", "stackoverflow": "stackoverflow"}
STACKOVERFLOW_WORD_COUNT = "stackoverflow.word_count"


@dataclasses.dataclass(frozen=True)
class H5Config:
    """TensorFlow Federated's HDF5 client files (also read by early fedjax): `train_path` and
    `test_path`, or `data_dir` holding them under TFF's names (fed_emnist[_digitsonly]_{train,
    test}.h5, shakespeare_{train,test}.h5, stackoverflow_{train,test}.h5 and
    stackoverflow.word_count). Text becomes next-token sequences with fedjax's preprocessing (see
`fedjax_lab.data.h5`)."""

    dataset: str = option("emnist", "which TFF data set the files hold",
                          one_of("emnist", "shakespeare", "stackoverflow"))
    data_dir: str | None = option(None, "folder holding the files under TFF's names")
    train_path: str | None = option(None, "train .h5 file (instead of data_dir)")
    test_path: str | None = option(None, "test .h5 file (instead of data_dir)")
    only_digits: bool = option(False, "the digits-only files, 10 classes instead of 62 (emnist)")
    sequence_length: int | None = option(None, "tokens per example; none = 80 (shakespeare) or "
                                         "20 (stackoverflow)", optional_positive_int)
    vocabulary_path: str | None = option(None, "word counts, 'word count' per line, most "
                                         "frequent first; none = data_dir's "
                                         f"{STACKOVERFLOW_WORD_COUNT} (stackoverflow)")
    vocabulary_size: int = option(10_000, "words kept from the list (stackoverflow)",
                                  positive_int)
    client_ids: tuple[str, ...] = option((), "read only these clients; empty = all")

    def check(self) -> None:
        _refuse_unused(self, "dataset", {
            "only_digits": ("emnist",), "sequence_length": ("shakespeare", "stackoverflow"),
            "vocabulary_path": ("stackoverflow",), "vocabulary_size": ("stackoverflow",)})
        _check_paths(self, ("train_path", "test_path"),
                     "TFF HDF5 needs data_dir (a folder holding the files under TFF's names)")
        if self.data_dir is None and self.dataset == "stackoverflow" \
                and self.vocabulary_path is None:
            raise OptionError("vocabulary_path", None, "stackoverflow needs its word list "
                              f"(TFF's {STACKOVERFLOW_WORD_COUNT}) when data_dir is not given")

    def paths(self) -> tuple[str, str]:
        """(train file, test file), each checked to exist."""
        if self.data_dir is None:
            return (_require("train_path", self.train_path, self.train_path, False),
                    _require("test_path", self.test_path, self.test_path, False))
        stem = H5_FILES["emnist_digits" if self.only_digits else self.dataset]
        return tuple(_require("data_dir", self.data_dir,
                              os.path.join(self.data_dir, f"{stem}_{split}.h5"), False)
                     for split in ("train", "test"))

    def vocabulary(self) -> list[str]:
        """The first `vocabulary_size` words of the word-count file (Stack Overflow)."""
        if self.vocabulary_path is None:
            path = _require("data_dir", self.data_dir,
                            os.path.join(self.data_dir, STACKOVERFLOW_WORD_COUNT), False)
        else:
            path = _require("vocabulary_path", self.vocabulary_path, self.vocabulary_path, False)
        return read_word_counts(path, self.vocabulary_size)


def load_h5(config: H5Config, seed: int) -> FederatedDataset:
    del seed  # the files are already split into clients, train and test
    validate(config, PREFIX)
    train_path, test_path = config.paths()
    options = {"client_ids": list(config.client_ids) or None}
    if config.sequence_length is not None:
        options["sequence_length"] = config.sequence_length
    if config.dataset == "emnist":
        return load_emnist_h5(train_path, test_path, num_classes=10 if config.only_digits else 62,
                              **options)
    if config.dataset == "shakespeare":
        return load_shakespeare_h5(train_path, test_path, **options)
    return load_stackoverflow_h5(train_path, test_path, config.vocabulary(), **options)


def h5_model(config: H5Config) -> str | None:
    return {"shakespeare": "char_lstm", "stackoverflow": "word_lstm"}.get(config.dataset)


# --- the registry -------------------------------------------------------------------------------

REGISTRY: dict[str, DataSpec] = {spec.name: spec for spec in (
    DataSpec("digits", DigitsConfig, load_digits,
             "scikit-learn's 8x8 digits (1797 images, 10 classes), partitioned"),
    DataSpec("mnist1d", MNIST1DConfig, load_mnist1d,
             "MNIST-1D generated locally (pip install 'fedjax_lab[data]'), partitioned"),
    DataSpec("synthetic", SyntheticConfig, load_synthetic,
             "FedProx's Synthetic(alpha, beta): 30 devices, 60 features, 10 classes"),
    DataSpec("synthetic_iid", SyntheticIIDConfig, load_synthetic_iid,
             "FedProx's Synthetic-IID: 30 devices sharing one model"),
    DataSpec("dialects", DialectsConfig, load_dialects,
             "generated next-character text: 50 writers, each in its own Markov-chain dialect",
             lambda config: DIALECTS_MODEL),
    DataSpec("leaf", LeafConfig, load_leaf_folders,
             "LEAF JSON folders: FEMNIST, Shakespeare or synthetic (needs data_dir)", leaf_model),
    DataSpec("tff_h5", H5Config, load_h5,
             "TFF/fedjax HDF5 files: EMNIST, Shakespeare or Stack Overflow (needs data_dir, h5py)",
             h5_model),
)}


def get_dataset(name: str) -> DataSpec:
    """The registered data set `name`, or an `OptionError` listing the registered ones."""
    if name not in REGISTRY:
        raise OptionError(PREFIX + "name", name, f"unknown data set; allowed: "
                          f"{', '.join(REGISTRY)}")
    return REGISTRY[name]


def load_dataset(name: str, config=None, seed: int = 0) -> FederatedDataset:
    """Data set `name` with `config` (default: its defaults), drawn with data seed `seed`."""
    spec = get_dataset(name)
    config = spec.config() if config is None else config
    if type(config) is not spec.config:
        raise OptionError(PREFIX + "name", name, f"the config given is a "
                          f"{type(config).__name__}; data set {name!r} takes a "
                          f"{spec.config.__name__}")
    return spec.load(config, seed)
