"""The data registry (configs, loaders, path errors) and `describe` on every kind of data set."""

import dataclasses
import json

import numpy as np
import pytest

from fedjax_lab.data import (REGISTRY, ClientData, FederatedDataset, describe, digits,
                             fedprox_synthetic, format_description, get_dataset, load_dataset,
                             plot_label_distribution)
from fedjax_lab.data.describe import entropy_bits
from fedjax_lab.data.registry import (DigitsConfig, H5Config, LeafConfig, MNIST1DConfig,
                                      SyntheticConfig, SyntheticIIDConfig)
from fedjax_lab.options import OptionError, from_dict, to_dict, validate


def _same_data(a, b):
    splits = lambda ds: ds.train.x + ds.train.y + ds.test.x + ds.test.y
    return a.train.names == b.train.names and all(
        np.array_equal(p, q) for p, q in zip(splits(a), splits(b)))


def test_registry_names_defaults_validate_and_round_trip():
    assert list(REGISTRY) == ["digits", "mnist1d", "synthetic", "synthetic_iid", "dialects",
                              "leaf", "tff_h5"]
    # leaf and tff_h5 have a required path, so their defaults alone do not validate.
    paths = {"leaf": {"data_dir": "leaf/data"}, "tff_h5": {"data_dir": "tff"}}
    for name, spec in REGISTRY.items():
        assert spec.name == name and spec.summary
        config = from_dict(spec.config, paths.get(name, {}), "data.")
        validate(config, "data.")
        assert from_dict(spec.config, json.loads(json.dumps(to_dict(config)))) == config
    with pytest.raises(OptionError, match=r"^data.data_dir=None is invalid; TFF HDF5 needs"):
        validate(H5Config(), "data.")
    with pytest.raises(OptionError, match=r"^data.name='cifar' is invalid; unknown data set; "
                                          r"allowed: digits, mnist1d, synthetic"):
        get_dataset("cifar")
    with pytest.raises(OptionError, match=r"data set 'synthetic_iid' takes a SyntheticIIDConfig"):
        load_dataset("synthetic_iid", SyntheticConfig())


def test_digits_default_is_the_default_job_and_partitions_take_their_options():
    assert _same_data(REGISTRY["digits"].load(DigitsConfig(), seed=0),
                      digits(50, partition="dirichlet", alpha=0.5, seed=0))
    assert _same_data(load_dataset("digits", DigitsConfig(alpha=0.1), seed=3),
                      digits(50, partition="dirichlet", alpha=0.1, seed=3))
    shards = load_dataset("digits", DigitsConfig(partition="shards", shards_per_client=3,
                                                 num_clients=20))
    assert _same_data(shards, digits(20, partition="shards", shards_per_client=3))
    for partition in ("iid", "classes", "ways_shots", "quantity"):  # defaults all feasible
        assert load_dataset("digits", DigitsConfig(partition=partition)).num_clients == 50
    # An unchanged default of another partition's option is fine (a saved config has them all);
    # a changed one is refused, naming the partition that reads it.
    with pytest.raises(OptionError, match=r"^data.alpha=0.1 is invalid; only partition dirichlet "
                                          r"uses it, and partition is 'iid'$"):
        load_dataset("digits", DigitsConfig(partition="iid", alpha=0.1))
    with pytest.raises(OptionError, match=r"data.min_examples_per_client=3 .* only partition "
                                          r"dirichlet or quantity uses it"):
        load_dataset("digits", DigitsConfig(partition="shards", min_examples_per_client=3))
    with pytest.raises(OptionError, match=r"^data.test_fraction=1.0 is invalid; expected a "
                                          r"fraction in \[0, 1\)$"):
        from_dict(DigitsConfig, {"test_fraction": 1}, "data.")


def test_synthetic_accepts_0_0_and_iid_has_its_own_entry():
    zero = load_dataset("synthetic", from_dict(SyntheticConfig, {"alpha": 0, "beta": 0}), 1)
    assert zero.name == "synthetic_0_0" and zero.num_clients == 30
    assert _same_data(zero, fedprox_synthetic(0.0, 0.0, seed=1))
    assert max(zero.train.num_examples + zero.test.num_examples) <= 1000
    iid = load_dataset("synthetic_iid", SyntheticIIDConfig(num_clients=5, max_examples=None))
    assert _same_data(iid, fedprox_synthetic(iid=True, num_clients=5, max_examples=None))
    with pytest.raises(OptionError, match=r"^data.alpha=-0.5 is invalid; expected a number >= 0"):
        load_dataset("synthetic", SyntheticConfig(alpha=-0.5))


# ---------------------------------------------------------------------------------------------
# LEAF fixture: 'synthetic' JSON with 3 features and hand-countable labels.

LEAF_LABELS = {"train": {"u1": [0, 0, 1], "u2": [2, 2, 2], "u3": [0, 1, 2, 3]},
               "test": {"u1": [1], "u3": [0, 1, 2, 3]}}


def _leaf_fixture(root):
    for split, users in LEAF_LABELS.items():
        folder = root / split
        folder.mkdir(parents=True)
        content = {"users": list(users), "num_samples": [len(y) for y in users.values()],
                   "user_data": {u: {"x": [[float(i), float(v), 1.0] for i, v in enumerate(y)],
                                     "y": y} for u, y in users.items()}}
        (folder / "data.json").write_text(json.dumps(content))
    return root


def test_leaf_from_data_dir_or_split_folders_and_path_errors(tmp_path):
    root = _leaf_fixture(tmp_path / "leaf")
    ds = load_dataset("leaf", LeafConfig(dataset="synthetic", data_dir=str(root)))
    assert ds.train.names == ("u1", "u2", "u3") and ds.num_classes == 4
    np.testing.assert_array_equal(ds.test.num_examples, [1, 0, 4])
    again = load_dataset("leaf", LeafConfig(dataset="synthetic", train_dir=str(root / "train"),
                                            test_dir=str(root / "test"), num_classes=5))
    assert again.num_classes == 5 and _same_data(ds, again)
    with pytest.raises(OptionError, match=r"^data.data_dir=None is invalid; LEAF needs data_dir"):
        load_dataset("leaf")
    with pytest.raises(OptionError, match=r"^data.test_dir=None is invalid; train_dir is given, "
                                          r"so test_dir is needed too$"):
        load_dataset("leaf", LeafConfig(train_dir=str(root / "train")))
    with pytest.raises(OptionError, match=r"^data.train_dir='.*' is invalid; give data_dir or"):
        load_dataset("leaf", LeafConfig(data_dir=str(root), train_dir=str(root)))
    with pytest.raises(OptionError, match=r"^data.data_dir='.*nowhere' is invalid; folder "
                                          r"'.*nowhere/train' does not exist$"):
        load_dataset("leaf", LeafConfig(data_dir=str(tmp_path / "nowhere")))
    (root / "test" / "data.json").unlink()
    (root / "test").rmdir()
    # The missing test folder is reported before the train folder is read.
    with pytest.raises(OptionError, match=r"folder '.*leaf/test' does not exist"):
        load_dataset("leaf", LeafConfig(dataset="synthetic", data_dir=str(root)))


def test_tff_h5_from_tff_file_names_or_paths_and_errors(tmp_path):
    h5py = pytest.importorskip("h5py")

    def write(path, clients):
        with h5py.File(path, "w") as f:
            for client_id, features in clients.items():
                group = f.create_group(f"examples/{client_id}")
                for name, value in features.items():
                    kind = h5py.string_dtype() if isinstance(value, list) else None
                    group.create_dataset(name, data=value, dtype=kind)

    rng = np.random.default_rng(0)
    pixels = lambda n: {"pixels": rng.random((n, 28, 28), dtype=np.float32),
                        "label": np.arange(n, dtype=np.int32) % 10}
    write(tmp_path / "fed_emnist_digitsonly_train.h5", {"a": pixels(3), "b": pixels(2)})
    write(tmp_path / "fed_emnist_digitsonly_test.h5", {"b": pixels(1)})
    ds = load_dataset("tff_h5", H5Config(data_dir=str(tmp_path), only_digits=True))
    assert ds.num_classes == 10 and ds.train.names == ("a", "b")
    np.testing.assert_array_equal(ds.test.num_examples, [0, 1])
    only_b = load_dataset("tff_h5", H5Config(train_path=str(tmp_path / "fed_emnist_digitsonly_"
                                                                      "train.h5"),
                                             test_path=str(tmp_path / "fed_emnist_digitsonly_"
                                                                     "test.h5"),
                                             client_ids=("b",)))
    assert only_b.num_classes == 62 and only_b.train.names == ("b",)
    with pytest.raises(OptionError, match=r"^data.data_dir='.*' is invalid; file "
                                          r"'.*/fed_emnist_train.h5' does not exist$"):
        load_dataset("tff_h5", H5Config(data_dir=str(tmp_path)))

    posts = {"u1": {"tokens": ["how to sort a list"]}, "u2": {"tokens": ["sort it"]}}
    write(tmp_path / "stackoverflow_train.h5", posts)
    write(tmp_path / "stackoverflow_test.h5", posts)
    (tmp_path / "stackoverflow.word_count").write_text("sort 90\nlist 50\nto 40\nhow 3\n")
    so = load_dataset("tff_h5", H5Config(dataset="stackoverflow", data_dir=str(tmp_path),
                                         vocabulary_size=3, sequence_length=4))
    assert so.num_classes == 3 + 4 and so.feature_shape == (4,)
    # [BOS how to sort a list EOS] truncated to 5 ids: "how" and "a" are out of the 3-word
    # vocabulary (id 6, an ignored target), "to" is 5, "sort" 3.
    np.testing.assert_array_equal(so.train.x[0], [[1, 6, 5, 3]])
    np.testing.assert_array_equal(so.train.y[0], [[-1, 5, 3, -1]])
    with pytest.raises(OptionError, match=r"^data.vocabulary_path=None is invalid; stackoverflow "
                                          r"needs its word list"):
        load_dataset("tff_h5", H5Config(dataset="stackoverflow", train_path="a", test_path="b"))
    with pytest.raises(OptionError, match=r"^data.only_digits=True is invalid; only dataset "
                                          r"emnist uses it, and dataset is 'shakespeare'$"):
        load_dataset("tff_h5", H5Config(dataset="shakespeare", only_digits=True))
    with pytest.raises(OptionError, match=r"^data.test_path='.*missing.h5' is invalid; file "):
        load_dataset("tff_h5", H5Config(train_path=str(tmp_path / "stackoverflow_train.h5"),
                                        test_path=str(tmp_path / "missing.h5")))


# ---------------------------------------------------------------------------------------------
# describe


def test_entropy_bits_hand_values():
    np.testing.assert_allclose(entropy_bits([[4, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1],
                                             [0, 0, 0, 0], [3, 1, 0, 0]]),
                               [0.0, 1.0, 2.0, 0.0, 2 - 0.75 * np.log2(3)])


def test_describe_leaf_fixture_exact_numbers(tmp_path):
    ds = load_dataset("leaf", LeafConfig(dataset="synthetic",
                                         data_dir=str(_leaf_fixture(tmp_path))))
    description = describe(ds)
    assert json.loads(json.dumps(description)) == description
    assert description["num_clients"] == 3 and description["num_classes"] == 4
    assert description["feature_shape"] == [3]
    assert description["examples"] == {"train": {"total": 10, "min": 3, "median": 3.0, "max": 4},
                                       "test": {"total": 5, "min": 0, "median": 1.0, "max": 4}}
    entropy = description["label_entropy_bits"]
    # u1 holds labels {0: 2, 1: 2} (1 bit), u2 only 2s (0 bits), u3 two of each of 4 (2 bits).
    assert entropy["mean_per_client"] == pytest.approx(1.0)
    pooled = np.array([4, 4, 5, 2]) / 15
    assert entropy["pooled"] == pytest.approx(-(pooled * np.log2(pooled)).sum())
    assert entropy["uniform"] == 2.0
    assert description["classes_per_client"] == {"mean": pytest.approx(7 / 3), "min": 1, "max": 4}
    text = format_description(description)
    assert text.splitlines()[0] == "leaf_synthetic: 3 clients, 4 classes, features (3,)"
    assert "mean per client 1.000" in text and "  test" in text


def test_describe_leaves_empty_clients_out_of_the_entropy_mean():
    x = lambda n: np.zeros((n, 2), np.float32)
    y = lambda *labels: np.array(labels, np.int32)
    train = ClientData((x(2), x(0), x(3)), (y(0, 1), y(), y(2, 2, 2)), ("a", "b", "c"))
    test = ClientData((x(0), x(0), x(0)), (y(), y(), y()), ("a", "b", "c"))
    description = describe(FederatedDataset("tiny", train, test, 3))
    assert description["clients_without_examples"] == 1
    assert description["examples"]["train"] == {"total": 5, "min": 0, "median": 2.0, "max": 3}
    assert description["label_entropy_bits"]["mean_per_client"] == pytest.approx(0.5)
    assert "clients without data  1 (left out of the entropy mean)" in format_description(
        description)
    empty = ClientData((x(0),), (y(),), ("a",))
    with pytest.raises(ValueError, match=r"data set 'empty' has no examples to describe"):
        describe(FederatedDataset("empty", empty, empty, 3))


def test_describe_digits_default_iid_and_one_class_per_client():
    default = describe(load_dataset("digits"))
    sizes = default["examples"]
    assert sizes["train"]["total"] + sizes["test"]["total"] == 1797
    assert sizes["train"]["min"] >= 1 and sizes["train"]["median"] == 29
    entropy = default["label_entropy_bits"]
    assert entropy["pooled"] > 3.3 and entropy["uniform"] == pytest.approx(np.log2(10))
    iid = describe(load_dataset("digits", DigitsConfig(partition="iid")))
    single = describe(load_dataset("digits", DigitsConfig(partition="classes",
                                                          classes_per_client=1)))
    # Measured: 3.164 (iid), 2.435 (Dirichlet 0.5), 0 (one class) against 3.322 pooled; the iid
    # gap is the plug-in estimate's small-sample bias, about 9 / (2 * 36 ln 2) = 0.18 bits.
    assert iid["label_entropy_bits"]["pooled"] - 0.25 < iid["label_entropy_bits"][
        "mean_per_client"] < iid["label_entropy_bits"]["pooled"]
    assert 1.5 < entropy["mean_per_client"] < iid["label_entropy_bits"]["mean_per_client"] - 0.5
    assert single["label_entropy_bits"]["mean_per_client"] == 0.0
    assert single["classes_per_client"] == {"mean": 1.0, "min": 1, "max": 1}


def test_describe_synthetic_and_mnist1d():
    skewed = describe(load_dataset("synthetic", SyntheticConfig()))
    iid = describe(load_dataset("synthetic_iid"))
    assert skewed["num_clients"] == 30 and skewed["feature_shape"] == [60]
    assert skewed["examples"]["train"]["max"] + skewed["examples"]["test"]["max"] <= 1000
    # Measured: 0.35 bits per device for Synthetic(1, 1) against 2.88 for Synthetic-IID, whose
    # devices (45 to 800 examples) come within 0.1 bits of the pooled 2.96.
    assert skewed["label_entropy_bits"]["mean_per_client"] < 1.0
    assert abs(iid["label_entropy_bits"]["mean_per_client"]
               - iid["label_entropy_bits"]["pooled"]) < 0.15
    pytest.importorskip("mnist1d")
    mnist = load_dataset("mnist1d", MNIST1DConfig())
    assert mnist.metadata["partition_options"] == {"alpha": 0.5, "min_examples_per_client": 2}
    description = describe(mnist)
    assert description["feature_shape"] == [40] and description["num_clients"] == 50
    assert sum(description["examples"][s]["total"] for s in ("train", "test")) == 5000
    assert 1.5 < description["label_entropy_bits"]["mean_per_client"] < 3.0


def test_plot_label_distribution_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    ds = load_dataset("digits", dataclasses.replace(DigitsConfig(), num_clients=12))
    path = plot_label_distribution(ds, str(tmp_path / "plots" / "labels.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["labels.png"]
