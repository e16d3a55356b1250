"""The contract shared by every algorithm: `ClientBatch`, `Algorithm` and the key convention.

A round is a pure function `round(server_state, client_batch) -> server_state`. The clients of a
round are stacked along a leading axis C, so a round is one compiled program over its cohort.
Randomness flows from one experiment key: the cohort of round t comes from `cohort_key(key, t)`
and client i's local randomness from `client_key(key, t, i)`. Two algorithms run with the same
key therefore see the same clients, the same shuffles and the same stragglers, which is what
makes "FedProx with mu = 0 equals FedAvg" testable bit for bit.
"""

import enum
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any
ServerState = Any
# Every round's metrics hold these; `fedjax_lab.core.metrics.round_metrics` builds them.
REQUIRED_METRICS = ("train_loss", "participants", "bytes_up", "bytes_down")

# Tags that separate the two key streams derived from the experiment key.
_COHORT_STREAM = 0
_CLIENT_STREAM = 1
_INIT_STREAM = 2


class ClientStream(enum.IntEnum):
    """Independent sub-streams of one client's round key, one per use, so uses never correlate."""

    SHUFFLE = 0
    STEP = 1
    STRAGGLER = 2
    STRAGGLER_EPOCHS = 3
    # The server's own draws (`server_key`), kept far from the clients' streams.
    SERVER = 100


class ClientBatch(NamedTuple):
    """The clients of one round, stacked along a leading client axis C.

    Attributes:
        x: inputs `[C, N, *feature_shape]`, padded to a common N.
        y: integer labels `[C, N]`, or `[C, N, T]` next-token targets of sequence examples (a
            target of `IGNORE_LABEL` counts in no loss or metric; see `core.losses`).
        mask: `[C, N]` bool, True for real examples, False for padding.
        num_examples: `[C]` int32, the number of real examples (0 for a padded client).
        client_ids: `[C]` int32, each client's index in the population.
        rng: `[C]` typed PRNG keys, one per client (`client_key(key, round, client_id)`).
    """

    x: jax.Array
    y: jax.Array
    mask: jax.Array
    num_examples: jax.Array
    client_ids: jax.Array
    rng: jax.Array

    @property
    def num_clients(self) -> int:
        return self.y.shape[0]


class Algorithm(NamedTuple):
    """A federated algorithm as pure functions, built by a factory over hyperparameters.

    Attributes:
        init: `init(key) -> server_state`.
        round: `round(server_state, client_batch) -> server_state`; pure, jit-able and scan-able.
            The returned state's `metrics` is a dict of scalars describing the round, holding at
            least `REQUIRED_METRICS` (build it with `fedjax_lab.core.metrics.round_metrics`).
            Per-client state, where the algorithm keeps one, is `server_state.client_states`: a
            NamedTuple of arrays stacked over the whole population `[num_clients, ...]`.
        predict: `predict(server_state, client_batch) -> logits [C, N, num_classes]`, personalised
            for algorithms that keep per-client models; it never trains on the batch it scores.
        predict_global: optional, the same for the shared global model of a personalised
            algorithm that trains one (Ditto), so evaluation reports both; None where `predict`
            already is the global model or where there is none.
        adapted_predict: optional, for algorithms whose clients adapt before predicting
            (meta-learning): `adapted_predict(server_state, support, query) -> logits
            [C, Nq, num_classes]`, each client adapting on the real examples of its `support`
            row (its training data) and predicting its `query` row (held-out data).
        cohorts: optional `cohorts(key, round, num_clients, cohort_size) -> ids [cohort_size]`,
            the cohort schedule the algorithm's guarantee assumes, which every runner then draws
            instead of the uniform `data.sampling.sample_cohort` (DP-FTRL's epochs,
            `data.sampling.EpochCohorts`); None where any cohort will do.
    """

    init: Callable[[jax.Array], ServerState]
    round: Callable[[ServerState, ClientBatch], ServerState]
    predict: Callable[[ServerState, ClientBatch], jax.Array]
    predict_global: Callable[[ServerState, ClientBatch], jax.Array] | None = None
    adapted_predict: Callable[[ServerState, ClientBatch, ClientBatch], jax.Array] | None = None
    cohorts: Callable[[jax.Array, Any, int, int], jax.Array] | None = None


class DataInfo(NamedTuple):
    """What a builder may know of the training data before it sees any batch.

    Attributes:
        num_clients: the training population (per-client state is stacked over it).
        num_classes: the number of labels.
        feature_shape: the shape of one example.
        max_examples: the largest training client's number of examples (the padded N).
        label_shape: the shape of one example's labels: () for classification, (T,) for
            next-token targets of a sequence.
    """

    num_clients: int
    num_classes: int
    feature_shape: tuple[int, ...]
    max_examples: int
    label_shape: tuple[int, ...] = ()


def experiment_key(seed: int) -> jax.Array:
    """The one key all of an experiment's randomness derives from."""
    return jax.random.key(seed)


def init_key(key: jax.Array) -> jax.Array:
    """Key of the algorithm's `init` (the initial model), disjoint from the round streams."""
    return jax.random.fold_in(key, _INIT_STREAM)


def cohort_key(key: jax.Array, round_index) -> jax.Array:
    """Key that picks round `round_index`'s cohort; independent of the clients' own keys."""
    return jax.random.fold_in(jax.random.fold_in(key, _COHORT_STREAM), round_index)


def client_key(key: jax.Array, round_index, client_id) -> jax.Array:
    """Client `client_id`'s key in round `round_index`: the same whichever algorithm runs."""
    round_key = jax.random.fold_in(jax.random.fold_in(key, _CLIENT_STREAM), round_index)
    return jax.random.fold_in(round_key, client_id)


def client_keys(key: jax.Array, round_index, client_ids: jax.Array) -> jax.Array:
    """`client_key` for each id in `client_ids` `[C]`, stacked to `[C]` keys."""
    return jax.vmap(client_key, in_axes=(None, None, 0))(key, round_index, client_ids)


def server_key(batch: ClientBatch) -> jax.Array:
    """The server's key of a round: the first real client's key on the SERVER stream.

    Server-side randomness (a shuffle of uploaded features, a generator's noise) comes from the
    round's keys rather than a key kept in the state, so a run depends only on the experiment
    key; taking the first client with examples keeps it independent of padding.
    """
    first_real = jnp.argmax(batch.num_examples > 0)
    return jax.random.fold_in(batch.rng[first_real], ClientStream.SERVER)


def gather_clients(population_state: PyTree, client_ids: jax.Array) -> PyTree:
    """Rows `client_ids` of a pytree stacked over the whole population."""
    return jax.tree.map(lambda leaf: leaf[client_ids], population_state)


def scatter_clients(population_state: PyTree, client_ids: jax.Array, cohort_state: PyTree,
                    valid: jax.Array | None = None) -> PyTree:
    """Writes a cohort's state back into the population; rows of other clients are untouched.

    Args:
        population_state: pytree whose leaves are `[num_clients, ...]`.
        client_ids: `[C]` population indices of the cohort, distinct among valid rows.
        cohort_state: pytree whose leaves are `[C, ...]`.
        valid: optional `[C]` bool; rows with False (padded clients) are not written.
    """
    if valid is not None:
        num_clients = jax.tree.leaves(population_state)[0].shape[0]
        # An out-of-range index with mode="drop" skips the write, so padded rows change nothing.
        client_ids = jnp.where(valid, client_ids, num_clients)
    return jax.tree.map(lambda pop, new: pop.at[client_ids].set(new, mode="drop"),
                        population_state, cohort_state)
