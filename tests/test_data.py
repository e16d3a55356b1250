"""Tests for fedjax_lab.data: containers, partitions, FedProx synthetic data, digits."""

import numpy as np
import pytest

from fedjax_lab.data import (ClientData, FederatedDataset, PaddedClients, digits,
                             dirichlet_partition, fedprox_synthetic, iid_partition,
                             train_test_split_per_client)


def _clients(sizes, feature_shape=(2, 3), seed=0):
    rng = np.random.default_rng(seed)
    return ClientData(tuple(rng.normal(size=(n, *feature_shape)) for n in sizes),
                      tuple(rng.integers(0, 5, n) for n in sizes),
                      tuple(f"c{i}" for i in range(len(sizes))))


def _label_histograms(labels_per_client, num_classes=10):
    counts = np.stack([np.bincount(y, minlength=num_classes) for y in labels_per_client])
    return counts / counts.sum(axis=1, keepdims=True)


def _mean_tv_to_pooled(labels_per_client, num_classes=10):
    """Mean total-variation distance between each client's label law and the pooled law."""
    pooled = _label_histograms([np.concatenate(labels_per_client)], num_classes)[0]
    return 0.5 * np.abs(_label_histograms(labels_per_client, num_classes) - pooled).sum(1).mean()


def _all_labels(ds):
    return [np.concatenate([a, b]) for a, b in zip(ds.train.y, ds.test.y)]


# ---------------------------------------------------------------------------------------------
# ClientData / FederatedDataset


def test_client_data_converts_dtypes_and_reports_shapes():
    data = _clients([3, 0, 5])
    assert data.num_clients == 3
    assert data.num_examples.dtype == np.int64
    np.testing.assert_array_equal(data.num_examples, [3, 0, 5])
    assert data.feature_shape == (2, 3)
    assert all(x.dtype == np.float32 for x in data.x)
    assert all(y.dtype == np.int32 for y in data.y)
    assert isinstance(data.names, tuple)
    empty = ClientData([np.zeros((0, 4))], [np.array([])], ["e"])
    assert empty.y[0].dtype == np.int32 and empty.feature_shape == (4,)


@pytest.mark.parametrize("x, y, names, message", [
    ([np.zeros((2, 4))] * 2, [np.zeros(2, int)], ["a", "b"], r"2 x arrays, 1 y arrays and 2 names"),
    ([np.zeros((2, 4))] * 2, [np.zeros(2, int), np.zeros((2, 1), int)], ["a", "b"],
     r"client 1 \('b'\) y has label shape \(1,\); expected \(\) as client 0"),
    ([np.zeros((2, 4))], [np.zeros((), int)], ["a"],
     r"client 0 \('a'\) y has shape \(\).*expected integer labels \[n_i\]"),
    ([np.zeros((2, 4))], [np.zeros(2)], ["a"], r"client 0 \('a'\) y .*float64.*integer"),
    ([np.zeros((2, 4)), np.zeros((3, 4))], [np.zeros(2, int)] * 2, ["a", "b"],
     r"client 1 \('b'\) x has shape \(3, 4\); expected first dim 2"),
    ([np.zeros((2, 4)), np.zeros((2, 4)), np.zeros((2, 5))], [np.zeros(2, int)] * 3,
     ["a", "b", "c"], r"client 2 \('c'\) x has feature shape \(5,\); expected \(4,\)"),
    ([], [], [], r"0 clients"),
])
def test_client_data_validation_names_client_and_field(x, y, names, message):
    with pytest.raises(ValueError, match=message):
        ClientData(tuple(x), tuple(y), tuple(names))


def test_pad_shapes_mask_and_contents():
    data = _clients([3, 0, 5])
    padded = data.pad(multiple_of=4)
    assert isinstance(padded, PaddedClients)
    assert padded.x.shape == (3, 8, 2, 3) and padded.x.dtype == np.float32
    assert padded.y.shape == (3, 8) and padded.y.dtype == np.int32
    assert padded.mask.dtype == bool and padded.num_examples.dtype == np.int32
    np.testing.assert_array_equal(padded.mask.sum(1), data.num_examples)
    for i, n in enumerate(data.num_examples):
        np.testing.assert_array_equal(padded.x[i, :n], data.x[i])
        np.testing.assert_array_equal(padded.y[i, :n], data.y[i])
        assert padded.mask[i, :n].all() and not padded.mask[i, n:].any()
        assert not padded.x[i, n:].any() and not padded.y[i, n:].any()
    assert data.pad().x.shape[1] == 5
    assert data.pad(multiple_of=5).x.shape[1] == 5
    assert _clients([0, 0]).pad(multiple_of=3).mask.shape == (2, 3)
    with pytest.raises(ValueError, match="multiple_of=0"):
        data.pad(0)


def test_select_keeps_given_order():
    data = _clients([3, 1, 4])
    picked = data.select([2, 0])
    assert picked.names == ("c2", "c0")
    np.testing.assert_array_equal(picked.x[0], data.x[2])
    np.testing.assert_array_equal(picked.y[1], data.y[0])
    np.testing.assert_array_equal(data.select(np.array([1, 1])).num_examples, [1, 1])
    with pytest.raises(ValueError, match=r"contains 3; expected values in \[0, 3\)"):
        data.select([0, 3])


def test_federated_dataset_validation():
    train, test = _clients([3, 2]), _clients([1, 1])
    ds = FederatedDataset("toy", train, test, num_classes=5, metadata={"k": 1})
    assert ds.num_clients == 2 and ds.feature_shape == (2, 3)
    renamed = ClientData(test.x, test.y, ("c0", "other"))
    with pytest.raises(ValueError, match=r"client 1 is 'c1' in train but 'other' in test"):
        FederatedDataset("toy", train, renamed, 5)
    with pytest.raises(ValueError, match=r"train has 2 clients, test has 1"):
        FederatedDataset("toy", train, test.select([0]), 5)
    with pytest.raises(ValueError, match=r"feature shape \(6,\); expected \(2, 3\)"):
        FederatedDataset("toy", train, _clients([1, 1], feature_shape=(6,)), 5)
    with pytest.raises(ValueError, match=r"train client \d \('c\d'\) has label 4; .*\[0, 4\)"):
        FederatedDataset("toy", _clients([50, 50]), test, 4)
    with pytest.raises(ValueError, match=r"num_classes=1"):
        FederatedDataset("toy", train, test, 1)


def test_train_test_split_per_client_rule_and_content():
    sizes = list(range(1, 120))
    x = [np.arange(n, dtype=np.float32)[:, None] for n in sizes]
    y = [np.arange(n) % 7 for n in sizes]
    names = [str(n) for n in sizes]
    train, test = train_test_split_per_client(x, y, names, 0.1, np.random.default_rng(0))
    # FedProx's rule is int(0.9 n); a client never loses its last train example.
    np.testing.assert_array_equal(train.num_examples, [max(1, int(0.9 * n)) for n in sizes])
    np.testing.assert_array_equal(train.num_examples + test.num_examples, sizes)
    for n, xa, xb, ya, yb in zip(sizes, train.x, test.x, train.y, test.y):
        ids = np.concatenate([xa[:, 0], xb[:, 0]]).astype(int)
        np.testing.assert_array_equal(np.sort(ids), np.arange(n))  # a permutation of the client
        np.testing.assert_array_equal(np.concatenate([ya, yb]), ids % 7)  # x, y stay paired
    assert not np.array_equal(train.x[-1][:, 0], np.arange(train.num_examples[-1]))  # shuffled
    again, _ = train_test_split_per_client(x, y, names, 0.1, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(again.x, train.x))
    with pytest.raises(ValueError, match=r"test_fraction=1.0"):
        train_test_split_per_client(x, y, names, 1.0, 0)


# ---------------------------------------------------------------------------------------------
# Partitions


def _assert_exact_cover(parts, num_examples):
    everything = np.concatenate(parts)
    assert len(everything) == num_examples
    np.testing.assert_array_equal(np.sort(everything), np.arange(num_examples))


def test_iid_partition():
    parts = iid_partition(103, 10, seed=0)
    assert len(parts) == 10
    _assert_exact_cover(parts, 103)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert not np.array_equal(np.concatenate(parts), np.arange(103))
    assert all(np.array_equal(a, b) for a, b in zip(parts, iid_partition(103, 10, seed=0)))
    assert not np.array_equal(parts[0], iid_partition(103, 10, seed=1)[0])
    assert all(np.array_equal(a, b) for a, b in
               zip(parts, iid_partition(103, 10, np.random.default_rng(0))))
    for bad in (0, 104):
        with pytest.raises(ValueError, match=rf"num_clients={bad}; expected .*\[1, 103\]"):
            iid_partition(103, bad, 0)


def _mean_label_entropy(parts, labels, num_classes=10):
    hist = _label_histograms([labels[p] for p in parts], num_classes)
    return float(-(hist * np.log(np.where(hist > 0, hist, 1))).sum(1).mean())


def test_dirichlet_partition_cover_determinism_and_skew():
    labels = np.random.default_rng(0).integers(0, 10, 5000)
    skewed = dirichlet_partition(labels, 50, alpha=0.1, seed=0)
    flat = dirichlet_partition(labels, 50, alpha=1000.0, seed=0)
    for parts in (skewed, flat):
        assert len(parts) == 50
        _assert_exact_cover(parts, 5000)
    # Dir(0.1) clients hold a few classes; Dir(1000) clients are close to the pooled law.
    assert _mean_label_entropy(skewed, labels) < 0.5 * _mean_label_entropy(flat, labels)
    assert _mean_label_entropy(flat, labels) > 0.98 * np.log(10)
    assert all(np.array_equal(a, b) for a, b in
               zip(skewed, dirichlet_partition(labels, 50, alpha=0.1, seed=0)))
    other = dirichlet_partition(labels, 50, alpha=0.1, seed=1)
    assert any(len(a) != len(b) or not np.array_equal(a, b) for a, b in zip(skewed, other))


def test_dirichlet_partition_large_alpha_splits_each_class_evenly():
    labels = np.repeat(np.array([3, 7, 100]), [3000, 600, 1200])  # arbitrary label values
    parts = dirichlet_partition(labels, 6, alpha=1e5, seed=0)
    counts = np.stack([[np.sum(labels[p] == c) for c in (3, 7, 100)] for p in parts])
    np.testing.assert_allclose(counts, np.tile([500, 100, 200], (6, 1)), atol=5)


def _owner(parts, num_examples):
    owner = np.empty(num_examples, int)
    for i, p in enumerate(parts):
        owner[p] = i
    return owner


def test_dirichlet_partition_many_clients_small_alpha_tops_up_minimum():
    labels = np.random.default_rng(0).integers(0, 10, 100_000)
    raw = dirichlet_partition(labels, 1000, 0.1, seed=0, min_examples_per_client=0)
    parts = dirichlet_partition(labels, 1000, 0.1, seed=0, min_examples_per_client=2)
    _assert_exact_cover(parts, 100_000)
    raw_sizes = np.array([len(p) for p in raw])
    assert (raw_sizes < 2).any(), "the raw draw must need a repair for this test to mean much"
    assert min(len(p) for p in parts) >= 2
    # The repair moves only the missing examples, so the Dirichlet draw is otherwise kept.
    moved = np.sum(_owner(raw, 100_000) != _owner(parts, 100_000))
    assert moved == np.maximum(2 - raw_sizes, 0).sum()
    # Water-filling: the donors are the largest clients, lowered to a common level (+-1).
    sizes = np.array([len(p) for p in parts])
    donors = sizes < raw_sizes
    assert sizes[donors].max() - sizes[donors].min() <= 1
    assert raw_sizes[~donors].max() <= sizes[donors].min() + 1


def test_dirichlet_partition_tight_and_infeasible_minimum():
    labels = np.arange(100) % 4
    parts = dirichlet_partition(labels, 50, alpha=0.01, seed=3, min_examples_per_client=2)
    assert [len(p) for p in parts] == [2] * 50
    _assert_exact_cover(parts, 100)
    with pytest.raises(ValueError, match=r"num_clients=51; expected .*\[1, 50\].*2 examples"):
        dirichlet_partition(labels, 51, alpha=0.5, seed=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(alpha=0.0), r"alpha=0.0; expected a finite value > 0"),
    (dict(num_clients=0), r"num_clients=0"),
    (dict(labels=np.zeros((4, 2), int)), r"labels has shape \(4, 2\)"),
    (dict(labels=np.zeros(10)), r"labels .*float64"),
    (dict(min_examples_per_client=-1), r"min_examples_per_client=-1"),
])
def test_dirichlet_partition_argument_errors(kwargs, message):
    args = dict(labels=np.arange(10) % 2, num_clients=2, alpha=1.0, seed=0) | kwargs
    with pytest.raises(ValueError, match=message):
        dirichlet_partition(**args)


# ---------------------------------------------------------------------------------------------
# FedProx synthetic


@pytest.fixture(scope="module")
def synthetic_1_1():
    return fedprox_synthetic(1.0, 1.0, seed=0)


@pytest.fixture(scope="module")
def synthetic_iid():
    return fedprox_synthetic(iid=True, seed=0)


def _device_means(ds):
    return np.stack([np.concatenate([a, b]).mean(0) for a, b in zip(ds.train.x, ds.test.x)])


def test_synthetic_format(synthetic_1_1, synthetic_iid):
    ds = synthetic_1_1
    assert ds.name == "synthetic_1_1" and synthetic_iid.name == "synthetic_iid"
    assert fedprox_synthetic(0.5, 0.5, num_clients=2).name == "synthetic_0.5_0.5"
    assert ds.num_clients == 30 and ds.feature_shape == (60,) and ds.num_classes == 10
    assert ds.train.names[0] == "f_00000" and ds.train.names == ds.test.names
    assert all(x.dtype == np.float32 for x in ds.train.x + ds.test.x)
    assert all(y.dtype == np.int32 and y.min() >= 0 and y.max() < 10 for y in _all_labels(ds))
    assert "max_examples=1000" in ds.metadata["deviations"][0]
    assert ds.metadata["alpha"] == 1.0 and ds.metadata["max_examples"] == 1000


def test_synthetic_sizes_cap_and_split():
    uncapped = fedprox_synthetic(1, 1, max_examples=None, seed=0)
    capped = fedprox_synthetic(1, 1, max_examples=200, seed=0)
    n_uncapped = uncapped.train.num_examples + uncapped.test.num_examples
    n_capped = capped.train.num_examples + capped.test.num_examples
    assert n_uncapped.min() >= 50 and uncapped.metadata["deviations"] == []
    # n_k = floor(LogNormal(4, 2)) + 50 is the first draw of the single Generator(seed).
    np.testing.assert_array_equal(
        n_uncapped, np.random.default_rng(0).lognormal(4, 2, 30).astype(int) + 50)
    np.testing.assert_array_equal(n_uncapped, uncapped.metadata["uncapped_num_examples"])
    # The sizes are the generator's first draw, so the cap acts on the same n_k.
    assert (n_uncapped > 200).sum() >= 3
    np.testing.assert_array_equal(n_capped, np.minimum(n_uncapped, 200))
    for ds, n in ((uncapped, n_uncapped), (capped, n_capped)):
        np.testing.assert_array_equal(ds.train.num_examples, (0.9 * n).astype(int))


def test_synthetic_determinism():
    a, b, c = (fedprox_synthetic(0.5, 0.5, num_clients=5, seed=s) for s in (7, 7, 8))
    for x, y in zip(a.train.x + a.test.x + a.train.y, b.train.x + b.test.x + b.train.y):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.train.x[0][:5], c.train.x[0][:5])


def test_synthetic_0_0_is_still_heterogeneous(synthetic_iid):
    ds = fedprox_synthetic(0.0, 0.0, seed=0)
    # v_k ~ N(0, I) per device: device means are ~sqrt(2 * 60) ~ 11 apart; IID devices share
    # v = 0, so their means differ only by sampling noise.
    means, iid_means = _device_means(ds), _device_means(synthetic_iid)
    pairwise = np.linalg.norm(means[:, None] - means[None], axis=-1)[np.triu_indices(30, 1)]
    iid_pairwise = np.linalg.norm(iid_means[:, None] - iid_means[None], axis=-1)
    assert pairwise.min() > 5.0
    assert iid_pairwise.max() < 1.5 and np.abs(iid_means).max() < 0.5
    # W_k ~ N(0, 1) entries still depend on x within a device (several classes per device),
    # and W_k, b_k are drawn per device, so the label laws differ across devices too.
    assert np.mean([len(np.unique(y)) for y in _all_labels(ds)]) > 1.5
    assert _mean_tv_to_pooled(_all_labels(ds)) > 3 * _mean_tv_to_pooled(_all_labels(synthetic_iid))


def test_synthetic_1_1_labels_far_more_skewed_than_iid(synthetic_1_1, synthetic_iid):
    skew, iid_skew = (_mean_tv_to_pooled(_all_labels(d)) for d in (synthetic_1_1, synthetic_iid))
    assert skew > 0.5 and iid_skew < 0.2 and skew > 4 * iid_skew
    max_share = _label_histograms(_all_labels(synthetic_1_1)).max(1).mean()
    assert max_share > 0.6


def test_synthetic_iid_feature_variance_decays_like_power_law():
    ds = fedprox_synthetic(iid=True, num_clients=100, seed=1)
    x = np.concatenate(ds.train.x + ds.test.x)
    assert len(x) > 10_000  # relative std of a variance estimate ~ sqrt(2 / n) < 1.5%
    j = np.arange(1, 61)
    np.testing.assert_allclose(x.var(0) / j ** -1.2, 1.0, atol=0.08)
    slope = np.polyfit(np.log(j), np.log(x.var(0)), 1)[0]
    assert abs(slope + 1.2) < 0.03


@pytest.mark.parametrize("kwargs, message", [
    (dict(alpha=-1.0), r"alpha=-1.0"), (dict(num_classes=1), r"num_classes=1"),
    (dict(max_examples=0), r"max_examples=0"), (dict(num_clients=0), r"num_clients=0"),
])
def test_synthetic_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fedprox_synthetic(**kwargs)


# ---------------------------------------------------------------------------------------------
# Digits


@pytest.fixture(scope="module")
def digits_iid():
    return digits(20, partition="iid", seed=0)


@pytest.fixture(scope="module")
def digits_dirichlet():
    return digits(20, partition="dirichlet", alpha=0.1, seed=0)


def test_digits_content(digits_iid, digits_dirichlet):
    from sklearn.datasets import load_digits
    target = load_digits().target
    for ds in (digits_iid, digits_dirichlet):
        assert ds.num_clients == 20 and ds.feature_shape == (64,) and ds.num_classes == 10
        assert ds.train.names == ds.test.names
        assert ds.train.num_examples.sum() + ds.test.num_examples.sum() == 1797
        assert ds.train.num_examples.min() >= 1
        x = np.concatenate(ds.train.x + ds.test.x)
        assert x.dtype == np.float32 and x.min() == 0.0 and x.max() == 1.0
        labels = np.concatenate(_all_labels(ds))
        np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.bincount(target))
    np.testing.assert_array_equal(digits_iid.train.num_examples, [72] * 17 + [71] * 3)
    np.testing.assert_array_equal(digits_iid.test.num_examples, [18] * 20)


def test_digits_are_read_as_scikit_learns_loader_gives_them():
    from sklearn.datasets import load_digits

    from fedjax_lab.data.digits import _load_digits
    pixels, labels = _load_digits()
    bunch = load_digits()
    np.testing.assert_array_equal(pixels, bunch.data)
    np.testing.assert_array_equal(labels, bunch.target)
    assert pixels.dtype == bunch.data.dtype and labels.dtype == bunch.target.dtype


def test_digits_dirichlet_is_skewed(digits_iid, digits_dirichlet):
    iid_skew, skew = (_mean_tv_to_pooled(_all_labels(d)) for d in (digits_iid, digits_dirichlet))
    assert skew > 0.5 and iid_skew < 0.15
    assert digits_dirichlet.name == "digits_dirichlet_0.1"
    assert digits_dirichlet.metadata["alpha"] == 0.1


def test_digits_determinism_and_errors(digits_iid):
    again = digits(20, partition="iid", seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(again.train.x, digits_iid.train.x))
    assert not np.array_equal(digits(20, seed=1).train.y[0], digits_iid.train.y[0])
    many = digits(300, partition="dirichlet", alpha=0.05, test_fraction=0.5)
    assert many.train.num_examples.min() >= 1 and many.train.names[0] == "client_000"
    with pytest.raises(ValueError, match=r"partition='pathological'; expected one of \('iid', "):
        digits(partition="pathological")
