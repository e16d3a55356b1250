"""FetchSGD: sketched client gradients, momentum and error feedback in sketch space; baselines.

References:
    Rothchild, Panda, Ullah, Ivkin, Stoica, Braverman, Gonzalez, Arora. "FetchSGD:
    Communication-Efficient Federated Learning with Sketching." ICML 2020, arXiv 2007.07682
    (Algorithm 1; reference code kiddyboots216/CommEfficient).

Update (Algorithm 1): each sampled client sends the count sketch S(g_i) of one minibatch gradient
at w_t; the server keeps the momentum sketch S_u and error sketch S_e:
    S_u <- rho S_u + sum_i p_i S(g_i);  S_e <- S_e + eta S_u;
    Delta = U_k(S_e);  S_e <- S_e - S(Delta);  w_{t+1} = w_t - Delta,
so S(sum_t Delta_t) + S_e = eta sum_t S_u^t (linearity). Clients are stateless.

Options, each labelled: `error_update="zero"` is the reference code's variant, which zeroes the
buckets of S_e and S_u that S(Delta) touches instead of subtracting (its comment: subtraction
diverged). We see why: coordinates sharing a bucket share its estimate, so top-k tends to pick
m > 1 of them, and subtracting S(Delta) leaves (1 - m) times the bucket's mass instead of 0,
which grows geometrically when k is not small against c (on digits with d = 9610, k = 96 it
diverged with r = 1, c = 2400, and with r = 5, c = 480 it diverged or stalled near chance in 3
of 3 seeds; with r = 5, c = 96100 it tracked true top-k). `client_update="local_steps"` sketches the client's accumulated update w_t - w_i after
local training instead of one gradient (then eta scales that update; 1.0 is FedAvg's scale);
`second_round_candidates=m` is the paper's optional second round of communication: U_m(S_e) only
picks candidate coordinates J, the clients return their exact current gradients at J, and Delta is
the top k over J of (query of the sketch without this round's gradient) + eta * exact gradient;
momentum and error stay sketched, so only the current gradient can be made exact.

Baselines in the same family and state type: `momentum_sgd` (uncompressed, u <- rho u + g,
w <- w - eta u), `true_topk` (uncompressed gradients, top-k with server momentum and error: the
ideal FetchSGD; k = d is `momentum_sgd`), `local_topk` (each client sends the top k of its
gradient, with or without its own error accumulator; server momentum on the sum).

Communication (metrics `bytes_up`, `bytes_down`): a sketch is r * c floats, a dense gradient d
floats, a local top-k message k floats plus k int32 indices (the reference counts values only);
the second round adds m int32 indices down and m floats up per client. Downloads are the model
(d floats) per client, or, with `num_clients`, the reference code's accounting: the coordinates
changed since the client last took part (it caches the model), at min(d floats, n floats + n
int32 indices).

Pitfalls avoided (ALGORITHMS.md §6f): weight decay is part of the client loss, so it is sketched;
all parties share one hash seed; median over rows as in `core/sketch.py`; eta multiplies S_u before
error accumulation (Algorithm 1), not the unsketched update (the reference), which matters under a
learning-rate schedule.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from fedjax_lab.core import (Algorithm, ClientBatch, ClientExecution, client_weights,
                             local_train, model_loss, scatter_clients, gather_clients,
                             weighted_mean)
from fedjax_lab.core.gradients import minibatch_gradient
from fedjax_lab.core.sketch import CountSketch, top_k
from fedjax_lab.models import Model

PyTree = Any
ERROR_UPDATES = ("subtract", "zero")
CLIENT_UPDATES = ("gradient", "local_steps")
_INDEX_BYTES = 4


class FetchSGDState(NamedTuple):
    """State of every algorithm in this module.

    Attributes:
        params: the global model w.
        momentum: S_u `[r, c]` (FetchSGD) or u `[d]` (uncompressed and top-k baselines).
        error: S_e `[r, c]` or e `[d]`; `[0]` where the algorithm keeps no server error.
        changed_round: `[d]` int32, the last round each coordinate changed (-1: never).
        client_states: "synced_round" `[N]` int32 with `num_clients`; "error" `[N, d]` for
            local top-k with error feedback; otherwise empty.
        round: int32. metrics: the round's scalars.
    """

    params: PyTree
    momentum: jax.Array
    error: jax.Array
    changed_round: jax.Array
    client_states: dict[str, jax.Array]
    round: jax.Array
    metrics: dict[str, jax.Array]


class _Compression(NamedTuple):
    """How one algorithm of the family encodes, aggregates and steps (all on flat vectors).

    `context()` is computed once per round (the sketch's hashes) and passed to `encode(context,
    vector, client_error)` and `server_step(context, mean_message, mean_vector, momentum, error,
    eta)`.
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


def fetchsgd(model: Model, *, learning_rate, num_columns: int, k: int, num_rows: int = 5,
             momentum: float = 0.9, error_update: str = "subtract",
             second_round_candidates: int | None = None, sketch_seed: int = 0,
             **client_options) -> Algorithm:
    """Builds FetchSGD.

    Args:
        model: the `(init, apply)` model.
        learning_rate: eta, a float or an optax schedule of the round.
        num_columns: c, buckets per sketch row.
        k: coordinates unsketched per round.
        num_rows: r, sketch rows (the reference uses 5).
        momentum: rho of the server's sketched momentum.
        error_update: "subtract" S(Delta) from S_e (the paper) or "zero" the touched buckets of
            S_e and S_u (the reference code).
        second_round_candidates: m >= k to use the optional second round of communication.
        sketch_seed: the hashes' seed, shared by all clients and the server.
        **client_options: batch_size, client_update, client_optimizer, num_epochs,
            weight_decay, weighting, num_clients, loss, execution (see `_family`).

    Returns:
        An `Algorithm` whose state is `FetchSGDState`.
    """
    dim = _model_dim(model)
    sketch = CountSketch(dim, num_rows, num_columns, sketch_seed)
    _check_k(k, dim)
    _check_choice("error_update", error_update, ERROR_UPDATES)
    if second_round_candidates is not None and not (
            isinstance(second_round_candidates, int) and k <= second_round_candidates <= dim):
        raise ValueError(f"second_round_candidates={second_round_candidates!r} is invalid; "
                         f"expected None or an integer in [k={k}, d={dim}]")
    candidates = second_round_candidates or 0

    def buffers(dim, dtype):
        return sketch.zeros(dtype), sketch.zeros(dtype)

    def encode(table_hashes, vector, client_error):
        return sketch.sketch(vector, table_hashes), client_error

    def server_step(table_hashes, mean_sketch, mean_vector, sketch_momentum, sketch_error, eta):
        sketch_momentum = momentum * sketch_momentum + mean_sketch
        sketch_error = sketch_error + eta * sketch_momentum
        if candidates:
            _, chosen = jax.lax.top_k(jnp.abs(sketch.query(sketch_error, table_hashes)),
                                      candidates)
            without_current = sketch.query(sketch_error - eta * mean_sketch, table_hashes)
            estimate = without_current[chosen] + eta * mean_vector[chosen]
            _, best = jax.lax.top_k(jnp.abs(estimate), k)
            delta = jnp.zeros(dim, estimate.dtype).at[chosen[best]].set(estimate[best])
        else:
            delta = sketch.unsketch(sketch_error, k, table_hashes)
        sketched_delta = sketch.sketch(delta, table_hashes)
        if error_update == "subtract":
            sketch_error = sketch_error - sketched_delta
        else:
            touched = sketched_delta != 0
            sketch_error = jnp.where(touched, 0, sketch_error)
            sketch_momentum = jnp.where(touched, 0, sketch_momentum)
        return delta, sketch_momentum, sketch_error

    compression = _Compression(buffers, encode, server_step, sketch.hashes,
                               upload_floats=num_rows * num_columns + candidates,
                               download_indices=candidates, needs_mean_vector=bool(candidates))
    return _family(model, compression, learning_rate, **client_options)


def momentum_sgd(model: Model, *, learning_rate, momentum: float = 0.9,
                 **client_options) -> Algorithm:
    """Builds uncompressed momentum SGD: u <- rho u + sum_i p_i g_i; w <- w - eta u.

    Args:
        model: the `(init, apply)` model.
        learning_rate: eta, a float or an optax schedule of the round.
        momentum: rho.
        **client_options: as `fetchsgd`.

    Returns:
        An `Algorithm` whose state is `FetchSGDState` (no server error: `error` is `[0]`).
    """
    dim = _model_dim(model)

    def server_step(context, mean_vector, unused, velocity, error, eta):
        del context, unused
        velocity = momentum * velocity + mean_vector
        return eta * velocity, velocity, error

    compression = _Compression(_vector_buffers(server_error=False), _identity_encode,
                               server_step, _no_context, upload_floats=dim)
    return _family(model, compression, learning_rate, **client_options)


def true_topk(model: Model, *, learning_rate, k: int, momentum: float = 0.9,
              error_update: str = "subtract", **client_options) -> Algorithm:
    """Builds true top-k: uncompressed uploads, top k of the server's momentum-and-error vector.

    u <- rho u + sum_i p_i g_i; e <- e + eta u; Delta = top_k(e); e <- e - Delta ("zero" also
    zeroes u on Delta's support, the reference's momentum factor masking).

    Args:
        model: the `(init, apply)` model.
        learning_rate: eta, a float or an optax schedule of the round.
        k: coordinates applied per round.
        momentum: rho.
        error_update: "subtract" (the paper's form) or "zero" (the reference code's).
        **client_options: as `fetchsgd`.

    Returns:
        An `Algorithm` whose state is `FetchSGDState`.
    """
    dim = _model_dim(model)
    _check_k(k, dim)
    _check_choice("error_update", error_update, ERROR_UPDATES)

    def server_step(context, mean_vector, unused, velocity, error, eta):
        del context, unused
        velocity = momentum * velocity + mean_vector
        error = error + eta * velocity
        delta = top_k(error, k)
        if error_update == "zero":
            velocity = jnp.where(delta != 0, 0, velocity)
            error = jnp.where(delta != 0, 0, error)
        else:
            error = error - delta
        return delta, velocity, error

    compression = _Compression(_vector_buffers(server_error=True), _identity_encode,
                               server_step, _no_context, upload_floats=dim)
    return _family(model, compression, learning_rate, **client_options)


def local_topk(model: Model, *, learning_rate, k: int, momentum: float = 0.9,
               error_feedback: bool = True, **client_options) -> Algorithm:
    """Builds local top-k: client i sends top_k(a_i), a_i = e_i + g_i with error feedback
    (then e_i <- a_i - top_k(a_i)) or a_i = g_i without; the server steps with momentum on the
    weighted mean, u <- rho u + sum_i p_i top_k(a_i), w <- w - eta u (the reference code's
    local top-k with local error and server momentum).

    Args:
        model: the `(init, apply)` model.
        learning_rate: eta, a float or an optax schedule of the round.
        k: coordinates each client sends.
        momentum: rho of the server momentum.
        error_feedback: keep each client's unsent remainder e_i; needs `num_clients` in
            `client_options`, since the errors persist per client (`client_states["error"]`).
        **client_options: as `fetchsgd`.

    Returns:
        An `Algorithm` whose state is `FetchSGDState`.
    """
    dim = _model_dim(model)
    _check_k(k, dim)
    if error_feedback and client_options.get("num_clients") is None:
        raise ValueError("local_topk with error_feedback=True needs num_clients (each client "
                         "keeps its error between rounds)")

    def encode(context, vector, client_error):
        del context
        accumulated = client_error + vector if error_feedback else vector
        message = top_k(accumulated, k)
        return message, accumulated - message if error_feedback else client_error

    def server_step(context, mean_message, unused, velocity, error, eta):
        del context, unused
        velocity = momentum * velocity + mean_message
        return eta * velocity, velocity, error

    compression = _Compression(_vector_buffers(server_error=False), encode, server_step,
                               _no_context, upload_floats=k, upload_indices=k,
                               client_error=error_feedback)
    return _family(model, compression, learning_rate, **client_options)


def _family(model: Model, compression: _Compression, learning_rate, *,
            batch_size: int | None = None, client_update: str = "gradient",
            client_optimizer: optax.GradientTransformation | None = None, num_epochs: int = 1,
            weight_decay: float = 0.0, weighting: str = "num_examples",
            num_clients: int | None = None, loss=None,
            execution: ClientExecution = ClientExecution()) -> Algorithm:
    """The round shared by the family.

    Args:
        batch_size: the client's minibatch (None: all its examples, the paper's 5-image clients).
        client_update: "gradient" (one minibatch gradient, the paper's main mode) or
            "local_steps" (`num_epochs` epochs of `client_optimizer`, sending w_t - w_i).
        weight_decay: lambda of a (lambda / 2) ||w||^2 term in the client loss.
        weighting: "num_examples" or "uniform" weights p_i of the clients' messages.
        num_clients: the population size; enables catch-up download accounting.
        loss: `loss(params, x, y, mask, rng)`; default the model's cross-entropy.
        execution: how clients run.
    """
    _check_choice("client_update", client_update, CLIENT_UPDATES)
    if not callable(learning_rate) and not learning_rate > 0:
        raise ValueError(f"learning_rate={learning_rate!r} is invalid; expected a positive "
                         "number or an optax schedule")
    if client_update == "local_steps" and client_optimizer is None:
        raise ValueError("client_update='local_steps' needs client_optimizer")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay={weight_decay!r} is invalid; expected >= 0")
    if num_clients is not None and (isinstance(num_clients, bool)
                                    or not isinstance(num_clients, int) or num_clients < 1):
        raise ValueError(f"num_clients={num_clients!r} is invalid; expected a positive integer")
    client_weights(jnp.ones(1), weighting=weighting)
    base_loss = model_loss(model.apply) if loss is None else loss

    def loss_fn(params, x, y, mask, rng):
        decay = 0.5 * weight_decay * optax.tree.norm(params, squared=True) if weight_decay else 0
        return base_loss(params, x, y, mask, rng) + decay

    dim = _model_dim(model)
    schedule = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

    def init(key: jax.Array) -> FetchSGDState:
        params = model.init(key)
        dtype = ravel_pytree(params)[0].dtype
        momentum_buffer, error_buffer = compression.buffers(dim, dtype)
        client_states = {}
        if num_clients is not None:
            client_states["synced_round"] = jnp.zeros(num_clients, jnp.int32)
        if compression.client_error:
            client_states["error"] = jnp.zeros((num_clients, dim), dtype)
        empty = jnp.zeros(0)
        return FetchSGDState(params, momentum_buffer, error_buffer,
                             jnp.full(dim, -1, jnp.int32), client_states,
                             jnp.zeros((), jnp.int32),
                             _metrics(empty, empty, empty, jnp.zeros(dim, dtype)))

    def round_fn(state: FetchSGDState, batch: ClientBatch) -> FetchSGDState:
        params = state.params
        flat_params, unravel = ravel_pytree(params)
        dtype = flat_params.dtype
        itemsize = dtype.itemsize
        cohort = gather_clients(state.client_states, batch.client_ids)
        client_error = cohort.get("error", jnp.zeros((batch.num_clients, 0), dtype))
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
        valid = batch.num_examples > 0
        download = jnp.full(batch.num_clients, dim * itemsize, jnp.result_type(float))
        if num_clients is not None:
            stale = jnp.sum(state.changed_round[None, :] >= cohort["synced_round"][:, None], 1)
            download = jnp.minimum(download, stale * (itemsize + _INDEX_BYTES))
            cohort["synced_round"] = jnp.full(batch.num_clients, state.round, jnp.int32)
        if compression.client_error:
            cohort["error"] = jnp.where(valid[:, None], new_error, client_error)
        download = download + compression.download_indices * _INDEX_BYTES
        upload = (compression.upload_floats * itemsize
                  + compression.upload_indices * _INDEX_BYTES)
        client_states = (scatter_clients(state.client_states, batch.client_ids, cohort, valid)
                         if cohort else cohort)
        return FetchSGDState(unravel(flat_params - delta), momentum_buffer, error_buffer, changed,
                             client_states, state.round + 1,
                             _metrics(weights, losses, download, delta, upload))

    def predict(state: FetchSGDState, batch: ClientBatch) -> jax.Array:
        num, examples = batch.x.shape[:2]
        x = batch.x.reshape((num * examples,) + batch.x.shape[2:])
        return model.apply(state.params, x).reshape(num, examples, -1)

    return Algorithm(init=init, round=round_fn, predict=predict)


def _metrics(weights, losses, download, delta, upload: int = 0) -> dict[str, jax.Array]:
    """The round's scalars; `init` calls it on an empty round so the structure never changes."""
    dtype = jnp.result_type(float)
    participants = jnp.sum(weights > 0)
    return {
        "bytes_down": jnp.sum(download).astype(dtype),
        "bytes_up": (participants * upload).astype(dtype),
        "train_loss": jnp.sum(weights * losses).astype(dtype),
        "participants": participants.astype(jnp.int32),
        "update_nonzeros": jnp.sum(delta != 0).astype(jnp.int32),
        "update_norm": jnp.linalg.norm(delta).astype(dtype),
    }


def _model_dim(model: Model) -> int:
    """The flattened parameter count d, without running the model."""
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))


def _vector_buffers(server_error: bool):
    def buffers(dim, dtype):
        return jnp.zeros(dim, dtype), jnp.zeros(dim if server_error else 0, dtype)
    return buffers


def _identity_encode(context, vector, client_error):
    del context
    return vector, client_error


def _no_context():
    return None


def _check_k(k, dim: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= dim:
        raise ValueError(f"k={k!r} is invalid; expected an integer in [1, d={dim}]")


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} {value!r} is unknown; allowed: {', '.join(allowed)}")
