"""Per-client models stacked over the whole population: initialisation and prediction.

Personalised algorithms (Ditto's v_i, FedAMP's w_i) keep one model per client in their state's
`client_states`, with a leading axis over the WHOLE population `[num_clients, ...]`; a round
gathers the cohort's rows by `client_ids` and scatters them back (`gather_clients`,
`scatter_clients`), so an unsampled client's model never changes.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp

from fedjax_lab.core.client_execution import ClientExecution
from fedjax_lab.core.types import ClientBatch, gather_clients

PyTree = Any


def check_num_clients(num_clients) -> None:
    """Raises a one-line ValueError unless `num_clients` is a positive integer."""
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients={num_clients!r} is invalid; expected a positive integer "
                         "(the population size, which per-client models are stacked over)")


@functools.partial(jax.jit, static_argnums=1)
def replicate(params: PyTree, num_clients: int) -> PyTree:
    """`params` copied to every client: leaves `[num_clients, ...]` (one program, where eagerly
    each leaf's copy was one to compile, or to load from the cache, in every process)."""
    return jax.tree.map(lambda leaf: jnp.repeat(leaf[None], num_clients, axis=0), params)


def predict_per_client(apply_fn, execution: ClientExecution, population_params: PyTree,
                       batch: ClientBatch) -> jax.Array:
    """Logits `[C, N, classes]` of each batch client's own model, rows `batch.client_ids`.

    Args:
        apply_fn: the model's `apply(params, x [N, ...]) -> logits [N, classes]`.
        execution: how the clients run (each client's parameters differ, so this is a map).
        population_params: per-client parameters stacked over the population.
        batch: the clients to predict for.
    """
    own_params = gather_clients(population_params, batch.client_ids)
    return execution.map(lambda client: apply_fn(*client), (own_params, batch.x))
