"""Compressed client gradients with server momentum and error feedback: the round shared by
FetchSGD (fetchsgd.py) and its baselines (topk.py).

References:
    Rothchild, Panda, Ullah, Ivkin, Stoica, Braverman, Gonzalez, Arora. "FetchSGD:
    Communication-Efficient Federated Learning with Sketching." ICML 2020, arXiv 2007.07682
    (Algorithm 1 and its baselines; reference code kiddyboots216/CommEfficient).

Round: each sampled client computes one minibatch gradient g_i at w_t (or, with
`client_update="local_steps"`, its accumulated update w_t - w_i after local training; then eta
scales that update, 1.0 being FedAvg's scale), encodes it (a count sketch, its top k, or nothing)
and sends the message; the server takes the weighted mean of the messages, updates its momentum
and error buffers and applies a step Delta, w_{t+1} = w_t - Delta. A `Compression` says how one
algorithm encodes and steps; everything else (the clients' work, weight decay, weighting,
per-client state, communication) is here, once.

Communication (metrics `bytes_up`, `bytes_down`): a sketch is r * c floats, a dense gradient d
floats, a local top-k message k floats plus k int32 indices (the reference counts values only);
the second round adds m int32 indices down and m floats up per client. Downloads are the model
(d floats) per client, or, with `num_clients`, the reference code's accounting: the coordinates
changed since the client last took part (it caches the model), at min(d floats, n floats + n
int32 indices).

Pitfalls avoided (ALGORITHMS.md §6f): weight decay is part of the client loss, so it is encoded
(sketched) with the gradient.
"""

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from fedjax_lab.algorithms.fedavg import predict_with
from fedjax_lab.core import (Algorithm, ClientBatch, ClientExecution, client_weights,
                             gather_clients, local_train, model_loss, participants_bytes,
                             scatter_clients, weighted_mean)
from fedjax_lab.core.aggregation import WEIGHTINGS, check_weighting
from fedjax_lab.core.gradients import minibatch_gradient
from fedjax_lab.core.metrics import initial_metrics, round_metrics
from fedjax_lab.core.types import DataInfo
from fedjax_lab.core.validation import check_number, is_zero
from fedjax_lab.models import Model
from fedjax_lab.options import (fraction, non_negative, one_of, option, optional_positive_int,
                                positive, positive_int)

PyTree = Any
CLIENT_UPDATES = ("gradient", "local_steps")
# Error feedback after a step: subtract the applied step (the paper) or zero its support (the
# reference code).
ERROR_UPDATES = ("subtract", "zero")
_INDEX_BYTES = 4


class FetchSGDClientState(NamedTuple):
    """Per-client state, stacked over the whole population `[num_clients, ...]`.

    Attributes:
        synced_round: `[N]` int32, the round each client last downloaded the model (0: it holds
            the initial model), for the catch-up download accounting.
        error: `[N, d]` local top-k's unsent remainders e_i with error feedback; `[N, 0]` for
            every other algorithm of the family.
    """

    synced_round: jax.Array
    error: jax.Array


class FetchSGDState(NamedTuple):
    """State of every algorithm of the family.

    Attributes:
        params: the global model w.
        momentum: S_u `[r, c]` (FetchSGD) or u `[d]` (uncompressed and top-k baselines).
        error: S_e `[r, c]` or e `[d]`; `[0]` where the algorithm keeps no server error.
        changed_round: `[d]` int32, the last round each coordinate changed (-1: never).
        client_states: `FetchSGDClientState` with `num_clients`; `()` without.
        round: int32. metrics: the round's scalars.
    """

    params: PyTree
    momentum: jax.Array
    error: jax.Array
    changed_round: jax.Array
    client_states: FetchSGDClientState | tuple
    round: jax.Array
    metrics: dict[str, jax.Array]


class Compression(NamedTuple):
    """How one algorithm of the family encodes, aggregates and steps (all on flat vectors).

    Attributes:
        buffers: `buffers(dim, dtype) -> (momentum, error)`, the server's initial buffers.
        encode: `encode(context, vector, client_error) -> (message, client_error)`.
        server_step: `server_step(context, mean_message, mean_vector, momentum, error, eta) ->
            (delta, momentum, error)`; `mean_vector` is the uncompressed weighted mean, given only
            where `needs_mean_vector`.
        context: `context()`, computed once per round (the sketch's hashes) and passed to both.
        upload_floats, upload_indices: each client's message, in floats and int32 indices.
        download_indices: int32 indices each client downloads besides the model.
        client_error: whether each client keeps an error accumulator between rounds.
        needs_mean_vector: whether `server_step` needs the uncompressed mean.
    """

    buffers: Callable[[int, Any], tuple[jax.Array, jax.Array]]
    encode: Callable[..., tuple[jax.Array, jax.Array]]
    server_step: Callable[..., tuple[jax.Array, jax.Array, jax.Array]]
    context: Callable[[], Any]
    upload_floats: int
    upload_indices: int = 0
    download_indices: int = 0
    client_error: bool = False
    needs_mean_vector: bool = False


@dataclasses.dataclass(frozen=True)
class CompressedClients:
    """What each client computes: the paper's one gradient of all its examples (its clients hold
    5 images), or local training whose accumulated update is sent instead."""

    update: str = option("gradient", "what a client encodes: one minibatch gradient, or w_t - "
                         "w_i after local training", one_of(*CLIENT_UPDATES))
    batch_size: int | None = option(None, "examples per gradient / local step; none = all",
                                    optional_positive_int)
    lr: float = option(0.05, "local SGD rate (update local_steps only)", positive,
                       sweepable=True)
    epochs: int = option(1, "local epochs (update local_steps only)", positive_int)
    weight_decay: float = option(5e-4, "lambda of (lambda/2)||w||^2 in the client loss (the "
                                 "paper's 5e-4)", non_negative, sweepable=True)
    weighting: str = option("num_examples", "client weights p_i", one_of(*WEIGHTINGS))


@dataclasses.dataclass(frozen=True)
class CompressedSGDConfig:
    """The options every algorithm of the family shares: the server's rate eta and momentum rho
    (the reference's virtual momentum 0.9), and the clients' work. eta = 0.1 is the library's
    digits rate: the paper tunes it for ResNet-9 on CIFAR."""

    lr: float = option(0.1, "server step eta", positive, sweepable=True)
    momentum: float = option(0.9, "server momentum rho", fraction, sweepable=True)
    client: CompressedClients = option(CompressedClients(), "the clients' work")


def family_options(config: CompressedSGDConfig, data: DataInfo,
                   execution: ClientExecution) -> dict:
    """The keyword arguments of `compressed_sgd` (through each factory) that a config sets.

    The population size is always passed, so downloads are counted as the reference code counts
    them (the coordinates changed since a client last took part).
    """
    client = config.client
    return dict(learning_rate=config.lr, batch_size=client.batch_size,
                client_update=client.update,
                client_optimizer=optax.sgd(client.lr) if client.update == "local_steps" else None,
                num_epochs=client.epochs, weight_decay=client.weight_decay,
                weighting=client.weighting, num_clients=data.num_clients, execution=execution)


def unit_fraction(value) -> str | None:
    return None if 0 < value <= 1 else "expected a fraction in (0, 1]"


def fraction_of(dim: int, fraction: float) -> int:
    """A count given as a fraction of the parameter count d, at least 1."""
    return max(int(dim * fraction), 1)


def compressed_sgd(model: Model, compression: Compression, learning_rate, *,
                   batch_size: int | None = None, client_update: str = "gradient",
                   client_optimizer: optax.GradientTransformation | None = None,
                   num_epochs: int = 1, weight_decay: float = 0.0,
                   weighting: str = "num_examples", num_clients: int | None = None, loss=None,
                   execution: ClientExecution = ClientExecution()) -> Algorithm:
    """The round shared by the family.

    Args:
        model: the `(init, apply)` model.
        compression: how clients encode and how the server steps.
        learning_rate: eta, a float or an optax schedule of the round.
        batch_size: the client's minibatch (None: all its examples, the paper's 5-image clients).
        client_update: "gradient" (one minibatch gradient, the paper's main mode) or
            "local_steps" (`num_epochs` epochs of `client_optimizer`, sending w_t - w_i).
        client_optimizer: the local optimiser of "local_steps".
        num_epochs: local epochs of "local_steps".
        weight_decay: lambda of a (lambda / 2) ||w||^2 term in the client loss.
        weighting: "num_examples" or "uniform" weights p_i of the clients' messages.
        num_clients: the population size; keeps per-client state (`FetchSGDClientState`) and
            enables the catch-up download accounting.
        loss: `loss(params, x, y, mask, rng)`; default the model's cross-entropy.
        execution: how clients run.

    Returns:
        An `Algorithm` whose state is `FetchSGDState`.
    """
    check_choice("client_update", client_update, CLIENT_UPDATES)
    if not callable(learning_rate):
        check_number("learning_rate", learning_rate, "a positive number or an optax schedule",
                     lambda lr: lr > 0)
    if client_update == "local_steps" and client_optimizer is None:
        raise ValueError("client_update='local_steps' needs client_optimizer")
    check_number("weight_decay", weight_decay, ">= 0", lambda value: value >= 0)
    if num_clients is not None and (isinstance(num_clients, bool)
                                    or not isinstance(num_clients, int) or num_clients < 1):
        raise ValueError(f"num_clients={num_clients!r} is invalid; expected a positive integer")
    if compression.client_error and num_clients is None:
        raise ValueError("client error feedback needs num_clients (each client keeps its error "
                         "between rounds)")
    check_weighting(weighting)
    base_loss = model_loss(model.apply) if loss is None else loss

    def loss_fn(params, x, y, mask, rng):
        decay = (0 if is_zero(weight_decay)
                 else 0.5 * weight_decay * optax.tree.norm(params, squared=True))
        return base_loss(params, x, y, mask, rng) + decay

    dim = model_dim(model)
    schedule = learning_rate if callable(learning_rate) else (lambda _: learning_rate)
    upload = compression.upload_floats, compression.upload_indices

    def init(key: jax.Array) -> FetchSGDState:
        params = model.init(key)
        dtype = ravel_pytree(params)[0].dtype
        momentum_buffer, error_buffer = compression.buffers(dim, dtype)
        client_states = () if num_clients is None else FetchSGDClientState(
            jnp.zeros(num_clients, jnp.int32),
            jnp.zeros((num_clients, dim if compression.client_error else 0), dtype))
        empty = jnp.zeros(0)
        return FetchSGDState(params, momentum_buffer, error_buffer, jnp.full(dim, -1, jnp.int32),
                             client_states, jnp.zeros((), jnp.int32),
                             initial_metrics(_metrics, empty, empty, empty, jnp.zeros(dim, dtype),
                                             (0, 0), dtype=dtype, static_argnames=("dtype",)))

    def round_fn(state: FetchSGDState, batch: ClientBatch) -> FetchSGDState:
        params = state.params
        flat_params, unravel = ravel_pytree(params)
        dtype = flat_params.dtype
        if num_clients is None:
            client_error = jnp.zeros((batch.num_clients, 0), dtype)
        else:
            cohort = gather_clients(state.client_states, batch.client_ids)
            client_error = cohort.error
        context = compression.context()

        def client(inputs):
            x, y, mask, rng, error = inputs
            if client_update == "gradient":
                value, gradient = minibatch_gradient(loss_fn, params, x, y, mask, rng,
                                                     batch_size=batch_size)
                vector = ravel_pytree(gradient)[0]
            else:
                result = local_train(loss_fn, client_optimizer, params, x, y, mask, rng,
                                     num_epochs=num_epochs, batch_size=batch_size)
                value, vector = result.mean_loss, flat_params - ravel_pytree(result.params)[0]
            message, error = compression.encode(context, vector, error)
            return value, message, error, vector if compression.needs_mean_vector else None

        losses, messages, new_error, vectors = execution.map(
            client, (batch.x, batch.y, batch.mask, batch.rng, client_error))
        weights = client_weights(batch.num_examples, weighting=weighting)
        mean_vector = None if vectors is None else weighted_mean(vectors, weights)
        delta, momentum_buffer, error_buffer = compression.server_step(
            context, weighted_mean(messages, weights), mean_vector, state.momentum, state.error,
            schedule(state.round))
        delta = delta.astype(dtype)
        changed = jnp.where(delta != 0, state.round, state.changed_round)
        download = jnp.full(batch.num_clients, dim * dtype.itemsize, jnp.result_type(float))
        client_states = state.client_states
        if num_clients is not None:
            stale = jnp.sum(state.changed_round[None, :] >= cohort.synced_round[:, None], 1)
            download = jnp.minimum(download, stale * (dtype.itemsize + _INDEX_BYTES))
            synced = FetchSGDClientState(jnp.full(batch.num_clients, state.round, jnp.int32),
                                         new_error)
            client_states = scatter_clients(client_states, batch.client_ids, synced,
                                            batch.num_examples > 0)
        download = download + compression.download_indices * _INDEX_BYTES
        return FetchSGDState(unravel(flat_params - delta), momentum_buffer, error_buffer, changed,
                             client_states, state.round + 1,
                             _metrics(weights, losses, download, delta, upload, dtype))

    def predict(state: FetchSGDState, batch: ClientBatch) -> jax.Array:
        return predict_with(model, state.params, batch.x)

    return Algorithm(init=init, round=round_fn, predict=predict)


def _metrics(weights, losses, download, delta, upload: tuple[int, int],
             dtype) -> dict[str, jax.Array]:
    """The round's metrics plus `update_nonzeros` (coordinates applied) and `update_norm`."""
    floats, indices = upload
    per_client_up = floats * jnp.dtype(dtype).itemsize + indices * _INDEX_BYTES
    return round_metrics(weights, losses, bytes_up=participants_bytes(weights, per_client_up),
                         bytes_down=jnp.sum(download),
                         update_nonzeros=jnp.sum(delta != 0).astype(jnp.int32),
                         update_norm=jnp.linalg.norm(delta).astype(jnp.result_type(float)))


def model_dim(model: Model) -> int:
    """The flattened parameter count d, without running the model."""
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))


def vector_buffers(server_error: bool):
    """Dense `[d]` momentum and, where the server keeps one, a `[d]` error (else `[0]`)."""
    def buffers(dim, dtype):
        return jnp.zeros(dim, dtype), jnp.zeros(dim if server_error else 0, dtype)
    return buffers


def identity_encode(context, vector, client_error):
    del context
    return vector, client_error


def no_context():
    return None


def check_k(k, dim: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= dim:
        raise ValueError(f"k={k!r} is invalid; expected an integer in [1, d={dim}]")


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} {value!r} is unknown; allowed: {', '.join(allowed)}")
