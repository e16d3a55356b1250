"""DP-FedAvg's private aggregation: clip each delta, sum, add Gaussian noise, divide by a fixed
denominator; optionally adapt the clip norm to a quantile of the update norms, or noise the
rounds through a binary tree instead (DP-FTRL).

References:
    McMahan, Ramage, Talwar, Zhang. "Learning Differentially Private Recurrent Language Models."
    ICLR 2018, arXiv 1710.06963 (flat clipping, the fixed-denominator estimator).
    Andrew, Thakkar, McMahan, Ramaswamy. "Differentially Private Learning with Adaptive
    Clipping." NeurIPS 2021, arXiv 1905.03871 (geometric update from a privatised count).
    Kairouz, McMahan, Song, Thakkar, Thakurta, Xu. "Practical and Private (Deep) Learning
    without Sampling or Shuffling." ICML 2021, arXiv 2103.00039 (DP-FTRL, tree aggregation).

Update: with Δ_i the participating clients' deltas, S the clip norm and D the expected cohort
(C for fixed-size cohorts, qN under Poisson sampling),
    Δ̃ = (Σ_i Δ_i min(1, S / ||Δ_i||) + N(0, z_Δ² S² I)) / D.
Adding or removing one client moves the sum by at most S, whatever its data. Adaptive clipping
also releases b̃ = (Σ_i (b_i - 1/2) + N(0, σ_b²)) / D + 1/2, b_i = 1[||Δ_i|| <= S], and sets
S <- S exp(-η (b̃ - γ)), so S tracks the γ-quantile of the norms; the centred bits have
sensitivity 1/2, and the two releases compose into one Gaussian mechanism with
z = (z_Δ^-2 + (2σ_b)^-2)^-1/2 (Andrew et al., Theorem 1), the z accounted.

DP-FTRL (`TreeAggregation`) releases the prefix sums of the clipped sums instead, each through
a binary tree over the rounds of an epoch (the tree restarts every epoch of R rounds): node
(l, j) covers rounds j 2^l + 1 .. (j + 1) 2^l of the epoch and carries its own N(0, z²S²), and
prefix k's noise is the sum of node (l, (k >> l) - 1) over the set bits l of k, so a client in
one round of the epoch is in at most ceil(log2(R + 1)) released nodes. FTRL with server SGD is
θ_t = θ_0 - η Σ_s Δ̃_s, so releasing the round's difference of consecutive prefixes,
    Δ̃_k = (Σ_i clip(Δ_i) + node(a, (k >> a) - 1) - Σ_{l<a} node(l, ((k - 1) >> l) - 1)) / D,
a = the trailing zeros of k (what prefix k adds and what it retires), is the same release; any
server optimiser on it is post-processing, so FedAvg, FedAdam, FedProx or Ditto's global model
become DP-FTRL (DP-FTRLM with server momentum) unchanged. Every node of an epoch's tree is drawn
from one key taken from the epoch's first round, folded with (l, j), so a node has the same noise
each time it is used and nodes of different epochs are independent.

Pitfalls avoided: the denominator is fixed, not the realised number or weight of participants
(dividing by it would release that count unnoised); clipping is flat over the whole update, so
S bounds the sensitivity; the noise and count keys come from the round's keys (the caller
passes `core.types.server_key(batch)`), never from a key kept in the state; clients that do not
participate (padding, unsampled, dropped stragglers) add exactly zero and are not counted in b̃.
Under the tree, a node's noise is regenerated from the epoch's key rather than kept, so the state
holds one key, not a model-sized buffer per level.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.core.client_execution import ClientExecution

PyTree = Any
# Sub-streams of the server key: the noise on the sum, the noise on the count and the key of an
# epoch's tree never coincide.
_SUM_NOISE, _COUNT_NOISE, _TREE_NOISE = 0, 1, 2
# dp_noise_std: the std of the noise the round adds to the mean delta, per coordinate (under the
# tree, sqrt(1 + a) node stds: the node it adds and the a it retires).
METRICS = ("dp_clip_norm", "dp_noise_std", "dp_clipped_fraction")
ADAPTIVE_METRICS = ("dp_unclipped_estimate",)


class AdaptiveClipping(NamedTuple):
    """Andrew et al.'s quantile tracking: target quantile γ, learning rate η of the geometric
    update, std σ_b of the noise on the count of unclipped clients (None: D / 20, their
    recommendation, D the expected cohort)."""

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise: float | None = None


class TreeAggregation(NamedTuple):
    """DP-FTRL's tree-aggregated noise (Kairouz et al.): the tree restarts every
    `rounds_per_epoch` rounds R, within which each client takes part at most once (the schedule
    `fedjax_lab.data.sampling.EpochCohorts` draws)."""

    rounds_per_epoch: int


class TreeAggregatorState(NamedTuple):
    """Attributes: clip_norm (S, fixed); round, the rounds aggregated so far (round mod R is the
    position in the epoch's tree, aligned with the schedule, which counts the same rounds); and
    epoch_key, the key data every node of the current epoch's tree derives from."""

    clip_norm: jax.Array
    round: jax.Array
    epoch_key: jax.Array


class DPAggregatorState(NamedTuple):
    """Attributes: clip_norm, the S of the next round (constant without adaptive clipping)."""

    clip_norm: jax.Array


class PrivateServerState(NamedTuple):
    """A server optimiser's state under DP: the aggregator's state beside the optimiser's."""

    aggregator: DPAggregatorState
    optimizer: PyTree


class DPAggregator(NamedTuple):
    """The private aggregation as pure functions (see `dp_aggregator`).

    Attributes:
        init: `init() -> DPAggregatorState`.
        aggregate: `aggregate(client_update, per_client, participating, state, key, *,
            execution, corrupt=None) -> (private_mean, aux, state, metrics)`: runs
            `client_update(client) -> (delta, aux)` on every client with `execution`, clips
            and sums the participating clients' deltas as they finish (chunked cohorts never
            stack them), adds the noise and updates the clip norm. `corrupt(deltas)`, when
            given, rewrites the stacked deltas first (a simulated attack).
        aggregate_stacked: `aggregate_stacked(deltas, participating, state, key) ->
            (private_mean, state, metrics)` on deltas stacked over clients.
        metric_names: the names of the scalars `metrics` holds.
    """

    init: Callable[[], DPAggregatorState | TreeAggregatorState]
    aggregate: Callable[..., tuple]
    aggregate_stacked: Callable[..., tuple]
    metric_names: tuple[str, ...]


def _concrete(*values) -> bool:
    """Whether every value is known (a sweep passes hyperparameters as tracers, checked before)."""
    return not any(isinstance(value, jax.core.Tracer) for value in values)


def update_noise_multiplier(noise_multiplier, count_noise):
    """z_Δ of the clipped sum such that, composed with the count's noise σ_b (sensitivity 1/2),
    the round is one Gaussian mechanism of multiplier z: z_Δ = (z^-2 - (2σ_b)^-2)^-1/2
    (Andrew et al., Theorem 1; 0 for z = 0). Needs 2σ_b > z, which `DPOptions` checks."""
    if _concrete(noise_multiplier, count_noise) and not 2 * count_noise > noise_multiplier:
        raise ValueError(f"count_noise={count_noise!r} is too small for noise_multiplier="
                         f"{noise_multiplier!r}; adaptive clipping needs 2 * count_noise > "
                         "noise_multiplier")
    return (jnp.asarray(noise_multiplier, jnp.result_type(float)) ** -2
            - (2 * count_noise) ** -2) ** -0.5


def clip_by_global_norm(delta: PyTree, clip_norm) -> tuple[PyTree, jax.Array]:
    """(delta scaled to L2 norm <= clip_norm over all leaves, its norm before clipping).

    min(1, S / ||Δ||) is exactly 1 for S = inf and for Δ = 0, so nothing unclipped is rescaled.
    """
    norm = optax.tree.norm(delta)
    scale = jnp.minimum(1.0, clip_norm / norm)
    return jax.tree.map(lambda leaf: leaf * scale.astype(leaf.dtype), delta), norm


def gaussian_noise(key: jax.Array, like: PyTree, std) -> PyTree:
    """Independent N(0, std²) noise shaped like `like`, one key per leaf."""
    leaves, treedef = jax.tree.flatten(like)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([
        jnp.asarray(std, leaf.dtype) * jax.random.normal(leaf_key, leaf.shape, leaf.dtype)
        for leaf_key, leaf in zip(keys, leaves)])


def tree_noise(key: jax.Array, position, like: PyTree, std) -> PyTree:
    """The noise DP-FTRL adds in round k = position + 1 of an epoch: prefix k's tree noise minus
    prefix k - 1's, node(a, (k >> a) - 1) - Σ_{l<a} node(l, ((k - 1) >> l) - 1) with a the
    trailing zeros of k, each node N(0, std²) drawn from `key` (the epoch's) folded with (l, j).

    The nodes both prefixes share cancel exactly rather than in floating point, and only the
    a + 1 nodes that change are drawn.
    """
    k = jnp.asarray(position, jnp.int32) + 1
    completed = jax.lax.population_count((k & -k) - 1)

    def node(level, index):
        return gaussian_noise(jax.random.fold_in(jax.random.fold_in(key, level), index), like,
                              std)

    def retire(level, noise):
        return optax.tree.sub(noise, node(level, ((k - 1) >> level) - 1))

    return jax.lax.fori_loop(0, completed, retire, node(completed, (k >> completed) - 1))


def dp_aggregator(clip_norm: float, noise_multiplier: float, *,
                  denominator: float | None = None,
                  adaptive: AdaptiveClipping | None = None,
                  tree: TreeAggregation | None = None) -> DPAggregator:
    """Builds DP-FedAvg's aggregation.

    Args:
        clip_norm: S > 0 (the initial S with adaptive clipping); inf disables clipping (tests).
            This, z and the adaptive options may be traced (a sweep over them compiles once).
        noise_multiplier: z >= 0, the round's noise multiplier as accounted: the noise std on
            the clipped sum is z S, or with adaptive clipping z_Δ S, z_Δ = (z^-2 - (2σ_b)^-2)^-1/2
            (`update_noise_multiplier`), so that the sum and the count compose to z.
        denominator: D, the expected cohort; None is the cohort size C of each round (fixed-size
            sampling, where the expected cohort is the cohort).
        adaptive: quantile tracking of the clip norm; None keeps S fixed.
        tree: DP-FTRL's tree-aggregated noise (each node z S, accounted by
            `fedjax_lab.privacy.accounting.TreeAggregatedGaussian`); None draws fresh noise
            every round. The cohorts must then hold each client at most once per epoch.

    Returns:
        A `DPAggregator`.
    """
    if _concrete(clip_norm) and not clip_norm > 0:
        raise ValueError(f"clip_norm={clip_norm!r} is invalid; expected S > 0")
    if _concrete(noise_multiplier) and not noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier={noise_multiplier!r} is invalid; expected z >= 0")
    if denominator is not None and not denominator > 0:
        raise ValueError(f"denominator={denominator!r} is invalid; expected D > 0")
    if adaptive is not None and _concrete(*adaptive) and not (
            0 < adaptive.target_quantile < 1 and adaptive.learning_rate > 0
            and (adaptive.count_noise is None or adaptive.count_noise > 0)):
        raise ValueError(f"adaptive={adaptive!r} is invalid; expected 0 < target_quantile < 1, "
                         "learning_rate > 0 and count_noise > 0")
    if tree is not None and adaptive is not None:
        raise ValueError("adaptive clipping with tree aggregation is not accounted: its count "
                         "would need a tree of its own; use one or the other")
    if tree is not None and not (isinstance(tree.rounds_per_epoch, int)
                                 and tree.rounds_per_epoch >= 1):
        raise ValueError(f"tree={tree!r} is invalid; expected rounds_per_epoch >= 1")
    dtype = jnp.result_type(float)
    metric_names = METRICS + (ADAPTIVE_METRICS if adaptive is not None else ())

    def init() -> DPAggregatorState | TreeAggregatorState:
        if tree is None:
            return DPAggregatorState(jnp.asarray(clip_norm, dtype))
        # Key data, not a typed key: the state stays plain arrays (checkpoints, sweeps).
        no_key = jnp.zeros_like(jax.random.key_data(jax.random.key(0)))
        return TreeAggregatorState(jnp.asarray(clip_norm, dtype), jnp.zeros((), jnp.int32),
                                   no_key)

    def weights_of(participating: jax.Array) -> tuple[jax.Array, float]:
        cohort_denominator = participating.shape[0] if denominator is None else denominator
        weights = jnp.where(participating, 1.0, 0.0).astype(dtype) / jnp.asarray(
            cohort_denominator, dtype)
        return weights, cohort_denominator

    def release(clipped_mean, norms, participating, state, key, cohort_denominator):
        clip = state.clip_norm
        sum_noise = noise_multiplier
        if adaptive is not None:
            count_noise = (cohort_denominator / 20 if adaptive.count_noise is None
                           else adaptive.count_noise)
            sum_noise = update_noise_multiplier(noise_multiplier, count_noise)
        # A z of 0 with S = inf would otherwise make 0 * inf = nan.
        std = jnp.where(sum_noise > 0, sum_noise * clip, 0.0) / cohort_denominator
        if tree is None:
            noise = gaussian_noise(jax.random.fold_in(key, _SUM_NOISE), clipped_mean, std)
        else:
            position = state.round % tree.rounds_per_epoch
            epoch_key = jnp.where(position == 0,
                                  jax.random.key_data(jax.random.fold_in(key, _TREE_NOISE)),
                                  state.epoch_key)
            noise = tree_noise(jax.random.wrap_key_data(epoch_key,
                                                        impl=jax.random.key_impl(key)),
                               position, clipped_mean, std)
            # The round adds one node and retires the a = trailing-zeros(k) it completes.
            k = position + 1
            std = std * jnp.sqrt(1.0 + jax.lax.population_count((k & -k) - 1))
        private_mean = optax.tree.add(clipped_mean, noise)
        unclipped = participating & (norms <= clip)
        num_participating = jnp.sum(participating)
        metrics = {
            "dp_clip_norm": clip,
            "dp_noise_std": std.astype(dtype),
            # A diagnostic of the simulation, not a private release.
            "dp_clipped_fraction": (jnp.sum(participating & ~unclipped)
                                    / jnp.maximum(num_participating, 1)).astype(dtype),
        }
        if adaptive is not None:
            centred = jnp.sum(jnp.where(participating, unclipped - 0.5, 0.0))
            noise = count_noise * jax.random.normal(jax.random.fold_in(key, _COUNT_NOISE), (),
                                                    dtype)
            estimate = (centred + noise) / cohort_denominator + 0.5
            clip = clip * jnp.exp(-adaptive.learning_rate * (estimate - adaptive.target_quantile))
            metrics["dp_unclipped_estimate"] = estimate.astype(dtype)
        if tree is not None:
            return private_mean, TreeAggregatorState(clip, state.round + 1, epoch_key), metrics
        return private_mean, DPAggregatorState(clip.astype(dtype)), metrics

    def aggregate(client_update, per_client, participating, state, key, *,
                  execution: ClientExecution = ClientExecution(), corrupt=None):
        weights, cohort_denominator = weights_of(participating)
        if corrupt is None:
            def clipped_update(client):
                delta, aux = client_update(client)
                clipped, norm = clip_by_global_norm(delta, state.clip_norm)
                return clipped, (aux, norm)

            clipped_mean, (aux, norms) = execution.map_reduce(clipped_update, per_client,
                                                              weights)
        else:
            deltas, aux = execution.map(client_update, per_client)
            clipped, norms = jax.vmap(clip_by_global_norm, (0, None))(corrupt(deltas),
                                                                      state.clip_norm)
            clipped_mean = _weighted_sum(clipped, weights)
        private_mean, new_state, metrics = release(clipped_mean, norms, participating, state,
                                                   key, cohort_denominator)
        return private_mean, aux, new_state, metrics

    def aggregate_stacked(deltas, participating, state, key):
        weights, cohort_denominator = weights_of(participating)
        clipped, norms = jax.vmap(clip_by_global_norm, (0, None))(deltas, state.clip_norm)
        return release(_weighted_sum(clipped, weights), norms, participating, state, key,
                       cohort_denominator)

    return DPAggregator(init=init, aggregate=aggregate, aggregate_stacked=aggregate_stacked,
                        metric_names=metric_names)


def initial_metrics(aggregator: DPAggregator) -> dict[str, jax.Array]:
    """Zeros under the aggregator's metric names: an `init` state's metrics, which must have the
    structure of every round's."""
    dtype = jnp.result_type(float)
    return {name: jnp.zeros((), dtype) for name in aggregator.metric_names}


def _weighted_sum(stacked: PyTree, weights: jax.Array) -> PyTree:
    return jax.tree.map(lambda leaf: jnp.tensordot(weights.astype(leaf.dtype), leaf, axes=1),
                        stacked)
