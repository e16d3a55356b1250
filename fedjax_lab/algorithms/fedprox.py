"""FedProx: FedAvg whose clients minimise a proximal objective and keep partial work.

References:
    Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith. "Federated Optimization in Heterogeneous
    Networks." MLSys 2020, arXiv 1812.06127.

Update: client i approximately minimises h_i(w) = F_i(w) + (mu / 2) ||w - w_t||^2 from w_t; each
SGD step is w <- w - eta (grad l(w; batch) + mu (w - w_t)). Stragglers (a fraction s of the
cohort running 1..E-1 epochs) are kept, not dropped; the server averages as in FedAvg.

Built by composition: this is `fedavg` with `proximal_term(mu)` as its local regulariser and
`straggler_policy="keep"`, so with mu = 0 and no stragglers it is FedAvg bit for bit.

Pitfalls avoided (ALGORITHMS.md §2f): the term is squared (flower PR #2210 dropped the square),
anchored at the round-start global model, and differentiated (flower PR #1654 evaluated it on
detached tensors, so it had no gradient).
"""

import dataclasses

import optax

from fedjax_lab.algorithms.fedavg import FedAvgConfig, fedavg, fedavg_options
from fedjax_lab.algorithms.spec import AlgorithmSpec, ClientTraining
from fedjax_lab.core import Algorithm, ClientExecution
from fedjax_lab.core.losses import ProximalTerm
from fedjax_lab.core.types import DataInfo
from fedjax_lab.core.validation import check_number
from fedjax_lab.models import Model
from fedjax_lab.options import non_negative, option


@dataclasses.dataclass(frozen=True)
class FedProxConfig(FedAvgConfig):
    """FedAvg's options plus mu; defaults are Li et al.'s synthetic setting (SGD 0.01, E = 20,
    B = 10, mu = 1). Stragglers' partial work is kept, not dropped."""

    client: ClientTraining = option(ClientTraining(lr=0.01, epochs=20, batch_size=10),
                                    "local training")
    mu: float = option(1.0, "proximal coefficient mu", non_negative, sweepable=True)


def build(config: FedProxConfig, model: Model, data: DataInfo,
          execution: ClientExecution = ClientExecution()) -> Algorithm:
    return config.dp.sampled(fedprox(model, config.client.optimizer(), mu=config.mu,
                                     **fedavg_options(config, execution)), data)


def proximal_term(mu: float) -> ProximalTerm:
    """(mu / 2) ||w - w_t||^2, whose gradient in w is mu (w - w_t)."""
    return ProximalTerm(mu)


def fedprox(model: Model, client_optimizer: optax.GradientTransformation, *, mu: float = 1.0,
            **fedavg_options) -> Algorithm:
    """Builds FedProx.

    Args:
        model: the `(init, apply)` model.
        client_optimizer: optax optimiser of local training.
        mu: proximal coefficient (>= 0); the reference suggests tuning it in
            {0.001, 0.01, 0.1, 0.5, 1}.
        **fedavg_options: every other option of `fedavg` (epochs, batch size, weighting,
            straggler_fraction, server optimiser, execution), except the two FedProx fixes.

    Returns:
        An `Algorithm` whose state is `FedAvgState`.
    """
    check_number("mu", mu, "mu >= 0", lambda value: value >= 0)
    for fixed in ("local_regularizer", "straggler_policy"):
        if fixed in fedavg_options:
            raise ValueError(f"fedprox sets {fixed} itself; pass it to fedavg instead")
    return fedavg(model, client_optimizer, local_regularizer=proximal_term(mu),
                  straggler_policy="keep", **fedavg_options)


SPECS = (AlgorithmSpec(
    "fedprox", FedProxConfig, build,
    paper="Li et al., Federated Optimization in Heterogeneous Networks, MLSys 2020, "
          "arXiv 1812.06127",
    summary="FedAvg whose clients add (mu/2)||w - w_t||^2 and keep stragglers' partial work",
    trains_model_state=True),)
