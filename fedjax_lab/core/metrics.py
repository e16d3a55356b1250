"""The metrics every round reports, built in one place so every algorithm reports them alike.

A round's `state.metrics` is a dict of scalars (so a scan over rounds stacks them). It holds at
least `REQUIRED_METRICS` (`fedjax_lab.core.types`): `train_loss` (the participants' weighted mean
local loss), `participants` (clients whose work was aggregated), `bytes_up` and `bytes_down`
(communication totals of the round, floats: int32 overflows at a thousand clients of a large
model). `init` calls `round_metrics` on an empty cohort, so the structure never changes between
the initial state and any round, which a `lax.scan` over rounds requires; `initial_metrics` runs
that call as one compiled program.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from fedjax_lab.core.types import REQUIRED_METRICS


def round_metrics(weights: jax.Array, losses: jax.Array, *, bytes_up, bytes_down,
                  **extra) -> dict[str, jax.Array]:
    """The round's metrics from the aggregation weights `[C]` and each client's mean loss `[C]`.

    Args:
        weights: each cohort client's aggregation weight, 0 for clients whose work was not used
            (padding, dropped stragglers); they sum to 1 over the participants.
        losses: each client's mean local training loss.
        bytes_up: total bytes sent by clients this round.
        bytes_down: total bytes sent to clients this round.
        **extra: the algorithm's own scalars (update norms, regulariser weights, ...).
    """
    dtype = jnp.result_type(float)
    metrics = {
        "train_loss": jnp.sum(weights * losses).astype(dtype),
        "participants": jnp.sum(weights > 0).astype(jnp.int32),
        # Straight to floats: a Python int past int32 (a large model's bytes) is refused as int32.
        "bytes_up": jnp.asarray(bytes_up, dtype),
        "bytes_down": jnp.asarray(bytes_down, dtype),
    }
    clash = sorted(set(extra) & set(metrics))
    if clash:
        raise ValueError(f"extra metrics {clash} would replace required ones {REQUIRED_METRICS}")
    metrics.update({name: jnp.asarray(value) for name, value in extra.items()})
    return metrics


def initial_metrics(metrics_fn: Callable[..., dict], *args, static_argnames: tuple[str, ...] = (),
                    **kwargs) -> dict[str, jax.Array]:
    """`metrics_fn(*args, **kwargs)` as one jitted program: how an `init` computes the metrics of
    a round without clients.

    Run eagerly, each of its operations is a program of its own, compiled (or read from the
    persistent cache) in every new process: 15-40 of them per algorithm, about a second of a
    first run. `metrics_fn` must be a module-level function, not a closure of the build: the
    program is cached by the function, so the next build, seed or learning rate of the same
    shapes reuses it where a closure would compile again. The keyword arguments named in
    `static_argnames` (strings, dtypes) are constants of the program; all others are traced.
    """
    return _jitted(metrics_fn, tuple(static_argnames))(*args, **kwargs)


@functools.cache
def _jitted(metrics_fn: Callable[..., dict], static_argnames: tuple[str, ...]) -> Callable:
    return jax.jit(metrics_fn, static_argnames=static_argnames)
