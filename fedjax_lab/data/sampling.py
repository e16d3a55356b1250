"""Cohort sampling: the clients of round t are a pure function of (experiment key, t).

Every algorithm run with the same seed therefore trains on the same clients in the same rounds,
and because the functions are pure JAX the whole sampling-and-gathering step runs inside the
compiled scan over rounds when the population lives on the device.
"""

import jax
import jax.numpy as jnp

from fedjax_lab.core.types import ClientBatch, client_keys, cohort_key


def check_cohort_size(cohort_size: int, num_clients: int) -> None:
    """Raises a ValueError naming the cohort size unless 1 <= cohort_size <= num_clients."""
    if isinstance(cohort_size, bool) or not isinstance(cohort_size, int) or not (
            1 <= cohort_size <= num_clients):
        raise ValueError(f"cohort_size={cohort_size!r} is invalid; expected an integer in "
                         f"1..{num_clients} (the number of clients)")


def sample_cohort(key: jax.Array, round_index, num_clients: int, cohort_size: int,
                  probabilities: jax.Array | None = None) -> jax.Array:
    """The `[cohort_size]` int32 client ids of round `round_index`, without replacement.

    Args:
        key: the experiment key.
        round_index: the round (may be traced).
        num_clients: the population size.
        cohort_size: clients per round, K.
        probabilities: optional `[num_clients]` sampling weights (e.g. proportional to size);
            uniform when None.
    """
    check_cohort_size(cohort_size, num_clients)
    ids = jax.random.choice(cohort_key(key, round_index), num_clients, (cohort_size,),
                            replace=False, p=probabilities)
    return ids.astype(jnp.int32)


def cohort_batch(population, client_ids: jax.Array, key: jax.Array, round_index) -> ClientBatch:
    """Gathers the cohort's rows of a padded population into a `ClientBatch`.

    Args:
        population: a `PaddedClients` (numpy or device arrays) stacked over all clients.
        client_ids: `[C]` population indices.
        key: the experiment key; client i gets `client_key(key, round_index, i)`.
        round_index: the round.
    """
    return ClientBatch(x=population.x[client_ids], y=population.y[client_ids],
                       mask=population.mask[client_ids],
                       num_examples=population.num_examples[client_ids],
                       client_ids=client_ids, rng=client_keys(key, round_index, client_ids))
