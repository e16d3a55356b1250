"""Host-side containers for federated data: ragged clients and their padded, stacked form.

A federated dataset is a list of clients of different sizes. It lives on the host as ragged numpy
arrays (`ClientData`) and is handed to jitted round functions as one stacked array per field,
padded to a common `n_max` with a boolean sample mask (`PaddedClients`): under `vmap` every client
must have the same shape, and padded examples carry zero loss weight (see ALGORITHMS.md, "JAX
conventions").

`FederatedDataset` pairs a train and a per-client test split over the same clients, as the LEAF
benchmarks and the FedProx generator do (Caldas et al. 2018, arXiv 1812.01097; Li et al., MLSys
2020, arXiv 1812.06127).

Pitfall: padded slots hold x = 0, y = 0, which is a valid label; always weight losses and metrics
by `mask`, never by `y`.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import numpy as np

from fedjax_lab.core.losses import IGNORE_LABEL
from fedjax_lab.core.types import DataInfo


class PaddedClients(NamedTuple):
    """All clients of a `ClientData`, stacked and padded to a common `n_max`."""

    x: np.ndarray  # [num_clients, n_max, *feature_shape] float32, padded slots 0
    y: np.ndarray  # [num_clients, n_max, *label_shape] int32, padded slots 0
    mask: np.ndarray  # [num_clients, n_max] bool, True for real examples
    num_examples: np.ndarray  # [num_clients] int32


def _client(i: int, name: str) -> str:
    return f"client {i} ({name!r})"


# eq=False: the generated __eq__ would compare tuples of arrays and raise "truth value of an array
# is ambiguous"; identity comparison is the honest default for containers of arrays.
@dataclasses.dataclass(frozen=True, eq=False)
class ClientData:
    """Ragged per-client examples held on the host.

    Client i holds `x[i]` with shape [n_i, *feature_shape] (float32) and labels `y[i]` with shape
    [n_i, *label_shape] (int32); `names[i]` is its id. `label_shape` is () for classification and
    (T,) for next-token prediction, where a target of `IGNORE_LABEL` counts in no loss or metric.
    Clients with n_i = 0 are allowed. Inputs are converted to tuples of float32 / int32 arrays;
    labels must already have an integer dtype, so that float labels (a common sign of swapped
    arguments) are rejected rather than truncated.
    """

    x: tuple[np.ndarray, ...]
    y: tuple[np.ndarray, ...]
    names: tuple[str, ...]

    def __post_init__(self):
        if not len(self.x) == len(self.y) == len(self.names):
            raise ValueError(
                f"ClientData: got {len(self.x)} x arrays, {len(self.y)} y arrays and "
                f"{len(self.names)} names; expected one of each per client")
        if not self.names:
            raise ValueError("ClientData: got 0 clients; expected at least 1")
        xs, ys = [], []
        for i, (x_i, y_i, name) in enumerate(zip(self.x, self.y, self.names)):
            x_i, y_i = np.asarray(x_i), np.asarray(y_i)
            if not isinstance(name, str):
                raise ValueError(f"ClientData: {_client(i, name)} name has type "
                                 f"{type(name).__name__}; expected str")
            # An empty label array has nothing to truncate, so np.array([]) (float64) is fine.
            if y_i.ndim < 1 or (y_i.size and not np.issubdtype(y_i.dtype, np.integer)):
                raise ValueError(f"ClientData: {_client(i, name)} y has shape {y_i.shape} and "
                                 f"dtype {y_i.dtype}; expected integer labels [n_i] or "
                                 "[n_i, *label_shape]")
            if x_i.ndim < 1 or x_i.shape[0] != y_i.shape[0]:
                raise ValueError(f"ClientData: {_client(i, name)} x has shape {x_i.shape}; "
                                 f"expected first dim {y_i.shape[0]} to match y")
            if xs and x_i.shape[1:] != xs[0].shape[1:]:
                raise ValueError(f"ClientData: {_client(i, name)} x has feature shape "
                                 f"{x_i.shape[1:]}; expected {xs[0].shape[1:]} as client 0")
            if ys and y_i.shape[1:] != ys[0].shape[1:]:
                raise ValueError(f"ClientData: {_client(i, name)} y has label shape "
                                 f"{y_i.shape[1:]}; expected {ys[0].shape[1:]} as client 0")
            xs.append(x_i.astype(np.float32, copy=False))
            ys.append(y_i.astype(np.int32, copy=False))
        object.__setattr__(self, "x", tuple(xs))
        object.__setattr__(self, "y", tuple(ys))
        object.__setattr__(self, "names", tuple(self.names))

    @property
    def num_clients(self) -> int:
        return len(self.names)

    @property
    def num_examples(self) -> np.ndarray:
        return np.array([len(y_i) for y_i in self.y], dtype=np.int64)

    @property
    def feature_shape(self) -> tuple:
        return tuple(self.x[0].shape[1:])

    @property
    def label_shape(self) -> tuple:
        """() for one label per example, (T,) for a sequence of next-token targets."""
        return tuple(self.y[0].shape[1:])

    def pad(self, multiple_of: int = 1) -> PaddedClients:
        """Stacks all clients, padding to n_max = max n_i rounded up to `multiple_of`.

        Rounding n_max up (e.g. to the local batch size) keeps shapes stable across datasets and
        lets a batch loop use a fixed trip count; n_max is at least `multiple_of`, so an all-empty
        dataset still yields a non-empty axis.
        """
        if isinstance(multiple_of, bool) or not isinstance(multiple_of, (int, np.integer)) \
                or multiple_of < 1:
            raise ValueError(f"multiple_of={multiple_of!r}; expected an integer >= 1")
        sizes = self.num_examples
        n_max = max(-(-int(sizes.max()) // multiple_of), 1) * multiple_of
        x = np.zeros((self.num_clients, n_max, *self.feature_shape), np.float32)
        y = np.zeros((self.num_clients, n_max, *self.label_shape), np.int32)
        for i, (x_i, y_i) in enumerate(zip(self.x, self.y)):
            x[i, :len(y_i)] = x_i
            y[i, :len(y_i)] = y_i
        mask = np.arange(n_max)[None, :] < sizes[:, None]
        return PaddedClients(x, y, mask, sizes.astype(np.int32))

    def select(self, client_indices: Sequence[int] | np.ndarray) -> ClientData:
        """The clients at `client_indices`, in that order (repeats allowed)."""
        indices = np.asarray(client_indices)
        if indices.ndim != 1 or not (indices.size == 0 or np.issubdtype(indices.dtype, np.integer)):
            raise ValueError(f"client_indices has shape {indices.shape} and dtype {indices.dtype}; "
                             "expected a 1-D sequence of integers")
        bad = indices[(indices < 0) | (indices >= self.num_clients)]
        if bad.size:
            raise ValueError(f"client_indices contains {int(bad[0])}; expected values in "
                             f"[0, {self.num_clients})")
        return ClientData(tuple(self.x[i] for i in indices), tuple(self.y[i] for i in indices),
                          tuple(self.names[i] for i in indices))


@dataclasses.dataclass(frozen=True, eq=False)
class FederatedDataset:
    """A train split and a per-client held-out test split over the same clients."""

    name: str
    train: ClientData
    test: ClientData
    num_classes: int
    metadata: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.train.names != self.test.names:
            if self.train.num_clients != self.test.num_clients:
                raise ValueError(f"FederatedDataset {self.name!r}: train has "
                                 f"{self.train.num_clients} clients, test has "
                                 f"{self.test.num_clients}; expected the same clients")
            i = next(i for i, (a, b) in enumerate(zip(self.train.names, self.test.names))
                     if a != b)
            raise ValueError(f"FederatedDataset {self.name!r}: client {i} is "
                             f"{self.train.names[i]!r} in train but {self.test.names[i]!r} in "
                             "test; expected the same names in the same order")
        for shape in ("feature_shape", "label_shape"):
            if getattr(self.train, shape) != getattr(self.test, shape):
                raise ValueError(f"FederatedDataset {self.name!r}: test {shape.replace('_', ' ')} "
                                 f"{getattr(self.test, shape)}; expected "
                                 f"{getattr(self.train, shape)} as train")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes,
                                                                (int, np.integer)) \
                or self.num_classes < 2:
            raise ValueError(f"FederatedDataset {self.name!r}: num_classes={self.num_classes!r}; "
                             "expected an integer >= 2")
        # Only sequence targets may be ignored: a classification example always has its label.
        ignorable = IGNORE_LABEL if self.train.label_shape else 0
        for split, data in (("train", self.train), ("test", self.test)):
            for i, (y_i, name) in enumerate(zip(data.y, data.names)):
                bad = y_i[((y_i < 0) & (y_i != ignorable)) | (y_i >= self.num_classes)]
                if bad.size:
                    ignored = f" or {IGNORE_LABEL} (ignored)" if self.train.label_shape else ""
                    raise ValueError(f"FederatedDataset {self.name!r}: {split} {_client(i, name)} "
                                     f"has label {int(bad[0])}; expected labels in "
                                     f"[0, {self.num_classes}){ignored}")

    @property
    def num_clients(self) -> int:
        return self.train.num_clients

    @property
    def feature_shape(self) -> tuple:
        return self.train.feature_shape

    def info(self) -> DataInfo:
        """What an algorithm's builder may know of this data set before it sees a batch."""
        return DataInfo(num_clients=self.num_clients, num_classes=int(self.num_classes),
                        feature_shape=tuple(self.feature_shape),
                        max_examples=int(self.train.num_examples.max(initial=1)),
                        label_shape=self.train.label_shape)


def train_test_split_per_client(x_list, y_list, names, test_fraction: float,
                                rng) -> tuple[ClientData, ClientData]:
    """Shuffles each client, then keeps the first int((1 - test_fraction) * n) examples as train.

    With test_fraction = 0.1 this is the FedProx generator's rule (first int(0.9 n) train, rest
    test; 1 - 0.1 == 0.9 exactly in float64). Every non-empty client keeps at least one train
    example (LEAF's max(1, ...) rule), so a tiny client may have an empty test split.

    Args:
      x_list, y_list, names: per-client features, integer labels and ids.
      test_fraction: in [0, 1).
      rng: a `np.random.Generator` (advanced in place) or an int seed.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r}; expected a value in [0, 1)")
    rng = np.random.default_rng(rng)
    x_train, y_train, x_test, y_test = [], [], [], []
    for x_i, y_i in zip(x_list, y_list):
        x_i, y_i = np.asarray(x_i), np.asarray(y_i)
        order = rng.permutation(len(y_i))
        n_train = min(len(y_i), max(1, int((1.0 - test_fraction) * len(y_i))))
        train, test = order[:n_train], order[n_train:]
        x_train.append(x_i[train])
        y_train.append(y_i[train])
        x_test.append(x_i[test])
        y_test.append(y_i[test])
    return (ClientData(tuple(x_train), tuple(y_train), tuple(names)),
            ClientData(tuple(x_test), tuple(y_test), tuple(names)))


def split_clients(dataset: FederatedDataset, held_out_fraction: float,
                  seed) -> tuple[FederatedDataset, FederatedDataset]:
    """Splits the clients into training clients and held-out (unseen) clients.

    The held-out clients never take part in training; a personalised or meta-learning algorithm
    is then scored on how well it adapts to them (e.g. fine-tune on a held-out client's train
    split, evaluate on its test split), which is the LEAF "-t user" protocol (Caldas et al.,
    arXiv 1812.01097) applied to any data set. Each client keeps its own train/test split; the
    two returned data sets share no client, and each keeps the original client order.

    Args:
      dataset: the data set to split.
      held_out_fraction: in (0, 1); round(fraction * N) clients are held out, at least 1 and at
        most N - 1.
      seed: int seed or `np.random.Generator` choosing the held-out clients uniformly.

    Returns:
      (training_clients, held_out_clients), named f"{name}/training_clients" and
      f"{name}/held_out_clients"; each metadata adds "held_out_clients" (the held-out names).
    """
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction={held_out_fraction!r}; expected a value in (0, 1)")
    if dataset.num_clients < 2:
        raise ValueError(f"FederatedDataset {dataset.name!r} has {dataset.num_clients} client; "
                         "holding clients out needs at least 2")
    num_held_out = min(max(round(held_out_fraction * dataset.num_clients), 1),
                       dataset.num_clients - 1)
    chosen = np.random.default_rng(seed).choice(dataset.num_clients, num_held_out, replace=False)
    held_out = np.zeros(dataset.num_clients, bool)
    held_out[chosen] = True
    names = [dataset.train.names[i] for i in np.flatnonzero(held_out)]
    metadata = {**dataset.metadata, "held_out_clients": names,
                "held_out_fraction": held_out_fraction}

    def subset(keep: np.ndarray, suffix: str) -> FederatedDataset:
        ids = np.flatnonzero(keep)
        return FederatedDataset(f"{dataset.name}/{suffix}", dataset.train.select(ids),
                                dataset.test.select(ids), dataset.num_classes, metadata)

    return subset(~held_out, "training_clients"), subset(held_out, "held_out_clients")
