"""Straggler simulation of FedProx's experiments (Li et al., MLSys 2020, arXiv 1812.06127).

Each round the reference keeps round(C * (1 - s)) of the C cohort clients active (Python 3's
`round`, which rounds halves to even) and makes the others stragglers that run only
e ~ Uniform{1, ..., E - 1} epochs (it draws `randint(1, E)`, so never the full E). The count is
C minus the active clients, not round(C * s): the two differ for odd C at s = 0.5 (C = 3: one
straggler, not two; C = 5: three, not two).
FedAvg drops stragglers; FedProx keeps their partial work. Both derive the draw from the
clients' own round keys, so under one experiment key both methods see the same stragglers.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_lab.core.types import ClientStream


class Stragglers(NamedTuple):
    """Attributes: is_straggler `[C]` bool; epochs `[C]` int32, the epochs each client runs."""

    is_straggler: jax.Array
    epochs: jax.Array


def sample_stragglers(client_rngs: jax.Array, *, num_epochs: int,
                      fraction: float) -> Stragglers:
    """Chooses C - round(C * (1 - fraction)) stragglers uniformly among the C clients, and their
    epochs.

    The stragglers are the clients whose own uniform priority ranks lowest, which picks a
    uniformly random subset of exactly that size from per-client keys alone.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"straggler fraction {fraction!r} is invalid; expected 0 <= s <= 1")
    num_clients = client_rngs.shape[0]
    num_stragglers = num_clients - round(num_clients * (1 - fraction))
    full = jnp.full((num_clients,), num_epochs, jnp.int32)
    if num_stragglers == 0:
        return Stragglers(jnp.zeros((num_clients,), bool), full)
    if num_epochs < 2:
        raise ValueError(f"stragglers need num_epochs >= 2 (they run 1..E-1 epochs); "
                         f"got num_epochs={num_epochs}")
    priority = jax.vmap(
        lambda k: jax.random.uniform(jax.random.fold_in(k, ClientStream.STRAGGLER)))(client_rngs)
    rank = jnp.argsort(jnp.argsort(priority))
    is_straggler = rank < num_stragglers
    partial = jax.vmap(lambda k: jax.random.randint(
        jax.random.fold_in(k, ClientStream.STRAGGLER_EPOCHS), (), 1, num_epochs))(client_rngs)
    return Stragglers(is_straggler, jnp.where(is_straggler, partial, full).astype(jnp.int32))
