"""FetchSGD: sketched client gradients, with momentum and error feedback in sketch space.

References:
    Rothchild, Panda, Ullah, Ivkin, Stoica, Braverman, Gonzalez, Arora. "FetchSGD:
    Communication-Efficient Federated Learning with Sketching." ICML 2020, arXiv 2007.07682
    (Algorithm 1; reference code kiddyboots216/CommEfficient).

Update (Algorithm 1): each sampled client sends the count sketch S(g_i) of one minibatch gradient
at w_t; the server keeps the momentum sketch S_u and error sketch S_e:
    S_u <- rho S_u + sum_i p_i S(g_i);  S_e <- S_e + eta S_u;
    Delta = U_k(S_e);  S_e <- S_e - S(Delta);  w_{t+1} = w_t - Delta,
so S(sum_t Delta_t) + S_e = eta sum_t S_u^t (linearity). Clients are stateless. The round, the
clients' options and the communication accounting are shared with the top-k baselines
(compressed.py, topk.py).

Options, each labelled: `error_update="zero"` is the reference code's variant, which zeroes the
buckets of S_e and S_u that S(Delta) touches instead of subtracting (its comment: subtraction
diverged). We see why: coordinates sharing a bucket share its estimate, so top-k tends to pick
m > 1 of them, and subtracting S(Delta) leaves (1 - m) times the bucket's mass instead of 0,
which grows geometrically when k is not small against c (on digits with d = 9610, k = 96 it
diverged with r = 1, c = 2400, and with r = 5, c = 480 it diverged or stalled near chance in 3
of 3 seeds; with r = 5, c = 96100 it tracked true top-k). `second_round_candidates=m` is the
paper's optional second round of communication: U_m(S_e) only picks candidate coordinates J, the
clients return their exact current gradients at J, and Delta is the top k over J of (query of the
sketch without this round's gradient) + eta * exact gradient; momentum and error stay sketched,
so only the current gradient can be made exact.

Pitfalls avoided (ALGORITHMS.md §6f): all parties share one hash seed, a constant of the protocol
(the hashes are a pure function of it, recomputed inside each round, never a key kept in the
state); median over rows as in `core/sketch.py`; eta multiplies S_u before error accumulation
(Algorithm 1), not the unsketched update (the reference), which matters under a learning-rate
schedule.
"""

import dataclasses

import jax
import jax.numpy as jnp

from fedjax_lab.algorithms.compressed import (ERROR_UPDATES, Compression, CompressedSGDConfig,
                                              check_choice, check_k, compressed_sgd,
                                              family_options, fraction_of, model_dim,
                                              unit_fraction)
from fedjax_lab.algorithms.spec import AlgorithmSpec
from fedjax_lab.core import Algorithm, ClientExecution
from fedjax_lab.core.sketch import CountSketch
from fedjax_lab.core.types import DataInfo
from fedjax_lab.models import Model
from fedjax_lab.options import one_of, option, optional, positive, positive_int


def _at_least_one(value) -> str | None:
    return None if value >= 1 else "expected a number >= 1"


@dataclasses.dataclass(frozen=True)
class FetchSGDConfig(CompressedSGDConfig):
    """FetchSGD's options. The sketch is the paper's ResNet-9 shape relative to its size
    (d = 6.5M, r = 5 rows, c = 500,000 columns, k = 50,000: c = 0.077 d, k = 0.0077 d), with
    rho = 0.9 and weight decay 5e-4; the paper's runs used the reference code, which zeroes the
    touched buckets (`error_update="zero"`, the default here). Algorithm 1's subtraction diverges
    at this compression on digits (see the module docstring); on the default MLP (d = 55,210)
    the sketch is 5 x 4,251 and k = 425."""

    column_fraction: float = option(0.077, "sketch columns c as a fraction of the parameter "
                                    "count d", positive)
    k_fraction: float = option(0.0077, "coordinates k applied per round, as a fraction of d",
                               unit_fraction)
    num_rows: int = option(5, "sketch rows r", positive_int)
    error_update: str = option("zero", "subtract S(Delta) from S_e (Algorithm 1) or zero the "
                               "touched buckets of S_e and S_u (the reference code)",
                               one_of(*ERROR_UPDATES))
    second_round: float | None = option(None, "optional second round of communication: "
                                        "m = second_round * k candidate coordinates; none = "
                                        "one round (the paper's main mode)",
                                        optional(_at_least_one))
    sketch_seed: int = option(0, "the hashes' seed, shared by all clients and the server")


def build(config: FetchSGDConfig, model: Model, data: DataInfo,
          execution: ClientExecution = ClientExecution()) -> Algorithm:
    dim = model_dim(model)
    k = fraction_of(dim, config.k_fraction)
    candidates = (None if config.second_round is None
                  else min(max(round(config.second_round * k), k), dim))
    return fetchsgd(model, num_columns=fraction_of(dim, config.column_fraction), k=k,
                    num_rows=config.num_rows, momentum=config.momentum,
                    error_update=config.error_update, second_round_candidates=candidates,
                    sketch_seed=config.sketch_seed, **family_options(config, data, execution))


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
            weight_decay, weighting, num_clients, loss, execution (see
            `fedjax_lab.algorithms.compressed.compressed_sgd`).

    Returns:
        An `Algorithm` whose state is `FetchSGDState`.
    """
    dim = model_dim(model)
    sketch = CountSketch(dim, num_rows, num_columns, sketch_seed)
    check_k(k, dim)
    check_choice("error_update", error_update, ERROR_UPDATES)
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

    compression = Compression(buffers, encode, server_step, sketch.hashes,
                              upload_floats=num_rows * num_columns + candidates,
                              download_indices=candidates, needs_mean_vector=bool(candidates))
    return compressed_sgd(model, compression, learning_rate, **client_options)


SPECS = (AlgorithmSpec(
    "fetchsgd", FetchSGDConfig, build,
    paper="Rothchild et al., FetchSGD: Communication-Efficient Federated Learning with "
          "Sketching, ICML 2020, arXiv 2007.07682",
    summary="clients send count sketches of one gradient; the server keeps momentum and error "
            "in sketch space and applies the top k"),)
