"""scikit-learn's 8x8 handwritten digits, partitioned into federated clients.

Source: the UCI "Optical Recognition of Handwritten Digits" test set as packaged by
scikit-learn (`sklearn.datasets.load_digits`, no download): 1797 images, 8x8 pixels with values
0-16, 10 classes. Pixels are scaled to [0, 1] and flattened to 64 features.

Partitions (`fedjax_lab.data.partitioned.PARTITIONS`): "iid" (uniform split, sizes differ by at
most 1), "dirichlet" (label skew q_c ~ Dir(alpha * 1_N) per class; Hsu et al. 2019, arXiv
1909.06335), and the pathological and quantity-skew partitions. Each client is then split into
train and test with `train_test_split_per_client`; the test split of a client follows that
client's own label distribution, which is what a personalised algorithm is evaluated on.

Pitfall: with few examples per client the per-client test split is tiny; every client keeps at
least one train example (so it can take part in training) and the Dirichlet partition gives each
client at least two examples, so that each client can also have a test example.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

from fedjax_lab.data.federated import FederatedDataset
from fedjax_lab.data.partitioned import PARTITIONS, partitioned_dataset


def digits(num_clients: int = 20, *, partition: str = "iid", alpha: float = 0.5,
           test_fraction: float = 0.2, seed: int = 0, **partition_options) -> FederatedDataset:
    """The 1797 sklearn digits split across `num_clients` clients.

    Args:
      num_clients: number of clients, in [1, 1797] ("iid") or [1, 898] ("dirichlet", which
        guarantees two examples per client).
      partition: a key of `fedjax_lab.data.partitioned.PARTITIONS` ("iid", "dirichlet",
        "shards", "classes", "ways_shots", "quantity").
      alpha: Dirichlet concentration (used only by "dirichlet"); smaller is more skewed.
      test_fraction: per-client held-out fraction in [0, 1); each client keeps
        max(1, int((1 - test_fraction) * n_i)) train examples.
      seed: seeds one `np.random.Generator` for the partition and the splits.
      **partition_options: further options of the partitioner (e.g. shards_per_client=2,
        classes_per_client=2, ways=3, shots=20, stdev=1, sigma=1.0).

    Returns:
      A `FederatedDataset` named "digits_iid", f"digits_dirichlet_{alpha:g}" or
      f"digits_{partition}", clients named "client_000", ...; x float32 [n, 64] in [0, 1],
      y int32 in [0, 10).
    """
    if partition not in PARTITIONS:
        raise ValueError(f"partition={partition!r}; expected one of {tuple(PARTITIONS)}")
    pixels, labels = _load_digits()
    x = (pixels / 16.0).astype(np.float32)
    y = labels.astype(np.int32)
    if partition == "dirichlet":
        partition_options = {"alpha": alpha, "min_examples_per_client": 2, **partition_options}
        name = f"digits_dirichlet_{alpha:g}"
    else:
        name = f"digits_{partition}"
    metadata = {
        "alpha": alpha if partition == "dirichlet" else None,
        "source": "sklearn.datasets.load_digits (UCI optical digits, 1797 images, 8x8, 0-16)",
        "deviations": [],
    }
    return partitioned_dataset(name, x, y, 10, num_clients, partition=partition, seed=seed,
                               test_fraction=test_fraction, metadata=metadata,
                               **partition_options)


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(pixels [1797, 64], labels [1797]) as `sklearn.datasets.load_digits` gives them, read
    from the file it reads: importing scikit-learn took 0.9-2.1 s of every run's start-up."""
    spec = importlib.util.find_spec("sklearn")
    path = (os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
            if spec is not None and spec.submodule_search_locations else None)
    if path is None or not os.path.exists(path):
        from sklearn.datasets import load_digits  # a scikit-learn that keeps it elsewhere

        bunch = load_digits()
        return bunch.data, bunch.target
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1], table[:, -1].astype(int)
