"""Attack simulation for robustness studies: a seeded fraction of clients is malicious.

Reference: the three attacks of Ditto (Li, Hu, Beirami, Smith, "Ditto: Fair and Robust Federated
Learning Through Personalization", ICML 2021, arXiv 2012.04221) as its reference code
(litian96/ditto `flearn/trainers_MTL/ditto.py`) implements them:

- "random_labels" (A1): malicious clients train honestly on labels drawn uniformly from the
  classes, drawn once (the same wrong labels every round).
- "gaussian" (A2): malicious clients send N(0, sd^2) noise in place of their update, where sd is
  the standard deviation of the coordinates of their true (flattened) update.
- "scaled" (A3, "boosting"): malicious clients send their true update times `boost`; Ditto's
  code boosts by the number of clients per round, the default here.

Ditto's code also gives its corrupted devices random labels under every attack, so its A3 boosts
an update trained on random labels: that is `poison_labels=True` here (off by default, so that
"scaled" alone boosts an honest update).

The malicious set is round(fraction * num_clients) clients of the population chosen uniformly
from `seed`, fixed for the whole run (Ditto draws `corrupt_id` once), so every algorithm run with
the same attack faces the same adversaries. Per-round noise comes from each client's round key
through a sub-stream of its own, so it never correlates with shuffles or stragglers.

Use in a round: `batch = attack.poison_batch(batch)` before local training and
`updates = attack.corrupt_updates(updates, batch)` before aggregation; "none" is the identity.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from fedjax_lab.core.losses import IGNORE_LABEL
from fedjax_lab.core.types import ClientBatch

PyTree = Any
ATTACKS = ("none", "random_labels", "gaussian", "scaled")
# Sub-stream tags of the attack; far from ClientStream's small values so they never collide.
_LABEL_STREAM = 7_001
_NOISE_STREAM = 7_002


@dataclasses.dataclass(frozen=True)
class Attack:
    """A seeded set of malicious clients and what they send.

    Attributes:
        kind: one of ATTACKS.
        fraction: fraction of the population that is malicious, in [0, 1].
        num_clients: the population size N.
        num_classes: classes labels are drawn from (needed by "random_labels").
        boost: the factor of "scaled"; None means the round's number of clients.
        poison_labels: malicious clients also train on random labels ("random_labels" always
            does).
        seed: chooses the malicious clients and their random labels; a Python int, or a traced
            integer array, so that one compiled program serves every seed (the same clients
            and labels as the int).
    """

    kind: str = "none"
    fraction: float = 0.0
    num_clients: int = 1
    num_classes: int | None = None
    boost: float | None = None
    poison_labels: bool = False
    seed: int | jax.Array = 0

    def __post_init__(self):
        if self.kind not in ATTACKS:
            raise ValueError(f"attack {self.kind!r} is unknown; allowed: {', '.join(ATTACKS)}")
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"attack fraction={self.fraction!r} is invalid; expected 0 <= f <= 1")
        if isinstance(self.num_clients, bool) or not isinstance(self.num_clients, int) \
                or self.num_clients < 1:
            raise ValueError(f"num_clients={self.num_clients!r} is invalid; expected a positive "
                             "integer")
        if self._poisons_labels and (not isinstance(self.num_classes, int)
                                     or self.num_classes < 2):
            raise ValueError(f"num_classes={self.num_classes!r} is invalid; random labels need "
                             "an integer >= 2")
        if self.boost is not None and not self.boost > 0:
            raise ValueError(f"boost={self.boost!r} is invalid; expected a positive number or None")

    @property
    def _poisons_labels(self) -> bool:
        return self.kind == "random_labels" or (self.kind != "none" and self.poison_labels)

    @property
    def num_malicious(self) -> int:
        return round(self.num_clients * self.fraction) if self.kind != "none" else 0

    def malicious_clients(self) -> jax.Array:
        """`[num_clients]` bool: which clients of the population are malicious."""
        chosen = jax.random.permutation(jax.random.key(self.seed), self.num_clients)
        return jnp.zeros(self.num_clients, bool).at[chosen[:self.num_malicious]].set(True)

    def is_malicious(self, client_ids: jax.Array) -> jax.Array:
        """`[C]` bool for the clients of a round."""
        return self.malicious_clients()[client_ids]

    def poison_batch(self, batch: ClientBatch) -> ClientBatch:
        """The batch the clients train on: malicious clients' labels replaced by random ones."""
        if not self._poisons_labels or self.num_malicious == 0:
            return batch
        # One fixed label per (client, example position), whatever the round.
        label_key = jax.random.fold_in(jax.random.key(self.seed), _LABEL_STREAM)
        random_labels = jax.vmap(lambda i: jax.random.randint(
            jax.random.fold_in(label_key, i), batch.y.shape[1:], 0, self.num_classes,
            dtype=batch.y.dtype))(batch.client_ids)
        malicious = self.is_malicious(batch.client_ids)
        # Ignored sequence targets stay ignored: poisoning changes labels, not what counts.
        poisoned = malicious.reshape(malicious.shape + (1,) * (batch.y.ndim - 1)) \
            & (batch.y != IGNORE_LABEL)
        return batch._replace(y=jnp.where(poisoned, random_labels, batch.y))

    def corrupt_updates(self, updates: PyTree, batch: ClientBatch) -> PyTree:
        """The updates the server receives: malicious clients' `[C, ...]` rows replaced."""
        if self.kind not in ("gaussian", "scaled") or self.num_malicious == 0:
            return updates
        malicious = self.is_malicious(batch.client_ids)
        if self.kind == "scaled":
            boost = batch.num_clients if self.boost is None else self.boost
            sent = jax.tree.map(lambda leaf: leaf * jnp.asarray(boost, leaf.dtype), updates)
        else:
            sent = jax.vmap(_gaussian_like)(updates, batch.rng)
        return jax.tree.map(
            lambda bad, good: jnp.where(malicious.reshape((-1,) + (1,) * (good.ndim - 1)),
                                        bad, good), sent, updates)


def _gaussian_like(update: PyTree, rng: jax.Array) -> PyTree:
    """N(0, sd^2) noise shaped like one client's update, sd = std of its flattened coordinates."""
    flat, unravel = ravel_pytree(update)
    noise = jax.random.normal(jax.random.fold_in(rng, _NOISE_STREAM), flat.shape, flat.dtype)
    return unravel(jnp.std(flat) * noise)
