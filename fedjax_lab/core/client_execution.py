"""How the clients of a round are run: one client program, several execution strategies.

Following fedjax's split between the client program and its back end, an algorithm writes what
one client does and hands it to `ClientExecution.map`; the strategy is chosen separately and never
hard-coded by an algorithm. Strategies:

- "vmap": all clients as one batched program (fastest for small models).
- "chunked": `lax.map` over chunks of `chunk_size` vmapped clients; peak memory is bounded by the
  chunk, not the cohort.
- "sequential": `lax.map` one client at a time inside the same compiled round.
- "unrolled": a Python loop over clients traced into one program; XLA:CPU runs convolution
  backward passes fastest outside loops (see DESIGN.md), at the cost of compile time.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any
STRATEGIES = ("vmap", "chunked", "sequential", "unrolled")


@dataclasses.dataclass(frozen=True)
class ClientExecution:
    """An execution strategy for per-client work.

    Attributes:
        strategy: one of STRATEGIES.
        chunk_size: clients per chunk, required by (and only meaningful for) "chunked".
    """

    strategy: str = "vmap"
    chunk_size: int | None = None

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"execution strategy {self.strategy!r} is unknown; "
                             f"allowed: {', '.join(STRATEGIES)}")
        if self.strategy == "chunked":
            if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
                raise ValueError(f"chunk_size={self.chunk_size!r} is invalid for the chunked "
                                 "strategy; expected a positive integer")

    def map(self, client_fn: Callable[[PyTree], PyTree], per_client: PyTree) -> PyTree:
        """Applies `client_fn` to each client's slice of `per_client` (leaves `[C, ...]`).

        Values shared by all clients (the global model) are closed over by `client_fn`.
        Returns `client_fn`'s outputs stacked along a leading client axis.
        """
        if self.strategy == "vmap":
            return jax.vmap(client_fn)(per_client)
        if self.strategy == "chunked":
            return jax.lax.map(client_fn, per_client, batch_size=self.chunk_size)
        if self.strategy == "sequential":
            return jax.lax.map(client_fn, per_client)
        num_clients = jax.tree.leaves(per_client)[0].shape[0]
        outputs = [client_fn(jax.tree.map(lambda leaf: leaf[i], per_client))
                   for i in range(num_clients)]
        return jax.tree.map(lambda *leaves: jnp.stack(leaves), *outputs)
