"""MNIST-1D, generated locally, partitioned into federated clients.

Reference: Greydanus & Kobak, "Scaling Down Deep Learning with MNIST-1D", ICML 2024,
arXiv 2011.14439; generator from the `mnist1d` package (github.com/greydanus/mnist1d). Each
example is one of 10 one-dimensional digit templates, padded, sheared, translated, with
correlated and iid noise, resampled to length 40. Defaults (`get_dataset_args()`): 5 000
examples, generator seed 42, 4 000 / 1 000 train / test.

Here the generator's train and test examples are pooled (5 000 by default) and partitioned into
clients, each client then split into train and test (`partitioned_dataset`), so every client's
test examples follow its own label distribution; `metadata["deviations"]` records this.

Pitfalls avoided: the package's `get_dataset` downloads a pickle from GitHub by default and only
regenerates when that fails (and then writes a pickle into the working folder); this module calls
`make_dataset(get_dataset_args())` only, which writes nothing. `make_dataset` seeds numpy's and
Python's global generators; their states are restored afterwards, so generating MNIST-1D does not
change any other code's randomness.
"""

from __future__ import annotations

import random

import numpy as np

from fedjax_lab.data.federated import FederatedDataset
from fedjax_lab.data.partitioned import PARTITIONS, partitioned_dataset


def generate_mnist1d(**generator_options) -> tuple[np.ndarray, np.ndarray]:
    """All examples of `make_dataset(get_dataset_args())`, train then test, as (x, y).

    Args:
      **generator_options: fields of `get_dataset_args()` to override (e.g. num_samples=10000,
        seed=0); an unknown field raises a ValueError naming it.

    Returns:
      x float32 [num_samples, 40], y int32 [num_samples] in [0, 10).
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
        from mnist1d.utils import ObjectView
    except ImportError:
        raise ImportError("MNIST-1D needs the mnist1d package: pip install mnist1d "
                          "(or pip install 'fedjax_lab[data]')") from None
    args = get_dataset_args(as_dict=True)
    unknown = sorted(set(generator_options) - set(args))
    if unknown:
        raise ValueError(f"mnist1d option {unknown[0]!r} is unknown; allowed: {sorted(args)}")
    args.update(generator_options)
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(ObjectView(args))
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    x = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)
    y = np.concatenate([data["y"], data["y_test"]]).astype(np.int32)
    return x, y


def mnist1d(num_clients: int = 20, *, partition: str = "iid", test_fraction: float = 0.2,
            seed: int = 0, generator_options: dict | None = None,
            **partition_options) -> FederatedDataset:
    """MNIST-1D split across `num_clients` clients.

    Args:
      num_clients: number of clients.
      partition: a key of `fedjax_lab.data.partitioned.PARTITIONS`.
      test_fraction: per-client held-out fraction in [0, 1).
      seed: seeds the partition and the per-client splits (not the generator, whose seed is
        `generator_options["seed"]`, 42 by default).
      generator_options: fields of the package's `get_dataset_args()` to override.
      **partition_options: options of the partitioner (e.g. alpha=0.1 for "dirichlet").

    Returns:
      A `FederatedDataset` named f"mnist1d_{partition}", x float32 [n, 40], y int32 in [0, 10).
    """
    if partition not in PARTITIONS:
        raise ValueError(f"partition={partition!r}; expected one of {tuple(PARTITIONS)}")
    generator_options = dict(generator_options or {})
    x, y = generate_mnist1d(**generator_options)
    metadata = {
        "generator_options": generator_options,
        "source": "mnist1d.data.make_dataset(get_dataset_args()) (Greydanus & Kobak, "
                  "arXiv 2011.14439), generated locally",
        "deviations": ["the generator's train and test examples are pooled, then partitioned "
                       "and split per client"],
    }
    return partitioned_dataset(f"mnist1d_{partition}", x, y, 10, num_clients,
                               partition=partition, seed=seed, test_fraction=test_fraction,
                               metadata=metadata, **partition_options)
