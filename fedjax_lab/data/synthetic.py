"""FedProx's Synthetic(alpha, beta) and Synthetic-IID federated datasets.

Reference: Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, "Federated Optimization in Heterogeneous
Networks", MLSys 2020, arXiv 1812.06127; generator `data/synthetic_*/generate_synthetic.py` in
github.com/litian96/FedProx (ALGORITHMS.md section 0.1).

Device k (of N = 30) draws, with d = 60 inputs and C = 10 classes:
  n_k = floor(LogNormal(4, 2)) + 50                 (the paper says "power law"; the code is this)
  u_k ~ N(0, alpha^2),  W_k ~ N(u_k, 1)^{d x C},  b_k ~ N(u_k, 1)^C      (model heterogeneity)
  B_k ~ N(0, beta^2),   v_k ~ N(B_k, 1)^d,  x ~ N(v_k, Sigma), Sigma = diag(j^-1.2)  (input)
  y = argmax_c (x W_k + b_k)_c
Synthetic-IID shares one W, b ~ N(0, 1) across devices and sets v_k = 0.
Each device is shuffled and its first int(0.9 n_k) examples are train, the rest test.

Pitfalls: alpha and beta are standard deviations in the code (the paper writes N(0, alpha)).
alpha = beta = 0 is *not* IID: u_k = B_k = 0, but W_k, b_k and v_k are still drawn per device.
The lognormal tail gives a few devices thousands of examples; `max_examples` caps n_k (a
deviation from the paper, recorded in `metadata["deviations"]`).
"""

from __future__ import annotations

import numpy as np

from fedjax_lab.data.federated import FederatedDataset, train_test_split_per_client


def _check(name: str, value, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r}; expected {expected}")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def fedprox_synthetic(alpha: float = 1.0, beta: float = 1.0, *, iid: bool = False,
                      num_clients: int = 30, dim: int = 60, num_classes: int = 10,
                      max_examples: int | None = 1000, seed: int = 0) -> FederatedDataset:
    """Generates FedProx's Synthetic(alpha, beta), or Synthetic-IID when `iid` is True.

    Args:
      alpha: std of the per-device model prior u_k (ignored when `iid`).
      beta: std of the per-device input prior B_k (ignored when `iid`).
      iid: share one model across devices and set v_k = 0.
      num_clients: number of devices N (paper: 30).
      dim: input dimension d (paper: 60).
      num_classes: C (paper: 10).
      max_examples: cap on n_k, or None for the paper's uncapped sizes.
      seed: seeds the single `np.random.Generator` used for every draw.

    Returns:
      A `FederatedDataset` named "synthetic_iid" or f"synthetic_{alpha:g}_{beta:g}", devices named
      f"f_{k:05d}" as in the reference, x float32 [n, dim], y int32.
    """
    _check("alpha", alpha, iid or (np.isfinite(alpha) and alpha >= 0), "a finite value >= 0")
    _check("beta", beta, iid or (np.isfinite(beta) and beta >= 0), "a finite value >= 0")
    _check("num_clients", num_clients, _is_int(num_clients) and num_clients >= 1,
           "an integer >= 1")
    _check("dim", dim, _is_int(dim) and dim >= 1, "an integer >= 1")
    _check("num_classes", num_classes, _is_int(num_classes) and num_classes >= 2,
           "an integer >= 2")
    _check("max_examples", max_examples,
           max_examples is None or (_is_int(max_examples) and max_examples >= 1),
           "None or an integer >= 1")
    rng = np.random.default_rng(seed)

    sizes = rng.lognormal(4.0, 2.0, num_clients).astype(np.int64) + 50
    capped_sizes = sizes if max_examples is None else np.minimum(sizes, max_examples)
    if iid:
        v = np.zeros((num_clients, dim))
        shared_w = rng.normal(0.0, 1.0, (dim, num_classes))
        shared_b = rng.normal(0.0, 1.0, num_classes)
    else:
        model_means = rng.normal(0.0, alpha, num_clients)  # u_k: the mean of both W_k and b_k
        input_means = rng.normal(0.0, beta, num_clients)  # B_k
        v = rng.normal(input_means[:, None], 1.0, (num_clients, dim))
    # x ~ N(v_k, diag(s)) drawn as v_k + sqrt(s) * z: the same law as the reference's
    # multivariate_normal, without factorising a diagonal covariance.
    feature_std = np.arange(1, dim + 1, dtype=np.float64) ** -0.6

    xs, ys = [], []
    for k in range(num_clients):
        if iid:
            w, b = shared_w, shared_b
        else:
            w = rng.normal(model_means[k], 1.0, (dim, num_classes))
            b = rng.normal(model_means[k], 1.0, num_classes)
        x = (v[k] + feature_std * rng.standard_normal((capped_sizes[k], dim))).astype(np.float32)
        # Labels come from the stored float32 inputs so that the linear rule holds exactly on
        # the data. The reference takes argmax of softmax(x W + b); softmax is monotone.
        xs.append(x)
        ys.append(np.argmax(x @ w + b, axis=1).astype(np.int32))

    names = tuple(f"f_{k:05d}" for k in range(num_clients))
    train, test = train_test_split_per_client(xs, ys, names, 0.1, rng)
    deviations = []
    if max_examples is not None:
        num_capped = int(np.sum(sizes > capped_sizes))
        deviations.append(f"n_k capped at max_examples={max_examples} (paper: uncapped); "
                          f"{num_capped} of {num_clients} devices capped")
    metadata = {
        "alpha": None if iid else alpha, "beta": None if iid else beta, "iid": iid,
        "num_clients": num_clients, "dim": dim, "num_classes": num_classes,
        "max_examples": max_examples, "seed": seed,
        "uncapped_num_examples": sizes.tolist(), "deviations": deviations,
        "source": "Li et al., MLSys 2020, arXiv 1812.06127; litian96/FedProx generate_synthetic.py",
    }
    name = "synthetic_iid" if iid else f"synthetic_{alpha:g}_{beta:g}"
    return FederatedDataset(name, train, test, num_classes, metadata)


def leaf_synthetic(num_clients: int = 1000, num_classes: int = 5, dim: int = 60, *,
                   prob_clusters=(1.0,), test_fraction: float = 0.1,
                   seed: int = 931231) -> FederatedDataset:
    """LEAF's synthetic data set (TalwalkarLab/leaf `data/synthetic`), draw for draw.

    Reference: Caldas et al., "LEAF: A Benchmark for Federated Settings", arXiv 1812.01097;
    ALGORITHMS.md section 0.2. With s = len(prob_clusters) model clusters:
      Q ~ N(0, 1)^{(d+1) x C x s};  cluster means mu ~ N(loc, 1)^s with loc ~ N(0, 1)
      task k: n_k = min(floor(LogNormal(3, 2)) + 5, 1000); cluster ~ prob_clusters;
              B ~ N(0, 1), m ~ N(B, 1)^d, x ~ N(m, diag((i + 1)^-1.2)) with a bias 1 prepended;
              z ~ N(mu_cluster, 0.1^2)^s, w = Q z, y = label of (x w + N(0, 0.1^2) noise).
    The draws use `np.random.RandomState(seed)` in the reference's order (sizes from one
    RandomState, then the generator reseeded with the same seed), so the examples equal the
    reference's `data/all_data/data.json` for the same seed, before its train/test split.

    Pitfall reproduced, not fixed: the reference's softmax is `exp(v) / sum(exp(v))` with
    Python's `sum`, which sums over the *samples* of a task, so its label is
    argmax_c (v_ic - log sum_j exp v_jc), not argmax_c v_ic. The data set is defined by that
    code, so its labels are kept (computed stably in log space).

    Args:
      num_clients: number of tasks (LEAF's suggested call: 1000).
      num_classes: C (suggested: 5).
      dim: d (suggested: 60).
      prob_clusters: cluster probabilities (LEAF's main.py: one cluster).
      test_fraction: per-client held-out fraction (LEAF's split keeps 90 % for training).
      seed: the reference's seed (default 931231); also seeds the train/test split.

    Returns:
      A `FederatedDataset` named "leaf_synthetic", users "0", "1", ... as in LEAF.
    """
    _check("num_clients", num_clients, _is_int(num_clients) and num_clients >= 1,
           "an integer >= 1")
    _check("num_classes", num_classes, _is_int(num_classes) and num_classes >= 2,
           "an integer >= 2")
    _check("dim", dim, _is_int(dim) and dim >= 1, "an integer >= 1")
    prob_clusters = np.asarray(prob_clusters, np.float64)
    _check("prob_clusters", tuple(prob_clusters), prob_clusters.ndim == 1 and prob_clusters.size
           and (prob_clusters >= 0).all() and np.isclose(prob_clusters.sum(), 1.0),
           "non-negative probabilities summing to 1")
    sizes_rng = np.random.RandomState(seed)
    sizes = np.minimum(sizes_rng.lognormal(3, 2, num_clients).astype(int) + 5, 1000)
    rng = np.random.RandomState(seed)
    num_clusters = len(prob_clusters)
    q = rng.normal(0.0, 1.0, (dim + 1, num_classes, num_clusters))
    covariance = np.diag(np.arange(1, dim + 1, dtype=np.float64) ** -1.2)
    # RandomState.multivariate_normal draws z ~ N(0, I) and returns z @ (sqrt(s) v) + mean from
    # an SVD of the covariance; factoring once gives the same numbers without an SVD per task.
    _, singular_values, v = np.linalg.svd(covariance)
    input_factor = np.sqrt(singular_values)[:, None] * v
    cluster_means = []
    for _ in range(num_clusters):
        loc = rng.normal(0, 1.0)
        cluster_means.append(rng.normal(loc, 1.0, num_clusters))

    xs, ys = [], []
    for n in sizes:
        cluster = rng.choice(range(num_clusters), size=None, replace=True, p=prob_clusters)
        input_mean = rng.normal(rng.normal(0.0, 1.0), 1.0, dim)
        x = np.ones((n, dim + 1))
        x[:, 1:] = rng.standard_normal((n, dim)) @ input_factor + input_mean
        task_info = rng.normal(cluster_means[cluster], 0.1, num_clusters)
        logits = x @ (q @ task_info) + rng.normal(0.0, 0.1, (n, num_classes))
        column_log_sums = np.logaddexp.reduce(logits, axis=0)
        xs.append(x[:, 1:].astype(np.float32))
        ys.append(np.argmax(logits - column_log_sums, axis=1).astype(np.int32))

    names = tuple(str(k) for k in range(num_clients))
    train, test = train_test_split_per_client(xs, ys, names, test_fraction,
                                              np.random.default_rng(seed))
    metadata = {"num_clients": num_clients, "num_classes": num_classes, "dim": dim,
                "prob_clusters": prob_clusters.tolist(), "seed": seed,
                "test_fraction": test_fraction,
                "source": "Caldas et al., arXiv 1812.01097; TalwalkarLab/leaf data/synthetic",
                "deviations": ["train/test split by train_test_split_per_client, not LEAF's "
                               "split_data.py (same rule: max(1, int(0.9 n)) train examples)"]}
    return FederatedDataset("leaf_synthetic", train, test, num_classes, metadata)
