"""signSGD with majority vote, medianSGD, and their noisy versions that bridge median and mean.

References:
    Chen, Chen, Sun, Wu, Hong. "Distributed Training with Heterogeneous Data: Bridging Median- and
    Mean-Based Algorithms." NeurIPS 2020, arXiv 1906.01736.
    Bernstein, Zhao, Azizzadenesheli, Anandkumar. "signSGD with Majority Vote is Communication
    Efficient and Fault Tolerant." ICLR 2019, arXiv 1810.05291.

Update: each node i computes one stochastic gradient g_i at x_t, draws its own xi_i (i.i.d.
coordinates, N(0, 1) or U[-1, 1]) and sends sign(g_i + b xi_i) (one bit a coordinate) or
g_i + b xi_i; the server moves x_{t+1} = x_t - delta * sign(sum_i sign(g_i + b xi_i)) (noisy
signSGD) or x_t - delta * median_i(g_i + b xi_i) (noisy medianSGD). b = 0 is plain signSGD /
medianSGD, which converge to where the *median* of the gradients vanishes; as b grows the
expected vote and median approach a multiple of the *mean* gradient (ALGORITHMS.md §3).

Tie rule: sign(0) = 0, so a coordinate whose vote is tied (possible with an even number of
nodes) does not move, and a node whose noisy gradient is exactly 0 abstains. The median of an
even number of nodes is the mean of the two middle values. Both are unweighted over the nodes
that take part (weight > 0), as in the paper.

b is absolute (`noise_reference="absolute"`) or in units of the gradient scale
(`noise_reference="median_gradient"`: the median |g| over all coordinates of the first round's
nodes, measured once and kept in the state, so the noise does not shrink as training converges;
in a deployment that scale would be a constant agreed in advance).

Pitfalls avoided (ALGORITHMS.md §3f): the noise is added by each node to its own gradient before
the sign or median, never to the aggregate or the model; every node, coordinate and round draws
fresh noise from its own key; the vote is over signs, not the sign of the mean.
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from fedjax_lab.algorithms.fedavg import predict_with
from fedjax_lab.algorithms.spec import AlgorithmSpec
from fedjax_lab.core import (Algorithm, ClientBatch, ClientExecution, client_weights, model_loss,
                             participants_bytes, server_update, sign_bytes, tree_bytes)
from fedjax_lab.core.attacks import Attack
from fedjax_lab.core.gradients import minibatch_gradient
from fedjax_lab.core.local_training import LossFn
from fedjax_lab.core.metrics import initial_metrics, round_metrics
from fedjax_lab.core.robust import coordinate_median, majority_vote
from fedjax_lab.core.types import DataInfo
from fedjax_lab.core.validation import check_number
from fedjax_lab.models import Model
from fedjax_lab.options import non_negative, one_of, option, optional_positive_int, positive

PyTree = Any
NOISES = ("gaussian", "uniform")
NOISE_REFERENCES = ("absolute", "median_gradient")
# The nodes' noise sub-stream of their round key (ClientStream uses small values).
_NOISE_STREAM = 6_001


@dataclasses.dataclass(frozen=True)
class SignSGDConfig:
    """Noisy signSGD's options. The paper publishes no defaults (ALGORITHMS.md §3c); these follow
    the library's digits experiment: Gaussian noise of b = 3 times the first round's median |g|
    (its best scale, and the paper's advice to set b relative to the gradient scale), full local
    gradients. delta = 0.01 rather than the experiment's 0.03 for softmax regression: every
    coordinate of the default MLP (d = 55,210) moves by delta, and 0.03 raised its loss in the
    second round. `noise_scale` 0 is plain signSGD with majority vote."""

    lr: float = option(0.01, "server step delta", positive, sweepable=True)
    noise_scale: float = option(3.0, "noise scale b (0: noiseless)", non_negative,
                                sweepable=True)
    noise: str = option("gaussian", "law of the noise xi", one_of(*NOISES))
    noise_reference: str = option("median_gradient", "b in absolute units or in units of the "
                                  "first round's median |g|", one_of(*NOISE_REFERENCES))
    batch_size: int | None = option(None, "each node's minibatch; none = all its examples",
                                    optional_positive_int)


@dataclasses.dataclass(frozen=True)
class MedianSGDConfig(SignSGDConfig):
    """Noisy medianSGD's options: as `SignSGDConfig` (b = 3 times the median |g|), with the
    library's digits step delta = 0.5 (a median is a gradient-sized step, not a sign).
    `noise_scale` 0 is plain medianSGD."""

    lr: float = option(0.5, "server step delta", positive, sweepable=True)


def _options(config: SignSGDConfig, execution: ClientExecution) -> dict:
    return dict(learning_rate=config.lr, noise_scale=config.noise_scale, noise=config.noise,
                noise_reference=config.noise_reference, batch_size=config.batch_size,
                execution=execution)


def build_sign_sgd(config: SignSGDConfig, model: Model, data: DataInfo,
                   execution: ClientExecution = ClientExecution()) -> Algorithm:
    del data
    return sign_sgd(model, **_options(config, execution))


def build_median_sgd(config: MedianSGDConfig, model: Model, data: DataInfo,
                     execution: ClientExecution = ClientExecution()) -> Algorithm:
    del data
    return median_sgd(model, **_options(config, execution))


class MedianMeanState(NamedTuple):
    """Attributes: params x, opt_state (server SGD), noise_unit (the absolute size of b = 1),
    round, metrics."""

    params: PyTree
    opt_state: PyTree
    noise_unit: jax.Array
    round: jax.Array
    metrics: dict[str, jax.Array]


def sign_sgd(model: Model, *, learning_rate: float, noise_scale: float = 0.0,
             **options) -> Algorithm:
    """Builds (noisy) signSGD with majority vote.

    Args:
        model: the `(init, apply)` model.
        learning_rate: the server step delta.
        noise_scale: b >= 0; 0 is plain signSGD.
        **options: `noise`, `noise_reference`, `batch_size`, `loss`, `attack`, `execution`
            (see `_gradient_aggregation`).

    Returns:
        An `Algorithm` whose state is `MedianMeanState`.
    """
    return _gradient_aggregation(model, "sign", learning_rate, noise_scale, **options)


def median_sgd(model: Model, *, learning_rate: float, noise_scale: float = 0.0,
               **options) -> Algorithm:
    """Builds (noisy) medianSGD: the step is the coordinate-wise median of the noisy gradients.

    Args and Returns as `sign_sgd`.
    """
    return _gradient_aggregation(model, "median", learning_rate, noise_scale, **options)


def _gradient_aggregation(model: Model, rule: str, learning_rate: float, noise_scale: float, *,
                          noise: str = "gaussian", noise_reference: str = "absolute",
                          batch_size: int | None = None, loss: LossFn | None = None,
                          attack: Attack | None = None,
                          execution: ClientExecution = ClientExecution()) -> Algorithm:
    """The shared round of both rules.

    Args:
        noise: the law of xi, "gaussian" (N(0, 1)) or "uniform" (U[-1, 1], so b is its
            half-width).
        noise_reference: "absolute" or "median_gradient" (b in units of the first round's median
            |g|).
        batch_size: each node's minibatch; None uses all its examples (a full local gradient).
        loss: `loss(params, x, y, mask, rng)`; default the model's cross-entropy.
        attack: optional `Attack`; malicious nodes poison their labels or their gradients.
        execution: how nodes run.
    """
    check_number("learning_rate", learning_rate, "a positive number", lambda lr: lr > 0)
    check_number("noise_scale", noise_scale, "b >= 0", lambda b: b >= 0)
    if noise not in NOISES:
        raise ValueError(f"noise {noise!r} is unknown; allowed: {', '.join(NOISES)}")
    if noise_reference not in NOISE_REFERENCES:
        raise ValueError(f"noise_reference {noise_reference!r} is unknown; allowed: "
                         f"{', '.join(NOISE_REFERENCES)}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ValueError(f"batch_size={batch_size!r} is invalid; expected a positive integer or "
                         "None")
    loss_fn = model_loss(model.apply) if loss is None else loss
    server_optimizer = optax.sgd(learning_rate)
    aggregate = majority_vote if rule == "sign" else coordinate_median

    def init(key: jax.Array) -> MedianMeanState:
        params = model.init(key)
        dtype = jnp.result_type(float)
        return MedianMeanState(params, server_optimizer.init(params), jnp.ones((), dtype),
                               jnp.zeros((), jnp.int32),
                               initial_metrics(_round_metrics, rule=rule,
                                               learning_rate=learning_rate, step=params,
                                               weights=jnp.zeros(0), losses=jnp.zeros(0),
                                               b=jnp.zeros((), dtype), static_argnames=("rule",)))

    def round_fn(state: MedianMeanState, batch: ClientBatch) -> MedianMeanState:
        params = state.params
        if attack is not None:
            batch = attack.poison_batch(batch)

        def node(client):
            x, y, mask, rng = client
            value, gradient = minibatch_gradient(loss_fn, params, x, y, mask, rng,
                                                 batch_size=batch_size)
            flat, unravel = ravel_pytree(gradient)
            noise_key = jax.random.fold_in(rng, _NOISE_STREAM)
            if noise == "gaussian":
                xi = jax.random.normal(noise_key, flat.shape, flat.dtype)
            else:
                xi = jax.random.uniform(noise_key, flat.shape, flat.dtype, -1.0, 1.0)
            return value, gradient, unravel(xi)

        losses, gradients, xis = execution.map(node, (batch.x, batch.y, batch.mask, batch.rng))
        if attack is not None:
            gradients = attack.corrupt_updates(gradients, batch)
        weights = client_weights(batch.num_examples, weighting="uniform")
        noise_unit = state.noise_unit
        if noise_reference == "median_gradient":
            noise_unit = jnp.where(state.round == 0, _median_magnitude(gradients, weights),
                                   noise_unit).astype(noise_unit.dtype)
        b = (noise_scale * noise_unit).astype(jnp.result_type(float))
        sent = jax.tree.map(lambda g, xi: g + b.astype(g.dtype) * xi, gradients, xis)
        step = aggregate(sent, weights)
        new_params, opt_state = server_update(params, state.opt_state, step, server_optimizer)
        return MedianMeanState(new_params, opt_state, noise_unit, state.round + 1,
                               _round_metrics(rule, learning_rate, step, weights, losses, b))

    def predict(state: MedianMeanState, batch: ClientBatch) -> jax.Array:
        return predict_with(model, state.params, batch.x)

    return Algorithm(init=init, round=round_fn, predict=predict)


def _median_magnitude(gradients: PyTree, weights: jax.Array) -> jax.Array:
    """Median |g| over every coordinate of the participating nodes' gradients."""
    flat = jax.vmap(lambda g: ravel_pytree(g)[0])(gradients)
    magnitudes = jnp.where((weights > 0)[:, None], jnp.abs(flat), jnp.nan)
    return jnp.nanmedian(magnitudes)


def _round_metrics(rule: str, learning_rate: float, step: PyTree, weights, losses,
                   b) -> dict[str, jax.Array]:
    """The round's metrics plus the absolute `noise_scale` b and the `update_norm`.

    Each participating node uploads one bit (sign) or one float (median) a coordinate; each node
    of the cohort downloads the model, since a sampled node may have missed earlier steps.
    `update_norm` is the norm of the model's change, delta times the aggregate's norm.
    """
    dtype = jnp.result_type(float)
    per_node_up = sign_bytes(step) if rule == "sign" else tree_bytes(step)
    return round_metrics(
        weights, losses, bytes_up=participants_bytes(weights, per_node_up),
        bytes_down=weights.shape[0] * tree_bytes(step), noise_scale=jnp.asarray(b, dtype),
        update_norm=(learning_rate * optax.tree.norm(step)).astype(dtype))


SPECS = (
    AlgorithmSpec(
        "sign_sgd", SignSGDConfig, build_sign_sgd,
        paper="Chen et al., Distributed Training with Heterogeneous Data: Bridging Median- and "
              "Mean-Based Algorithms, NeurIPS 2020, arXiv 1906.01736; Bernstein et al., "
              "signSGD with Majority Vote, ICLR 2019, arXiv 1810.05291",
        summary="(noisy) signSGD: nodes send sign(g + b xi), the server steps on the majority "
                "vote"),
    AlgorithmSpec(
        "median_sgd", MedianSGDConfig, build_median_sgd,
        paper="Chen et al., Distributed Training with Heterogeneous Data: Bridging Median- and "
              "Mean-Based Algorithms, NeurIPS 2020, arXiv 1906.01736",
        summary="(noisy) medianSGD: the server steps on the coordinate-wise median of g + b xi"),
)
