"""The host-fed client stream: cohorts gathered from host memory, prefetched on a thread.

A population that fits on the device is padded once, placed there, and each round samples and
gathers its cohort inside the compiled scan (`compiled.device_block`). A larger one (a
million clients, or long padded clients) stays on the host as flat ragged arrays
(`PackedClients`: no padding, no copy of the examples); `HostCohortStream` draws the same
cohorts with `cohort_schedule`, gathers and pads only the cohort's rows to the population's
padded length, attaches the same `client_key(key, round, id)` keys and moves the result to the
device, one block of rounds ahead of the consumer on a background thread. For any seed and round
the batch is identical, field for field, to the in-scan `cohort_batch(population.pad(), ...)`.

Pitfalls avoided: padding the whole population (1e6 clients x n_max x features) is what runs out
of memory, so only cohorts are padded; the padded length is the population's, not the cohort's,
so shapes (and the compiled round) never change between rounds; a worker exception is re-raised
in the consumer instead of leaving it waiting on an empty queue, and closing the iterator stops
the worker.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator, NamedTuple

import jax
import numpy as np

from fedjax_lab.core.types import ClientBatch, client_keys
from fedjax_lab.data.federated import ClientData
from fedjax_lab.data.sampling import check_cohort_size, check_probabilities, cohort_schedule


class PackedClients(NamedTuple):
    """Ragged clients as flat arrays: client i owns rows `index[offsets[i]:offsets[i + 1]]`."""

    x: np.ndarray  # [n, *feature_shape] float32, the examples in any order
    y: np.ndarray  # [n, *label_shape] int32
    index: np.ndarray  # [total] int64 rows of x and y, client after client
    offsets: np.ndarray  # [num_clients + 1] int64, offsets[0] = 0

    @property
    def num_clients(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_examples(self) -> np.ndarray:
        return np.diff(self.offsets)

    def padded_length(self, multiple_of: int = 1) -> int:
        """n_max of `ClientData.pad(multiple_of)`: max n_i rounded up, at least `multiple_of`."""
        return max(-(-int(self.num_examples.max()) // multiple_of), 1) * multiple_of

    def gather(self, client_ids: np.ndarray, padded_length: int):
        """(x, y, mask, num_examples) of `client_ids` `[C]`, padded as `ClientData.pad` pads."""
        sizes = self.num_examples[client_ids]
        slots = np.arange(padded_length)
        mask = slots[None, :] < sizes[:, None]
        if not self.index.size:  # no client has an example: nothing to gather
            return (np.zeros(mask.shape + self.x.shape[1:], np.float32),
                    np.zeros(mask.shape + self.y.shape[1:], np.int32), mask,
                    sizes.astype(np.int32))
        rows = self.index[np.where(mask, self.offsets[client_ids][:, None] + slots, 0)]
        x = np.where(mask.reshape(mask.shape + (1,) * (self.x.ndim - 1)), self.x[rows], 0)
        y = np.where(mask.reshape(mask.shape + (1,) * (self.y.ndim - 1)), self.y[rows], 0)
        return x.astype(np.float32), y.astype(np.int32), mask, sizes.astype(np.int32)


def pack_clients(clients: ClientData) -> PackedClients:
    """The clients of a `ClientData` as one flat copy."""
    sizes = clients.num_examples
    x = np.concatenate(clients.x) if sizes.sum() else np.zeros((0, *clients.feature_shape))
    return PackedClients(x.astype(np.float32, copy=False),
                         np.concatenate(clients.y).astype(np.int32, copy=False),
                         np.arange(int(sizes.sum())), np.concatenate([[0], np.cumsum(sizes)]))


def pack_partition(x: np.ndarray, y: np.ndarray, parts) -> PackedClients:
    """Clients `parts` (index arrays, e.g. from a partitioner) of `x`, `y` without copying them."""
    x, y = np.asarray(x), np.asarray(y)
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} examples and y has {len(y)}; expected the same")
    sizes = np.array([len(p) for p in parts], np.int64)
    index = np.concatenate(parts).astype(np.int64) if len(parts) else np.zeros(0, np.int64)
    if index.size and (index.min() < 0 or index.max() >= len(y)):
        raise ValueError(f"parts index example {int(index.max())}; x and y hold {len(y)}")
    return PackedClients(x, y.astype(np.int32, copy=False), index,
                         np.concatenate([[0], np.cumsum(sizes)]))


@jax.jit
def _block_keys(key, rounds, client_ids):
    return jax.vmap(client_keys, in_axes=(None, 0, 0))(key, rounds, client_ids)


class HostCohortStream:
    """Rounds' `ClientBatch`es gathered on the host, the same as the in-scan path draws.

    Args:
        clients: a `ClientData` (packed once) or `PackedClients`.
        key: the experiment key.
        cohort_size: clients per round, K.
        probabilities: optional `[num_clients]` sampling weights, as for `sample_cohort`.
        cohorts: optional schedule drawn instead of `sample_cohort` (`Algorithm.cohorts`).
        multiple_of: pad to the population's n_max rounded up to this (as `ClientData.pad`).
        prefetch: blocks prepared ahead of the consumer, >= 1.
    """

    def __init__(self, clients: ClientData | PackedClients, key: jax.Array, cohort_size: int, *,
                 probabilities=None, cohorts=None, multiple_of: int = 1, prefetch: int = 2):
        self.clients = clients if isinstance(clients, PackedClients) else pack_clients(clients)
        check_cohort_size(cohort_size, self.clients.num_clients)
        check_probabilities(probabilities, self.clients.num_clients, cohort_size)
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 1:
            raise ValueError(f"prefetch={prefetch!r}; expected an integer >= 1")
        self.key, self.cohort_size, self.prefetch = key, cohort_size, prefetch
        self.probabilities, self.cohorts = probabilities, cohorts
        self.padded_length = self.clients.padded_length(multiple_of)

    def block(self, start_round: int, num_rounds: int) -> ClientBatch:
        """Rounds start_round.. stacked: every field `[num_rounds, K, ...]`, on the device."""
        ids = cohort_schedule(self.key, num_rounds, self.clients.num_clients, self.cohort_size,
                              start_round=start_round, probabilities=self.probabilities,
                              cohorts=self.cohorts)
        x, y, mask, sizes = self.clients.gather(ids.ravel(), self.padded_length)
        shape = ids.shape
        rounds = np.arange(start_round, start_round + num_rounds, dtype=np.int32)
        batch = ClientBatch(x=x.reshape(shape + x.shape[1:]), y=y.reshape(shape + y.shape[1:]),
                            mask=mask.reshape(shape + mask.shape[1:]),
                            num_examples=sizes.reshape(shape), client_ids=ids,
                            rng=_block_keys(self.key, rounds, ids))
        return jax.device_put(batch)

    def blocks(self, start_round: int, num_rounds: int,
               block_size: int) -> Iterator[ClientBatch]:
        """Consecutive blocks of `block_size` rounds (the last may be shorter), prefetched."""
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size={block_size!r}; expected an integer >= 1")
        starts = range(start_round, start_round + num_rounds, block_size)
        lengths = [min(block_size, start_round + num_rounds - s) for s in starts]
        return _prefetched(lambda args: self.block(*args), zip(starts, lengths), self.prefetch)

    def rounds(self, start_round: int, num_rounds: int) -> Iterator[ClientBatch]:
        """One `[K, ...]` batch per round, prefetched."""
        unstack = lambda block: jax.tree.map(lambda leaf: leaf[0], block)
        return (unstack(block) for block in self.blocks(start_round, num_rounds, 1))


def _prefetched(produce: Callable, items, depth: int) -> Iterator:
    """`produce(item)` for each item, computed up to `depth` items ahead on one thread."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(message) -> bool:
        while not stop.is_set():
            try:
                ready.put(message, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in items:
                if not put(("value", produce(item))):
                    return
            put(("done", None))
        except BaseException as error:  # re-raised in the consumer
            put(("error", error))

    worker = threading.Thread(target=work, name="cohort-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = ready.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        worker.join()
