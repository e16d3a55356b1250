"""LEAF JSON and TFF HDF5 loaders on fixture files written here; LEAF synthetic; MNIST-1D."""

import json
import os
import random

import numpy as np
import pytest

from fedjax_lab.data.leaf import SHAKESPEARE_VOCABULARY, DataFormatError, load_leaf
from fedjax_lab.data.synthetic import leaf_synthetic

h5py = pytest.importorskip("h5py")
from fedjax_lab.data.h5 import (load_emnist_h5, load_shakespeare_h5,  # noqa: E402
                                load_stackoverflow_h5, read_h5_clients, read_word_counts)


def _write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))


def _leaf_file(users, make, hierarchies=None):
    content = {"users": list(users), "num_samples": [n for n in users.values()],
               "user_data": {u: make(u, n) for u, n in users.items()}}
    if hierarchies:
        content["hierarchies"] = hierarchies
    return content


def _femnist(user, n):
    base = 1000 * int(user[1:])
    return {"x": [[(base + i + j / 1000) / 1e4 for j in range(784)] for i in range(n)],
            "y": [(base + i) % 62 for i in range(n)]}


def _text(user, n):
    line = ("To be, or not to be: that is the question. Whether 'tis nobler in the mind "
            "to suffer the slings and arrows of outrageous fortune")
    offset = int(user[1:])
    return {"x": [line[offset + i:offset + i + 80] for i in range(n)],
            "y": [line[offset + i + 80] for i in range(n)]}


def _femnist_folders(root):
    _write(root / "train" / "all_0.json", _leaf_file({"u1": 3, "u2": 2}, _femnist))
    _write(root / "train" / "all_1.json", _leaf_file({"u3": 4}, _femnist))
    # Test files are named differently and hold the users in another grouping; u2 has none.
    _write(root / "test" / "held_a.json", _leaf_file({"u3": 1}, _femnist))
    _write(root / "test" / "held_b.json", _leaf_file({"u1": 2}, _femnist))
    return str(root / "train"), str(root / "test")


def test_leaf_femnist_merges_files_and_keeps_values(tmp_path):
    ds = load_leaf(*_femnist_folders(tmp_path), "femnist")
    assert ds.name == "leaf_femnist" and ds.num_classes == 62
    assert ds.train.names == ("u1", "u2", "u3") and ds.feature_shape == (784,)
    np.testing.assert_array_equal(ds.train.num_examples, [3, 2, 4])
    np.testing.assert_array_equal(ds.test.num_examples, [2, 0, 1])
    expected = _femnist("u3", 4)
    np.testing.assert_allclose(ds.train.x[2], np.float32(expected["x"]))
    np.testing.assert_array_equal(ds.train.y[2], expected["y"])
    np.testing.assert_array_equal(ds.test.y[0], _femnist("u1", 2)["y"])
    assert ds.metadata["users_without_test"] == ["u2"]


def test_leaf_shakespeare_vocabulary_and_hierarchies(tmp_path):
    users = {"r1": 3, "r2": 2}
    _write(tmp_path / "train" / "a.json", _leaf_file(users, _text, ["HAMLET", "HAMLET"]))
    _write(tmp_path / "train" / "b.json", _leaf_file({"r7": 1}, _text, ["OTHELLO"]))
    _write(tmp_path / "test" / "c.json", _leaf_file({"r1": 1, "r7": 1}, _text))
    ds = load_leaf(str(tmp_path / "train"), str(tmp_path / "test"), "shakespeare")
    assert len(SHAKESPEARE_VOCABULARY) == 80 and ds.num_classes == 80
    assert ds.feature_shape == (80,) and ds.train.names == ("r1", "r2", "r7")
    sample = _text("r2", 2)
    decode = lambda codes: "".join(SHAKESPEARE_VOCABULARY[int(c)] for c in codes)
    assert decode(ds.train.x[1][1]) == sample["x"][1]
    # Targets are every position's next character: x[1:] + y.
    assert ds.train.y[1].shape == (2, 80)
    assert decode(ds.train.y[1][1]) == sample["x"][1][1:] + sample["y"][1]
    assert ds.test.y[1].shape == (0, 80)  # r2 has no test example
    assert SHAKESPEARE_VOCABULARY.index("o") == int(ds.train.x[0][0][0]) == 67  # "o be, or"
    assert ds.metadata["hierarchies"] == {"r1": "HAMLET", "r2": "HAMLET", "r7": "OTHELLO"}


def test_leaf_synthetic_infers_classes(tmp_path):
    make = lambda u, n: {"x": [[i, -i, 0.5] for i in range(n)], "y": [i % 4 for i in range(n)]}
    _write(tmp_path / "train" / "t.json", _leaf_file({"0": 5, "1": 4}, make))
    _write(tmp_path / "test" / "t.json", _leaf_file({"0": 2}, make))
    ds = load_leaf(str(tmp_path / "train"), str(tmp_path / "test"), "synthetic")
    assert ds.num_classes == 4 and ds.feature_shape == (3,)
    np.testing.assert_array_equal(ds.train.x[0][:, 0], np.arange(5))


def _corrupt(root, file, change):
    path = root / "train" / file
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content))


@pytest.mark.parametrize("change, message", [
    (lambda c: c["num_samples"].__setitem__(0, 5),
     r"all_0.json: user 'u1': field 'num_samples' says 5 but 'user_data' holds 3 examples"),
    (lambda c: c["user_data"]["u2"]["y"].pop(),
     r"all_0.json: user 'u2': fields 'x' and 'y' have 2 and 1 entries"),
    (lambda c: c["user_data"].__setitem__("u2", {"x": [], "y": []}),
     r"all_0.json: user 'u2': no examples \(empty client\)"),
    (lambda c: c.pop("users"), r"all_0.json: field 'users' is missing"),
    (lambda c: c["user_data"]["u1"]["x"][1].pop(),
     r"all_0.json: user 'u1': field 'x' is not a list of equally long lists"),
    (lambda c: c["user_data"]["u1"]["y"].__setitem__(0, 62),
     r"all_0.json: user 'u1': field 'y' has label 62; expected labels in \[0, 62\)"),
    (lambda c: c["users"].append("u3") or c["num_samples"].append(4)
     or c["user_data"].__setitem__("u3", _femnist("u3", 4)),
     r"all_1.json: user 'u3' also appears in .*all_0.json"),
    (lambda c: c["user_data"].__setitem__("zz", _femnist("u9", 1)),
     r"all_0.json: user 'zz' is in field 'user_data' but not in 'users'"),
])
def test_leaf_bad_input_names_file_user_and_field(tmp_path, change, message):
    train, test = _femnist_folders(tmp_path)
    _corrupt(tmp_path, "all_0.json", change)
    before = sorted(os.listdir(train)) + sorted(os.listdir(test))
    with pytest.raises(DataFormatError, match=message):
        load_leaf(train, test, "femnist")
    assert sorted(os.listdir(train)) + sorted(os.listdir(test)) == before  # nothing written


def test_leaf_malformed_json_test_only_user_and_bad_character(tmp_path):
    train, test = _femnist_folders(tmp_path)
    _write(tmp_path / "test" / "held_c.json", _leaf_file({"u9": 1}, _femnist))
    with pytest.raises(DataFormatError, match=r"held_c.json: user 'u9' is in the test files "
                                              r"but in no train file"):
        load_leaf(train, test, "femnist")
    _write(tmp_path / "train" / "all_1.json", '{"users": ["u3"], "num_samples": [1,')
    with pytest.raises(DataFormatError, match=r"all_1.json: malformed JSON at line 1 column"):
        load_leaf(train, test, "femnist")
    bad = _text("r1", 2)
    bad["x"][1] = "~" + bad["x"][1][1:]
    _write(tmp_path / "s" / "train" / "a.json", {"users": ["r1"], "num_samples": [2],
                                                 "user_data": {"r1": bad}})
    _write(tmp_path / "s" / "test" / "a.json", _leaf_file({"r1": 1}, _text))
    with pytest.raises(DataFormatError, match=r"a.json: user 'r1': field 'x' example 1: "
                                              r"character '~' at position 0 is not in the voc"):
        load_leaf(str(tmp_path / "s" / "train"), str(tmp_path / "s" / "test"), "shakespeare")
    with pytest.raises(FileNotFoundError, match=r"holds no .json file"):
        load_leaf(str(tmp_path / "s"), test, "femnist")


# ---------------------------------------------------------------------------------------------
# TFF HDF5


def _h5(path, clients):
    with h5py.File(path, "w") as f:
        for client_id, features in clients.items():
            group = f.create_group(f"examples/{client_id}")
            for name, value in features.items():
                if isinstance(value, list):
                    group.create_dataset(name, data=value, dtype=h5py.string_dtype())
                else:
                    group.create_dataset(name, data=value)
    return str(path)


def _emnist(n, seed):
    rng = np.random.default_rng(seed)
    return {"pixels": rng.random((n, 28, 28), dtype=np.float32),
            "label": rng.integers(0, 10, n).astype(np.int32)}


def test_h5_emnist_loads_users_counts_values(tmp_path):
    train = {"f0001_00": _emnist(4, 0), "f0002_07": _emnist(3, 1)}
    test = {"f0002_07": _emnist(2, 2)}
    ds = load_emnist_h5(_h5(tmp_path / "train.h5", train), _h5(tmp_path / "test.h5", test),
                        num_classes=10)
    assert ds.train.names == ("f0001_00", "f0002_07") and ds.feature_shape == (28, 28)
    np.testing.assert_array_equal(ds.train.num_examples, [4, 3])
    np.testing.assert_array_equal(ds.test.num_examples, [0, 2])
    np.testing.assert_array_equal(ds.train.x[1], train["f0002_07"]["pixels"])
    np.testing.assert_array_equal(ds.test.y[1], test["f0002_07"]["label"])
    only = load_emnist_h5(str(tmp_path / "train.h5"), str(tmp_path / "test.h5"),
                          num_classes=10, client_ids=["f0002_07"])
    assert only.train.names == ("f0002_07",) and only.test.num_examples.tolist() == [2]


def test_h5_shakespeare_sequences_exact(tmp_path):
    # fedjax's preprocessing: [BOS] + ids + [EOS] per snippet, joined, shifted by one, padded
    # with PAD to a multiple of T; PAD targets ignored.
    snippets = {"ROMEO": ["But soft", "ay"], "JULIET": ["O Romeo,", "Romeo!"]}
    path = _h5(tmp_path / "s.h5", {c: {"snippets": v} for c, v in snippets.items()})
    ds = load_shakespeare_h5(path, path, sequence_length=5)
    vocabulary = ds.metadata["vocabulary"]
    assert ds.train.names == ("JULIET", "ROMEO") and ds.num_classes == 86 + 4 == 90
    assert ds.metadata["special_ids"] == {"pad": 0, "bos": 1, "eos": 2, "out_of_vocabulary": 89}
    code = {c: vocabulary.index(c) + 3 for c in "Butsofay "}
    pad, bos, eos, ignored = 0, 1, 2, -1
    b, u, t, s_, o, f, a, y, sp = (code[c] for c in "Butsofay ")
    # ROMEO's stream: BOS B u t _ s o f t EOS BOS a y EOS (14 ids, 13 targets, 3 rows of 5).
    np.testing.assert_array_equal(ds.train.x[1], [[bos, b, u, t, sp], [s_, o, f, t, eos],
                                                  [bos, a, y, pad, pad]])
    np.testing.assert_array_equal(ds.train.y[1], [[b, u, t, sp, s_], [o, f, t, eos, bos],
                                                  [a, y, eos, ignored, ignored]])
    assert ds.train.x[1].dtype == np.float32 and ds.train.y[1].dtype == np.int32
    # JULIET: 8 + 6 characters and 4 specials = 18 ids, 17 targets -> 4 rows.
    special = {pad: "_", bos: "<", eos: ">", ignored: "-"}
    decode = lambda ids: "".join(special.get(int(i)) or vocabulary[int(i) - 3]
                                 for i in np.ravel(ids))
    assert ds.train.y[0].shape == (4, 5)
    assert decode(ds.train.x[0]) == "<O Romeo,><Romeo!___"
    assert decode(ds.train.y[0]) == "O Romeo,><Romeo!>---"
    # A one-snippet client of one character still gives a sequence (nothing is dropped).
    tiny = _h5(tmp_path / "tiny.h5", {"A": {"snippets": ["a"]}})
    one = load_shakespeare_h5(tiny, tiny, sequence_length=4)
    np.testing.assert_array_equal(one.train.x[0], [[bos, a, pad, pad]])
    np.testing.assert_array_equal(one.train.y[0], [[a, eos, ignored, ignored]])


def test_h5_stackoverflow_sequences_exact(tmp_path):
    posts = {"u1": {"tokens": ["how to sort a list", "python"]}, "u2": {"tokens": ["sort"]}}
    so = _h5(tmp_path / "so.h5", posts)
    words = ["sort", "list", "python", "to"]
    ds = load_stackoverflow_h5(so, so, words, sequence_length=4)
    assert ds.num_classes == 8 and ds.feature_shape == (4,)
    pad, bos, eos, oov, ignored = 0, 1, 2, 7, -1
    # [BOS how to sort a list EOS] truncated to T + 1 = 5 ids: BOS how to sort a.
    np.testing.assert_array_equal(ds.train.x[0], [[bos, oov, 6, 3], [bos, 5, eos, pad]])
    # Targets: how (OOV) ignored, to, sort, a (OOV) ignored; python, then EOS and PAD ignored.
    np.testing.assert_array_equal(ds.train.y[0], [[ignored, 6, 3, ignored],
                                                  [5, ignored, ignored, ignored]])
    np.testing.assert_array_equal(ds.train.y[1], [[3, ignored, ignored, ignored]])
    assert ds.metadata["ignored_targets"] == ["pad", "bos", "eos", "out_of_vocabulary"]


def test_read_word_counts_and_its_errors(tmp_path):
    path = tmp_path / "stackoverflow.word_count"
    path.write_text("the 90\nto 50\n\nsort 50\nlist 3\n")
    assert read_word_counts(str(path), 3) == ["the", "to", "sort"]
    assert read_word_counts(str(path), 10) == ["the", "to", "sort", "list"]
    path.write_text("the 90\nto fifty\n")
    with pytest.raises(DataFormatError, match=r"stackoverflow.word_count: line 2: 'to fifty' is "
                                              r"not 'word count' \(two fields, an integer"):
        read_word_counts(str(path), 10)
    path.write_text("the 90\nnew york 12\n")
    with pytest.raises(DataFormatError, match=r"word_count: line 2: 'new york 12' is not"):
        read_word_counts(str(path), 10)
    path.write_text("the 9\nto 50\n")
    with pytest.raises(DataFormatError, match=r"word_count: line 2: count 50 is above the "
                                              r"previous line's 9"):
        read_word_counts(str(path), 10)


def test_h5_bad_input_names_file_client_and_feature(tmp_path):
    good = _h5(tmp_path / "good.h5", {"a": _emnist(2, 0)})
    with h5py.File(tmp_path / "flat.h5", "w") as f:
        f.create_dataset("pixels", data=np.zeros(3))
    with pytest.raises(DataFormatError, match=r"flat.h5: no group 'examples'"):
        read_h5_clients(str(tmp_path / "flat.h5"), ("pixels",))
    with pytest.raises(DataFormatError, match=r"good.h5: client 'zz' has no group 'examples/zz'"):
        read_h5_clients(good, ("pixels",), ["a", "zz"])
    no_label = _h5(tmp_path / "nolabel.h5", {"a": {"pixels": np.zeros((2, 28, 28))}})
    with pytest.raises(DataFormatError, match=r"nolabel.h5: client 'a' has no feature 'label'"):
        load_emnist_h5(no_label, good)
    ragged = _h5(tmp_path / "ragged.h5", {"a": {"pixels": np.zeros((2, 28, 28)),
                                                "label": np.zeros(3, np.int32)}})
    with pytest.raises(DataFormatError, match=r"ragged.h5: client 'a': features have different "):
        load_emnist_h5(ragged, good)
    empty = _h5(tmp_path / "empty.h5", {"a": {"pixels": np.zeros((0, 28, 28)),
                                              "label": np.zeros(0, np.int32)}})
    with pytest.raises(DataFormatError, match=r"empty.h5: client 'a' has no examples"):
        load_emnist_h5(empty, good)
    extra = _h5(tmp_path / "extra.h5", {"a": _emnist(1, 1), "b": _emnist(1, 2)})
    with pytest.raises(DataFormatError, match=r"extra.h5: client 'b' is in the test file but "):
        load_emnist_h5(good, extra)
    odd = _h5(tmp_path / "odd.h5", {"KING": {"snippets": ["Now is the winter of our discontent\t"
                                                           "made glorious summer by this sun"]}})
    with pytest.raises(DataFormatError, match=r"odd.h5: client 'KING': feature 'snippets', "
                                              r"snippet 0: character '\\t' at position 35 is "
                                              r"not in the vocabulary$"):
        load_shakespeare_h5(odd, odd, sequence_length=10)
    no_snippets = _h5(tmp_path / "nosnippets.h5", {"KING": {"tokens": ["a b"]}})
    with pytest.raises(DataFormatError, match=r"nosnippets.h5: client 'KING' has no feature "
                                              r"'snippets' \(group 'examples/KING' holds "
                                              r"\['tokens'\]\)$"):
        load_shakespeare_h5(no_snippets, no_snippets)
    no_tokens = _h5(tmp_path / "notokens.h5", {"u1": {"snippets": ["a b"]}})
    with pytest.raises(DataFormatError, match=r"notokens.h5: client 'u1' has no feature "
                                              r"'tokens'"):
        load_stackoverflow_h5(no_tokens, no_tokens, ["a"])
    (tmp_path / "junk.h5").write_text("not hdf5")
    with pytest.raises(DataFormatError, match=r"junk.h5: not a readable HDF5 file"):
        read_h5_clients(str(tmp_path / "junk.h5"), ("x",))


# ---------------------------------------------------------------------------------------------
# LEAF synthetic and MNIST-1D


def _leaf_reference(num_tasks, num_classes, dim, seed):
    """TalwalkarLab/leaf data/synthetic main.py + data_generator.py, with RandomState."""
    rs = np.random.RandomState(seed)
    sizes = [min(s + 5, 1000) for s in rs.lognormal(3, 2, num_tasks).astype(int)]
    rs = np.random.RandomState(seed)
    q = rs.normal(loc=0.0, scale=1.0, size=(dim + 1, num_classes, 1))
    sigma = np.zeros((dim, dim))
    for i in range(dim):
        sigma[i, i] = (i + 1) ** (-1.2)
    loc = rs.normal(loc=0, scale=1., size=None)
    means = [rs.normal(loc=loc, scale=1., size=1)]
    tasks = []
    for n in sizes:
        cluster = rs.choice(range(1), size=None, replace=True, p=[1.0])
        b = rs.normal(loc=0.0, scale=1.0, size=None)
        loc = rs.normal(loc=b, scale=1.0, size=dim)
        x = np.ones((n, dim + 1))
        x[:, 1:] = rs.multivariate_normal(mean=loc, cov=sigma, size=n)
        info = rs.normal(loc=means[cluster], scale=0.1, size=means[cluster].shape)
        z = np.matmul(x, np.matmul(q, info)) + rs.normal(0., 0.1, (n, num_classes))
        prob = np.exp(z) / sum(np.exp(z))
        tasks.append((x[:, 1:], np.argmax(prob, axis=1)))
    return tasks


def test_leaf_synthetic_equals_reference_generator():
    ds = leaf_synthetic(25, num_classes=5, dim=12, seed=931231)
    reference = _leaf_reference(25, 5, 12, 931231)
    assert ds.train.names[:3] == ("0", "1", "2") and ds.num_classes == 5
    for k, (x_ref, y_ref) in enumerate(reference):
        x = np.concatenate([ds.train.x[k], ds.test.x[k]])
        y = np.concatenate([ds.train.y[k], ds.test.y[k]])
        order, ref_order = np.argsort(x[:, 0]), np.argsort(x_ref[:, 0].astype(np.float32))
        np.testing.assert_array_equal(x[order], x_ref[ref_order].astype(np.float32))
        np.testing.assert_array_equal(y[order], y_ref[ref_order])
        assert ds.train.num_examples[k] == max(1, int(0.9 * len(y_ref)))
    sizes = [len(y) for _, y in reference]
    assert min(sizes) >= 5 and max(sizes) <= 1000


def test_mnist1d_generated_locally_without_touching_global_rngs():
    from mnist1d.data import get_dataset_args, make_dataset

    from fedjax_lab.data.mnist1d import mnist1d

    np.random.seed(123)
    random.seed(123)
    expected_numpy, expected_python = np.random.random(), random.random()
    np.random.seed(123)
    random.seed(123)
    ds = mnist1d(10, partition="dirichlet", alpha=0.5, seed=0)
    assert (np.random.random(), random.random()) == (expected_numpy, expected_python)
    assert ds.feature_shape == (40,) and ds.num_classes == 10 and ds.name == "mnist1d_dirichlet"
    assert ds.train.num_examples.sum() + ds.test.num_examples.sum() == 5000
    reference = make_dataset(get_dataset_args())
    pooled = np.concatenate(ds.train.x + ds.test.x)
    wanted = np.concatenate([reference["x"], reference["x_test"]]).astype(np.float32)
    np.testing.assert_array_equal(np.sort(pooled[:, 0]), np.sort(wanted[:, 0]))
    with pytest.raises(ValueError, match=r"mnist1d option 'size' is unknown"):
        mnist1d(generator_options={"size": 3})
