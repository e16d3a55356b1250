"""FetchSGD's baselines: uncompressed momentum SGD, true top-k and local top-k.

References:
    Rothchild, Panda, Ullah, Ivkin, Stoica, Braverman, Gonzalez, Arora. "FetchSGD:
    Communication-Efficient Federated Learning with Sketching." ICML 2020, arXiv 2007.07682
    (the baselines of its experiments; reference code kiddyboots216/CommEfficient).
    Stich, Cordonnier, Jaggi. "Sparsified SGD with Memory." NeurIPS 2018, arXiv 1809.07599
    (top-k with error feedback).

Updates, all on flat vectors with client gradients g_i and weights p_i:
- `momentum_sgd`: u <- rho u + sum_i p_i g_i; w <- w - eta u (uncompressed uploads).
- `true_topk`: the same u, then e <- e + eta u, Delta = top_k(e), e <- e - Delta,
  w <- w - Delta: FetchSGD without the sketch (its ideal); k = d is `momentum_sgd`.
- `local_topk`: each client sends top_k(a_i), a_i = e_i + g_i with error feedback (then
  e_i <- a_i - top_k(a_i), kept per client) or a_i = g_i without; the server steps with momentum
  on the weighted mean, u <- rho u + sum_i p_i top_k(a_i), w <- w - eta u.
They share FetchSGD's round, state, clients' options and communication accounting
(compressed.py), so the comparison changes only the compression.
"""

import dataclasses

import jax.numpy as jnp

from fedjax_lab.algorithms.compressed import (ERROR_UPDATES, Compression, CompressedSGDConfig,
                                              check_choice, check_k, compressed_sgd,
                                              family_options, fraction_of, identity_encode,
                                              model_dim, no_context, unit_fraction,
                                              vector_buffers)
from fedjax_lab.algorithms.spec import AlgorithmSpec
from fedjax_lab.core import Algorithm, ClientExecution
from fedjax_lab.core.sketch import top_k
from fedjax_lab.core.types import DataInfo
from fedjax_lab.models import Model
from fedjax_lab.options import one_of, option

_PAPER = ("Rothchild et al., FetchSGD: Communication-Efficient Federated Learning with "
          "Sketching, ICML 2020, arXiv 2007.07682 (baseline)")


@dataclasses.dataclass(frozen=True)
class MomentumSGDConfig(CompressedSGDConfig):
    """Uncompressed momentum SGD, FetchSGD's reference point: rho = 0.9 and weight decay 5e-4 as
    in the paper's runs, one gradient of all of a client's examples."""


@dataclasses.dataclass(frozen=True)
class TrueTopKConfig(CompressedSGDConfig):
    """True top-k with FetchSGD's defaults: k = 0.0077 d (the paper's 50,000 of ResNet-9's
    6.5M), and the reference code's zeroing, as in the paper's runs."""

    k_fraction: float = option(0.0077, "coordinates k applied per round, as a fraction of the "
                               "parameter count d", unit_fraction)
    error_update: str = option("zero", "subtract Delta from e (the paper's form) or zero e and "
                               "u on Delta's support (the reference code)",
                               one_of(*ERROR_UPDATES))


@dataclasses.dataclass(frozen=True)
class LocalTopKConfig(CompressedSGDConfig):
    """Local top-k at FetchSGD's k = 0.0077 d, with each client's error feedback (the reference
    code's local top-k with local error) and server momentum 0.9."""

    k_fraction: float = option(0.0077, "coordinates k each client sends, as a fraction of the "
                               "parameter count d", unit_fraction)
    error_feedback: bool = option(True, "keep each client's unsent remainder e_i")


def build_momentum_sgd(config: MomentumSGDConfig, model: Model, data: DataInfo,
                       execution: ClientExecution = ClientExecution()) -> Algorithm:
    return momentum_sgd(model, momentum=config.momentum,
                        **family_options(config, data, execution))


def build_true_topk(config: TrueTopKConfig, model: Model, data: DataInfo,
                    execution: ClientExecution = ClientExecution()) -> Algorithm:
    return true_topk(model, k=fraction_of(model_dim(model), config.k_fraction),
                     momentum=config.momentum, error_update=config.error_update,
                     **family_options(config, data, execution))


def build_local_topk(config: LocalTopKConfig, model: Model, data: DataInfo,
                     execution: ClientExecution = ClientExecution()) -> Algorithm:
    return local_topk(model, k=fraction_of(model_dim(model), config.k_fraction),
                      momentum=config.momentum, error_feedback=config.error_feedback,
                      **family_options(config, data, execution))


def momentum_sgd(model: Model, *, learning_rate, momentum: float = 0.9,
                 **client_options) -> Algorithm:
    """Builds uncompressed momentum SGD: u <- rho u + sum_i p_i g_i; w <- w - eta u.

    Args:
        model: the `(init, apply)` model.
        learning_rate: eta, a float or an optax schedule of the round.
        momentum: rho.
        **client_options: as `fedjax_lab.algorithms.compressed.compressed_sgd`.

    Returns:
        An `Algorithm` whose state is `FetchSGDState` (no server error: `error` is `[0]`).
    """
    dim = model_dim(model)

    def server_step(context, mean_vector, unused, velocity, error, eta):
        del context, unused
        velocity = momentum * velocity + mean_vector
        return eta * velocity, velocity, error

    compression = Compression(vector_buffers(server_error=False), identity_encode, server_step,
                              no_context, upload_floats=dim)
    return compressed_sgd(model, compression, learning_rate, **client_options)


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
        **client_options: as `fedjax_lab.algorithms.compressed.compressed_sgd`.

    Returns:
        An `Algorithm` whose state is `FetchSGDState`.
    """
    dim = model_dim(model)
    check_k(k, dim)
    check_choice("error_update", error_update, ERROR_UPDATES)

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

    compression = Compression(vector_buffers(server_error=True), identity_encode, server_step,
                              no_context, upload_floats=dim)
    return compressed_sgd(model, compression, learning_rate, **client_options)


def local_topk(model: Model, *, learning_rate, k: int, momentum: float = 0.9,
               error_feedback: bool = True, **client_options) -> Algorithm:
    """Builds local top-k (the reference code's local top-k with local error and server momentum).

    Args:
        model: the `(init, apply)` model.
        learning_rate: eta, a float or an optax schedule of the round.
        k: coordinates each client sends.
        momentum: rho of the server momentum.
        error_feedback: keep each client's unsent remainder e_i; needs `num_clients` in
            `client_options`, since the errors persist per client (`client_states.error`).
        **client_options: as `fedjax_lab.algorithms.compressed.compressed_sgd`.

    Returns:
        An `Algorithm` whose state is `FetchSGDState`.
    """
    dim = model_dim(model)
    check_k(k, dim)

    def encode(context, vector, client_error):
        del context
        accumulated = client_error + vector if error_feedback else vector
        message = top_k(accumulated, k)
        return message, accumulated - message if error_feedback else client_error

    def server_step(context, mean_message, unused, velocity, error, eta):
        del context, unused
        velocity = momentum * velocity + mean_message
        return eta * velocity, velocity, error

    compression = Compression(vector_buffers(server_error=False), encode, server_step,
                              no_context, upload_floats=k, upload_indices=k,
                              client_error=error_feedback)
    return compressed_sgd(model, compression, learning_rate, **client_options)


SPECS = (
    AlgorithmSpec("momentum_sgd", MomentumSGDConfig, build_momentum_sgd, paper=_PAPER,
                  summary="uncompressed gradients, server momentum (FetchSGD's reference "
                          "point)"),
    AlgorithmSpec("true_topk", TrueTopKConfig, build_true_topk, paper=_PAPER,
                  summary="uncompressed gradients, the server applies the top k of its "
                          "momentum and error (FetchSGD without the sketch)"),
    AlgorithmSpec("local_topk", LocalTopKConfig, build_local_topk, paper=_PAPER,
                  summary="each client sends its top k, with its own error feedback; server "
                          "momentum"),
)
