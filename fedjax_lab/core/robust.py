"""Robust aggregators with `weighted_mean`'s signature: `aggregate(stacked, weights) -> update`.

Each function (or the function a factory returns) takes a pytree whose leaves are stacked over
the C clients of a round (`[C, ...]`) and the `[C]` weights of `client_weights`, so any of them
can replace `weighted_mean` in a FedAvg-style round. A client with weight 0 (a padded slot, a
dropped straggler, a client with no data) never takes part; with no participant at all the
result is 0, as `weighted_mean` gives.

- `coordinate_median`: per coordinate, the median of the participants' values (Yin, Chen,
  Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
  Rates", ICML 2018, arXiv 1803.01498); medianSGD of Chen et al. (NeurIPS 2020, arXiv
  1906.01736). Unweighted: the weights only say who takes part, because a client's claimed
  example count is itself attack surface. An even number of participants gives the mean of the
  two middle values (numpy's convention; torch's `median` returns the lower one).
- `trimmed_mean(beta)`: per coordinate, drop the floor(beta * m) largest and smallest of the m
  participants' values and take the weighted mean of the rest with their weights renormalised
  (Yin et al. 2018), so `trimmed_mean(0)` is `weighted_mean` under any weighting.
- `clipped_mean(max_norm)`: scale each client's whole update to L2 norm at most `max_norm`, then
  take the weighted mean (Sun, Kairouz, Suresh, McMahan, "Can You Really Backdoor Federated
  Learning?", arXiv 1911.07963); `max_norm="median"` clips to the participants' median norm, as
  Ditto's reference code (litian96/ditto `l2_clip`) does.
- `majority_vote`: sign of the sum of the participants' signs (signSGD with majority vote,
  Bernstein, Zhao, Azizzadenesheli, Anandkumar, ICLR 2019, arXiv 1810.05291). A tied coordinate
  (and a coordinate every participant reports as exactly 0) gives 0: no move.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.core.aggregation import weighted_mean

PyTree = Any
Aggregator = Callable[[PyTree, jax.Array], PyTree]


def _participant_order_statistics(leaf: jax.Array, participating: jax.Array):
    """The leaf sorted along the client axis with non-participants (as +inf) last, and m."""
    shape = (-1,) + (1,) * (leaf.ndim - 1)
    values = jnp.where(participating.reshape(shape), leaf, jnp.inf)
    return jnp.sort(values, axis=0), jnp.sum(participating, dtype=jnp.int32)


def _masked_median(leaf: jax.Array, participating: jax.Array) -> jax.Array:
    ordered, count = _participant_order_statistics(leaf, participating)
    lower = jnp.take(ordered, jnp.maximum(count - 1, 0) // 2, axis=0)
    upper = jnp.take(ordered, count // 2, axis=0, mode="clip")
    return jnp.where(count > 0, (lower + upper) / 2, jnp.zeros_like(lower))


def coordinate_median(stacked: PyTree, weights: jax.Array) -> PyTree:
    """Coordinate-wise median over the clients with positive weight (0 if there are none)."""
    participating = weights > 0
    return jax.tree.map(lambda leaf: _masked_median(leaf, participating), stacked)


def trimmed_mean(beta: float) -> Aggregator:
    """Coordinate-wise beta-trimmed mean: drop floor(beta * m) values at each end of m.

    Args:
        beta: fraction trimmed at each end, 0 <= beta < 0.5.

    Returns:
        `aggregate(stacked, weights) -> update`; beta = 0 is `weighted_mean`.
    """
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"beta={beta!r} is invalid; expected 0 <= beta < 0.5")

    def aggregate(stacked: PyTree, weights: jax.Array) -> PyTree:
        participating = weights > 0

        def trim(leaf):
            shape = (-1,) + (1,) * (leaf.ndim - 1)
            values = jnp.where(participating.reshape(shape), leaf, jnp.inf)
            leaf_weights = jnp.broadcast_to(weights.astype(leaf.dtype).reshape(shape), leaf.shape)
            ordered, ordered_weights = jax.lax.sort((values, leaf_weights), dimension=0,
                                                    num_keys=1)
            count = jnp.sum(participating, dtype=jnp.int32)
            cut = jnp.floor(beta * count).astype(jnp.int32)
            position = jnp.arange(leaf.shape[0]).reshape(shape)
            keep = (position >= cut) & (position < count - cut)
            kept_weights = jnp.where(keep, ordered_weights, 0)
            total = jnp.sum(kept_weights, axis=0)
            weighted_sum = jnp.sum(jnp.where(keep, ordered * kept_weights, 0), axis=0)
            return jnp.where(total > 0, weighted_sum / jnp.where(total > 0, total, 1), 0)

        return jax.tree.map(trim, stacked)

    return aggregate


def clipped_mean(max_norm: float | str = "median") -> Aggregator:
    """Weighted mean of the clients' updates, each first scaled to L2 norm at most `max_norm`.

    Args:
        max_norm: a positive clipping radius, or "median" for the median of the participants'
            update norms in the round.

    Returns:
        `aggregate(stacked, weights) -> update`.
    """
    if max_norm != "median" and not (isinstance(max_norm, (int, float))
                                     and not isinstance(max_norm, bool) and max_norm > 0):
        raise ValueError(f"max_norm={max_norm!r} is invalid; expected a positive number or "
                         "'median'")

    def aggregate(stacked: PyTree, weights: jax.Array) -> PyTree:
        norms = jax.vmap(optax.tree.norm)(stacked)
        if max_norm == "median":
            radius = _masked_median(norms, weights > 0)
        else:
            radius = jnp.asarray(max_norm, norms.dtype)
        # Division guarded so a zero update (norm 0) keeps scale 1 instead of producing NaN.
        scale = jnp.where(norms > radius, radius / jnp.where(norms > 0, norms, 1), 1)
        clipped = jax.tree.map(
            lambda leaf: leaf * scale.astype(leaf.dtype).reshape((-1,) + (1,) * (leaf.ndim - 1)),
            stacked)
        return jax.tree.map(
            lambda leaf: jnp.tensordot(weights.astype(leaf.dtype), leaf, axes=1), clipped)

    return aggregate


def majority_vote(stacked: PyTree, weights: jax.Array) -> PyTree:
    """sign(sum_i sign(leaf_i)) over the clients with positive weight; a tie gives 0."""
    participating = weights > 0

    def vote(leaf):
        shape = (-1,) + (1,) * (leaf.ndim - 1)
        signs = jnp.where(participating.reshape(shape), jnp.sign(leaf), 0)
        return jnp.sign(jnp.sum(signs, axis=0))

    return jax.tree.map(vote, stacked)


AGGREGATORS = ("mean", "median", "trimmed_mean", "clipped_mean")


def get_aggregator(name: str, **options) -> Aggregator:
    """An aggregator by name: "mean" (`weighted_mean`), "median", "trimmed_mean" (option
    `beta`, default 0.1) or "clipped_mean" (option `max_norm`, default "median")."""
    if name not in AGGREGATORS:
        raise ValueError(f"aggregator {name!r} is unknown; allowed: {', '.join(AGGREGATORS)}")
    allowed = {"mean": (), "median": (), "trimmed_mean": ("beta",),
               "clipped_mean": ("max_norm",)}[name]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"aggregator {name!r} takes no option {unknown[0]!r}; allowed: "
                         f"{', '.join(allowed) or 'none'}")
    if name == "mean":
        return weighted_mean
    if name == "median":
        return coordinate_median
    if name == "trimmed_mean":
        return trimmed_mean(options.get("beta", 0.1))
    return clipped_mean(options.get("max_norm", "median"))
