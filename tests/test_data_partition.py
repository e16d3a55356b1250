"""Tests for the partitioners: cover, determinism, promised skew, speed, held-out clients."""

import time

import numpy as np
import pytest

from fedjax_lab.data import (PARTITIONS, class_partition, digits, dirichlet_partition,
                             partition_examples, quantity_skew_partition, shard_partition,
                             split_clients, ways_shots_partition)


def _labels(n=6000, num_classes=10, seed=0):
    return np.random.default_rng(seed).integers(0, num_classes, n)


def _assert_exact_cover(parts, num_examples):
    everything = np.concatenate(parts)
    np.testing.assert_array_equal(np.sort(everything), np.arange(num_examples))


def _assert_same(a, b):
    assert len(a) == len(b) and all(np.array_equal(p, q) for p, q in zip(a, b))


def _entropy(parts, labels, num_classes=10):
    counts = np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])
    share = counts / counts.sum(1, keepdims=True)
    return float(-(share * np.log(np.where(share > 0, share, 1))).sum(1).mean())


def test_dirichlet_entropy_alpha_01_far_below_alpha_100_and_fast_at_scale():
    labels = _labels(100_000)
    start = time.perf_counter()
    skewed = dirichlet_partition(labels, 1000, 0.1, seed=0, min_examples_per_client=2)
    seconds = time.perf_counter() - start
    flat = dirichlet_partition(labels, 1000, 100.0, seed=0)
    _assert_exact_cover(skewed, 100_000)
    assert min(len(p) for p in skewed) >= 2
    # Measured: mean per-client label entropy 0.83 nats at alpha=0.1, 2.30 at alpha=100
    # (log 10 = 2.303 is the most a client can have).
    assert _entropy(skewed, labels) < 0.45 * _entropy(flat, labels)
    assert _entropy(flat, labels) > 0.9 * np.log(10)
    assert seconds < 10.0, f"1,000 clients at alpha=0.1 on 100,000 examples took {seconds:.1f}s"


def test_shards_cover_each_client_holds_at_most_two_labels_and_seed():
    labels = np.repeat(np.arange(10), 600)  # McMahan's MNIST shape: shards never straddle
    parts = shard_partition(labels, 100, seed=0)
    _assert_exact_cover(parts, 6000)
    assert [len(p) for p in parts] == [60] * 100
    classes = [len(np.unique(labels[p])) for p in parts]
    assert max(classes) == 2 and np.mean(classes) > 1.5
    _assert_same(parts, shard_partition(labels, 100, seed=0))
    assert not np.array_equal(parts[0], shard_partition(labels, 100, seed=1)[0])
    uneven = shard_partition(_labels(1003), 10, seed=0, shards_per_client=3)
    _assert_exact_cover(uneven, 1003)
    assert max(len(np.unique(_labels(1003)[p])) for p in uneven) <= 3 + 3  # a shard straddles <=2
    with pytest.raises(ValueError, match=r"num_clients=3001; .*2 examples per client"):
        shard_partition(labels, 3001, 0)
    with pytest.raises(ValueError, match=r"shards_per_client=0"):
        shard_partition(labels, 10, 0, shards_per_client=0)


def test_class_partition_k_classes_even_split_and_coverage():
    labels = _labels()
    parts = class_partition(labels, 30, 2, seed=0)
    _assert_exact_cover(parts, 6000)  # N >= K: every class is held (client i holds i mod 10)
    for i, p in enumerate(parts):
        assert len(np.unique(labels[p])) == 2 and i % 10 in labels[p]
    # Each class is split among its holders in pieces differing by at most one example.
    for c in range(10):
        pieces = [np.sum(labels[p] == c) for p in parts if np.any(labels[p] == c)]
        assert max(pieces) - min(pieces) <= 1 and sum(pieces) == np.sum(labels == c)
    _assert_same(parts, class_partition(labels, 30, 2, seed=0))
    few = class_partition(labels, 4, 1, seed=0)  # N < K: classes 4..9 are held by nobody
    assert [sorted(set(labels[p])) for p in few] == [[0], [1], [2], [3]]
    assert sum(len(p) for p in few) == np.isin(labels, [0, 1, 2, 3]).sum()
    with pytest.raises(ValueError, match=r"classes_per_client=11; expected .*\[1, 10\]"):
        class_partition(labels, 5, 11, 0)


def test_ways_shots_classes_shots_disjoint_and_test_reuse():
    labels = _labels(20_000)
    parts, classes = ways_shots_partition(labels, 20, ways=3, shots=20, seed=0, stdev=1)
    everything = np.concatenate(parts)
    assert len(np.unique(everything)) == len(everything)  # no example given twice
    for p, c in zip(parts, classes):
        assert 2 <= len(c) <= 4
        counts = np.bincount(labels[p], minlength=10)
        np.testing.assert_array_equal(np.flatnonzero(counts), c)
        assert len(set(counts[c])) == 1 and 19 <= counts[c][0] <= 21
    assert len({len(c) for c in classes}) > 1  # ways vary with stdev
    test_parts, test_classes = ways_shots_partition(labels, 20, 3, 15, seed=1, classes=classes)
    for p, c, tc in zip(test_parts, classes, test_classes):
        np.testing.assert_array_equal(tc, c)
        np.testing.assert_array_equal(np.bincount(labels[p], minlength=10)[c], 15)
    again, _ = ways_shots_partition(labels, 20, ways=3, shots=20, seed=0, stdev=1)
    _assert_same(parts, again)
    with pytest.raises(ValueError, match=r"class \d+ has \d+ examples; clients 0\.\.\d+ need"):
        ways_shots_partition(labels, 20, ways=10, shots=500, seed=0)
    with pytest.raises(ValueError, match=r"ways=11; expected an integer in \[1, 10\]"):
        ways_shots_partition(labels, 20, ways=11, shots=5, seed=0)


def test_quantity_skew_lognormal_sizes_and_iid_labels():
    labels = _labels(200_000)
    parts = quantity_skew_partition(200_000, 500, seed=0, sigma=1.0, min_examples_per_client=5)
    _assert_exact_cover(parts, 200_000)
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 5
    assert 0.8 < np.log(sizes).std() < 1.2  # log-sizes spread like LogNormal(0, 1)
    equal = quantity_skew_partition(200_000, 500, seed=0, sigma=0.0)
    assert np.ptp([len(p) for p in equal]) <= 1
    big = [p for p in parts if len(p) > 2000]
    assert _entropy(big, labels) > 0.99 * np.log(10)  # labels stay IID
    _assert_same(parts, quantity_skew_partition(200_000, 500, seed=0, sigma=1.0,
                                                min_examples_per_client=5))
    with pytest.raises(ValueError, match=r"sigma=-1"):
        quantity_skew_partition(100, 5, 0, sigma=-1)


def test_partition_examples_dispatch_and_errors():
    labels = _labels(1000)
    for name in PARTITIONS:
        options = {"dirichlet": {"alpha": 0.5}, "classes": {"classes_per_client": 2},
                   "ways_shots": {"ways": 2, "shots": 10}}.get(name, {})
        parts = partition_examples(labels, 20, name, 0, **options)
        assert len(parts) == 20 and all(len(p) for p in parts)
    with pytest.raises(ValueError, match=r"partition='x'; expected one of \('iid'"):
        partition_examples(labels, 20, "x", 0)
    with pytest.raises(ValueError, match=r"partition='shards': .*unexpected keyword .*'alpha'"):
        partition_examples(labels, 20, "shards", 0, alpha=0.1)


def test_digits_with_pathological_partitions():
    ds = digits(50, partition="shards", seed=0)
    assert ds.name == "digits_shards" and ds.metadata["partition"] == "shards"
    labels = [np.concatenate([a, b]) for a, b in zip(ds.train.y, ds.test.y)]
    assert max(len(np.unique(y)) for y in labels) <= 3
    assert sum(len(y) for y in labels) == 1797
    two = digits(20, partition="classes", classes_per_client=2, seed=0)
    assert all(len(np.unique(np.concatenate([a, b]))) == 2
               for a, b in zip(two.train.y, two.test.y))


def test_split_clients_holds_out_unseen_clients():
    ds = digits(20, seed=0)
    training, held_out = split_clients(ds, 0.25, seed=0)
    assert training.num_clients == 15 and held_out.num_clients == 5
    assert not set(training.train.names) & set(held_out.train.names)
    assert sorted(training.train.names + held_out.train.names) == list(ds.train.names)
    assert held_out.metadata["held_out_clients"] == list(held_out.train.names)
    i = ds.train.names.index(held_out.train.names[0])
    np.testing.assert_array_equal(held_out.train.x[0], ds.train.x[i])
    np.testing.assert_array_equal(held_out.test.y[0], ds.test.y[i])
    assert training.train.names == tuple(n for n in ds.train.names if n in training.train.names)
    again, _ = split_clients(ds, 0.25, seed=0)
    assert again.train.names == training.train.names
    assert split_clients(ds, 0.25, seed=1)[1].train.names != held_out.train.names
    assert split_clients(ds, 0.01, seed=0)[1].num_clients == 1
    with pytest.raises(ValueError, match=r"held_out_fraction=1.0; expected a value in \(0, 1\)"):
        split_clients(ds, 1.0, 0)
