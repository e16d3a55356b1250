"""Partitions of a centralised dataset into clients: IID and Dirichlet label skew.

Both return one array of example indices per client; together they use every index exactly once,
and each client's indices come in random order. Randomness comes from one
`np.random.default_rng(seed)` (an int seed or a Generator, which is advanced in place), so a
partition is a deterministic function of its arguments.

References:
  Dirichlet label skew: Hsu, Qi, Brown, "Measuring the Effects of Non-Identical Data
  Distribution for Federated Visual Classification", arXiv 1909.06335 (2019): for each class,
  the class's examples are split among the N clients in proportions q ~ Dir(alpha * 1_N).
  Small alpha gives clients few classes each; alpha -> infinity approaches the IID split.

Pitfall (why `dirichlet_partition` repairs instead of redrawing): common code (e.g. NIID-Bench)
redraws all proportions until every client has a minimum number of examples. At small alpha with
many clients almost every draw leaves some client empty, so that loop can run for a very long
time. Here one draw is made and then repaired, which always terminates (see the function).
"""

from __future__ import annotations

import numpy as np


def _check_num_clients(num_clients: int, num_examples: int, per_client: int = 1) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) \
            or not 1 <= num_clients * per_client <= num_examples:
        raise ValueError(f"num_clients={num_clients!r}; expected an integer in "
                         f"[1, {num_examples // per_client}] for {num_examples} examples"
                         + (f" and {per_client} examples per client" if per_client > 1 else ""))


def _group_by_client(owner: np.ndarray, num_clients: int, rng: np.random.Generator):
    """Index arrays per client, each in random order; also each example's rank in its client."""
    shuffled = rng.permutation(len(owner))
    by_client = shuffled[np.argsort(owner[shuffled], kind="stable")]
    sizes = np.bincount(owner, minlength=num_clients)
    starts = np.cumsum(sizes) - sizes
    rank = np.empty(len(owner), np.int64)
    rank[by_client] = np.arange(len(owner)) - starts[owner[by_client]]
    return np.split(by_client, np.cumsum(sizes)[:-1]), rank


def iid_partition(num_examples: int, num_clients: int, seed) -> list[np.ndarray]:
    """Uniformly random split into `num_clients` parts whose sizes differ by at most 1."""
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)) \
            or num_examples < 1:
        raise ValueError(f"num_examples={num_examples!r}; expected an integer >= 1")
    _check_num_clients(num_clients, num_examples)
    return np.array_split(np.random.default_rng(seed).permutation(num_examples), num_clients)


def dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float, seed,
                        min_examples_per_client: int = 2) -> list[np.ndarray]:
    """Dirichlet label-skew partition (Hsu et al. 2019) that cannot stall.

    For each class c, its examples (shuffled) are cut into N consecutive pieces of sizes
    floor(cumsum(q_c) * n_c) differences, q_c ~ Dir(alpha * 1_N). Then every client below
    `min_examples_per_client` is topped up to exactly that minimum with examples taken from the
    largest clients (water-filling from the top: the donors' sizes are lowered towards a common
    level, and no donor drops below the minimum). At most N * min_examples_per_client examples
    move, and each donor gives away a random subset of its own examples, so the label skew of
    the draw is kept. This always succeeds when N * min_examples_per_client <= len(labels);
    otherwise a ValueError is raised up front.

    Args:
      labels: [n] integer class labels (any integer values; classes are the distinct values).
      num_clients: N >= 1.
      alpha: Dirichlet concentration > 0.
      seed: int seed or `np.random.Generator`.
      min_examples_per_client: >= 0.

    Returns:
      N index arrays into `labels`, disjoint and covering, each in random order.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels has shape {labels.shape} and dtype {labels.dtype}; expected a "
                         "non-empty 1-D integer array")
    if isinstance(min_examples_per_client, bool) \
            or not isinstance(min_examples_per_client, (int, np.integer)) \
            or min_examples_per_client < 0:
        raise ValueError(f"min_examples_per_client={min_examples_per_client!r}; expected an "
                         "integer >= 0")
    _check_num_clients(num_clients, len(labels), max(min_examples_per_client, 1))
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha={alpha!r}; expected a finite value > 0")
    rng = np.random.default_rng(seed)
    num_examples = len(labels)

    _, class_of = np.unique(labels, return_inverse=True)
    class_sizes = np.bincount(class_of)
    class_starts = np.cumsum(class_sizes) - class_sizes
    proportions = rng.dirichlet(np.full(num_clients, float(alpha)), size=len(class_sizes))
    cuts = np.floor(np.cumsum(proportions, axis=1) * class_sizes[:, None]).astype(np.int64)
    cuts[:, -1] = class_sizes  # the float cumsum may end just below 1
    # Examples sorted by class (random order within a class); flattening the per-class cut
    # points, offset by each class's start, gives one sorted array, so one searchsorted assigns
    # every example at once: position p of class c goes to the client whose piece contains it.
    by_class = rng.permutation(num_examples)
    by_class = by_class[np.argsort(class_of[by_class], kind="stable")]
    flat_cuts = (cuts + class_starts[:, None]).ravel()
    positions = np.arange(num_examples)
    owner = np.empty(num_examples, np.int64)
    owner[by_class] = (np.searchsorted(flat_cuts, positions, side="right")
                       - class_of[by_class] * num_clients)

    deficit = np.maximum(min_examples_per_client - np.bincount(owner, minlength=num_clients), 0)
    if deficit.any():
        _, rank = _group_by_client(owner, num_clients, rng)
        # The examples with the highest within-client rank belong to the largest clients; giving
        # those away first lowers the largest clients to a common level. A donor of size n gives
        # ranks >= its new size only, and feasibility (checked above) keeps every donor at or
        # above the minimum. Random keys break ties between equally large clients.
        donors = np.lexsort((rng.random(num_examples), -rank))[:deficit.sum()]
        owner[donors] = np.repeat(np.arange(num_clients), deficit)
    parts, _ = _group_by_client(owner, num_clients, rng)
    return parts
