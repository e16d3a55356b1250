"""A centralised labelled data set split into a `FederatedDataset` by a named partition.

`partition_examples` dispatches to the partitioners of `partition.py` and `pathological.py` by
name, so data sets (digits, MNIST-1D, a user's own numpy arrays) offer all of them through one
`partition=` argument; `partitioned_dataset` then splits each client into train and test with
`train_test_split_per_client`, so a client's test examples follow its own label distribution
(what a personalised algorithm is scored on).

The partition and the per-client splits draw from one `np.random.default_rng(seed)`, so the
data set is a deterministic function of its arguments.
"""

from __future__ import annotations

import numpy as np

from fedjax_lab.data.federated import FederatedDataset, train_test_split_per_client
from fedjax_lab.data.partition import dirichlet_partition, iid_partition, quantity_skew_partition
from fedjax_lab.data.pathological import class_partition, shard_partition, ways_shots_partition

PARTITIONS = {
    "iid": "uniformly random, sizes differ by at most 1",
    "dirichlet": "label skew q_c ~ Dir(alpha 1_N) per class (options: alpha, "
                 "min_examples_per_client)",
    "shards": "label-sorted shards, shards_per_client each (McMahan et al.; default 2)",
    "classes": "classes_per_client classes each (NIID-Bench #C=k)",
    "ways_shots": "FedProto's ways +- stdev classes with shots +- stdev examples each",
    "quantity": "IID labels, lognormal sizes (options: sigma, min_examples_per_client)",
}
# The options each partitioner takes besides labels, num_clients and seed (the data registry's
# configs refuse an option that the chosen partition would ignore).
PARTITION_OPTIONS = {
    "iid": (),
    "dirichlet": ("alpha", "min_examples_per_client"),
    "shards": ("shards_per_client",),
    "classes": ("classes_per_client",),
    "ways_shots": ("ways", "shots", "stdev"),
    "quantity": ("sigma", "min_examples_per_client"),
}


def partition_examples(labels: np.ndarray, num_clients: int, partition: str, seed,
                       **options) -> list[np.ndarray]:
    """Index arrays per client from the partitioner `partition` (a key of `PARTITIONS`).

    `options` go to the partitioner (e.g. alpha=0.1, shards_per_client=2, classes_per_client=3,
    ways=3, shots=20, stdev=1, sigma=1.0); an unknown option raises a ValueError naming it.
    """
    labels = np.asarray(labels)
    partitioners = {
        "iid": lambda: iid_partition(len(labels), num_clients, seed, **options),
        "dirichlet": lambda: dirichlet_partition(labels, num_clients, seed=seed, **options),
        "shards": lambda: shard_partition(labels, num_clients, seed, **options),
        "classes": lambda: class_partition(labels, num_clients, seed=seed, **options),
        "ways_shots": lambda: ways_shots_partition(labels, num_clients, seed=seed, **options)[0],
        "quantity": lambda: quantity_skew_partition(len(labels), num_clients, seed, **options),
    }
    if partition not in partitioners:
        raise ValueError(f"partition={partition!r}; expected one of {tuple(PARTITIONS)}")
    try:
        return partitioners[partition]()
    except TypeError as error:  # an option the partitioner does not take, or one it needs
        raise ValueError(f"partition={partition!r}: {error}; its options: "
                         f"{PARTITIONS[partition]}") from None


def client_names(num_clients: int) -> tuple[str, ...]:
    """"client_000", "client_001", ... with at least three digits."""
    width = max(3, len(str(num_clients - 1)))
    return tuple(f"client_{i:0{width}d}" for i in range(num_clients))


def partitioned_dataset(name: str, x: np.ndarray, y: np.ndarray, num_classes: int,
                        num_clients: int, *, partition: str = "iid", seed=0,
                        test_fraction: float = 0.2, metadata: dict | None = None,
                        **options) -> FederatedDataset:
    """Partitions labelled examples into clients, then splits each client into train and test.

    Args:
      name: the data set's name.
      x: [n, *feature_shape] examples; y: [n] integer labels in [0, num_classes).
      num_classes: number of classes.
      num_clients: number of clients.
      partition: a key of `PARTITIONS`; `options` go to its partitioner.
      seed: int seed or `np.random.Generator`, used for the partition and then the splits.
      test_fraction: per-client held-out fraction in [0, 1) (see `train_test_split_per_client`).
      metadata: extra metadata; "partition", "partition_options", "num_clients",
        "test_fraction" and "seed" are added.

    Returns:
      A `FederatedDataset` with clients "client_000", ...
    """
    x, y = np.asarray(x), np.asarray(y)
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} examples and y has {len(y)}; expected the same")
    rng = np.random.default_rng(seed)
    parts = partition_examples(y, num_clients, partition, rng, **options)
    names = client_names(num_clients)
    train, test = train_test_split_per_client([x[p] for p in parts], [y[p] for p in parts],
                                              names, test_fraction, rng)
    metadata = {**(metadata or {}), "partition": partition, "partition_options": options,
                "num_clients": num_clients, "test_fraction": test_fraction,
                "seed": seed if isinstance(seed, (int, np.integer)) else None}
    return FederatedDataset(name, train, test, num_classes, metadata)
