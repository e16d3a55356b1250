"""Pathological label-skew partitions: label-sorted shards, k classes per client, ways/shots.

Each returns one array of example indices per client, each in random order, from one
`np.random.default_rng(seed)` (an int seed or a Generator, advanced in place).

References:
  Shards: McMahan, Moore, Ramage, Hampson, Aguera y Arcas, "Communication-Efficient Learning of
  Deep Networks from Decentralized Data", AISTATS 2017, arXiv 1602.05629: sort by label, cut into
  2N shards, give each client 2 (MNIST: 200 shards of 300).
  k classes per client ("#C=k"): Li, Diao, Chen, He, "Federated Learning on Non-IID Data Silos:
  An Experimental Study", ICDE 2022, arXiv 2102.02079: client i holds class i mod K and k - 1
  other distinct random classes; each class is split evenly among the clients holding it.
  Ways/shots: Tan et al., "FedProto: Federated Prototype Learning across Heterogeneous Clients",
  AAAI 2022, arXiv 2105.00243: client i holds n_i ~ ways +- stdev classes with k_i ~ shots +-
  stdev examples of each.

Coverage: shards cover every example exactly once; k classes per client covers every example of
every class some client holds (all classes once N >= K); ways/shots uses only the examples it
deals out (sum_i n_i k_i), like FedProto, and never gives an example to two clients.

Pitfalls avoided: FedProto's reference takes client i's shots of a class from the fixed offset
i * 110 of the label-sorted data, which silently overlaps or runs past the class when clients or
shots grow; here each class is a shuffled pool dealt out in turn, and running out is an error
naming the class. Its MNIST shot range randint(shots - stdev + 1, shots + stdev - 1) is
asymmetric; here k_i is uniform on [shots - stdev, shots + stdev].
"""

from __future__ import annotations

import numpy as np

from fedjax_lab.data.partition import (as_labels, check_num_clients, check_positive_int,
                                       class_indices, group_by_client, sort_randomly_within)


def shard_partition(labels, num_clients: int, seed,
                    shards_per_client: int = 2) -> list[np.ndarray]:
    """McMahan et al.'s pathological non-IID split: each client gets label-sorted shards.

    The examples, sorted by label, are cut into S = num_clients * shards_per_client consecutive
    shards whose sizes differ by at most 1, and the shards are dealt to the clients at random.

    Args:
      labels: [n] integer labels.
      num_clients: N, with N * shards_per_client <= n.
      seed: int seed or `np.random.Generator`.
      shards_per_client: shards per client (McMahan et al.: 2).

    Returns:
      N disjoint index arrays covering range(n).
    """
    labels = as_labels(labels)
    check_positive_int("shards_per_client", shards_per_client)
    check_num_clients(num_clients, len(labels), shards_per_client)
    rng = np.random.default_rng(seed)
    num_shards = num_clients * shards_per_client
    order = sort_randomly_within(class_indices(labels)[1], rng)
    # Shard s holds sorted positions [ceil(s n / S), ceil((s + 1) n / S)).
    shard_of_position = np.arange(len(labels)) * num_shards // len(labels)
    client_of_shard = np.empty(num_shards, np.int64)
    client_of_shard[rng.permutation(num_shards)] = np.arange(num_shards) // shards_per_client
    owner = np.empty(len(labels), np.int64)
    owner[order] = client_of_shard[shard_of_position]
    return group_by_client(owner, num_clients, rng)


def class_partition(labels, num_clients: int, classes_per_client: int,
                    seed) -> list[np.ndarray]:
    """Each client holds `classes_per_client` classes ("#C=k" of NIID-Bench).

    Client i holds class (i mod K) and k - 1 other distinct classes drawn at random, K being the
    number of distinct labels; each class's examples (shuffled) are split among the clients that
    hold it in nearly equal pieces (sizes differ by at most 1). A class no client holds (possible
    only when N < K) is left out; a client whose classes have fewer examples than holders may get
    none of them.

    Args:
      labels: [n] integer labels (any values; the classes are the distinct values).
      num_clients: N >= 1.
      classes_per_client: k in [1, K].
      seed: int seed or `np.random.Generator`.

    Returns:
      N disjoint index arrays.
    """
    labels = as_labels(labels)
    check_num_clients(num_clients, len(labels))
    values, class_of = class_indices(labels)
    num_classes = len(values)
    if isinstance(classes_per_client, bool) or not isinstance(classes_per_client,
                                                              (int, np.integer)) \
            or not 1 <= classes_per_client <= num_classes:
        raise ValueError(f"classes_per_client={classes_per_client!r}; expected an integer in "
                         f"[1, {num_classes}] (the number of classes)")
    rng = np.random.default_rng(seed)
    # Random keys per (client, class); the forced class gets the lowest key, and the k smallest
    # keys of a row are that client's classes.
    keys = rng.random((num_clients, num_classes))
    clients = np.arange(num_clients)
    keys[clients, clients % num_classes] = -1.0
    held = np.zeros((num_clients, num_classes), bool)
    np.put_along_axis(held, np.argsort(keys, axis=1)[:, :classes_per_client], True, axis=1)

    holders = held.sum(axis=0)  # [K]
    class_sizes = np.bincount(class_of, minlength=num_classes)
    order = sort_randomly_within(class_of, rng)
    position = np.arange(len(labels)) - (np.cumsum(class_sizes) - class_sizes)[class_of[order]]
    # The holders of class c, in client order, are columns of `held`; holder r of class c takes
    # positions p with floor(p * h_c / n_c) == r.
    holder_lists = np.argsort(~held, axis=0, kind="stable")  # column c starts with c's holders
    c = class_of[order]
    kept = holders[c] > 0
    rank = position[kept] * holders[c[kept]] // class_sizes[c[kept]]
    owner = np.full(len(labels), -1, np.int64)
    owner[order[kept]] = holder_lists[rank, c[kept]]
    assigned = np.flatnonzero(owner >= 0)
    return [assigned[p] for p in group_by_client(owner[assigned], num_clients, rng)]


def ways_shots_partition(labels, num_clients: int, ways: int, shots: int, seed,
                         stdev: int = 0, classes=None) -> tuple[list[np.ndarray], list]:
    """FedProto's split: client i gets n_i classes ("ways") and k_i examples of each ("shots").

    n_i is uniform on [max(min(2, ways), ways - stdev), min(K, ways + stdev)] and the client's
    classes a uniformly random n_i-subset of the K distinct labels; k_i is uniform on
    [max(1, shots - stdev), shots + stdev]. Each class's examples are shuffled and dealt out in
    client order, so no example goes to two clients. Passing the `classes` of an earlier call
    (e.g. the train split's) gives each client the same classes, with `shots` examples of each,
    which is how FedProto draws its test split.

    Args:
      labels: [n] integer labels.
      num_clients: N >= 1.
      ways: mean number of classes per client, in [1, K].
      shots: mean examples per class per client, >= 1.
      seed: int seed or `np.random.Generator`.
      stdev: half-width of the ranges of n_i and k_i, >= 0 (FedProto: 1 or 2).
      classes: optional per-client label values to reuse; then n_i = len(classes[i]) and
        k_i = shots.

    Returns:
      (parts, classes): N disjoint index arrays, and each client's sorted label values.

    Raises:
      ValueError: naming the class whose examples run out.
    """
    labels = as_labels(labels)
    check_num_clients(num_clients, len(labels))
    values = np.unique(labels)
    if isinstance(ways, bool) or not isinstance(ways, (int, np.integer)) \
            or not 1 <= ways <= len(values):
        raise ValueError(f"ways={ways!r}; expected an integer in [1, {len(values)}] (the number "
                         "of classes)")
    check_positive_int("shots", shots)
    if isinstance(stdev, bool) or not isinstance(stdev, (int, np.integer)) or stdev < 0:
        raise ValueError(f"stdev={stdev!r}; expected an integer >= 0")
    rng = np.random.default_rng(seed)
    if classes is None:
        low, high = max(min(2, ways), ways - stdev), min(len(values), ways + stdev)
        num_ways = rng.integers(low, high + 1, num_clients)
        num_shots = rng.integers(max(1, shots - stdev), shots + stdev + 1, num_clients)
        classes = [np.sort(rng.choice(values, n, replace=False)) for n in num_ways]
    else:
        if len(classes) != num_clients:
            raise ValueError(f"classes has {len(classes)} entries; expected one per client "
                             f"({num_clients})")
        classes = [np.sort(np.asarray(c)) for c in classes]
        num_shots = np.full(num_clients, shots)
        for i, c in enumerate(classes):
            unknown = np.setdiff1d(c, values)
            if unknown.size:
                raise ValueError(f"classes[{i}] has label {int(unknown[0])}, which no example has")
    pools = {int(v): rng.permutation(np.flatnonzero(labels == v)) for v in values}
    taken = dict.fromkeys(pools, 0)
    parts = []
    for i in range(num_clients):
        mine = []
        for value in classes[i].tolist():
            start, stop = taken[value], taken[value] + int(num_shots[i])
            if stop > len(pools[value]):
                raise ValueError(f"class {value} has {len(pools[value])} examples; clients "
                                 f"0..{i} need at least {stop} (lower num_clients, ways or "
                                 "shots)")
            mine.append(pools[value][start:stop])
            taken[value] = stop
        parts.append(rng.permutation(np.concatenate(mine)) if mine
                     else np.zeros(0, np.int64))
    return parts, classes
