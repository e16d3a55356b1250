"""FedAvgM, FedAdagrad, FedAdam and FedYogi: FedAvg under a named server optimiser.

References:
    Hsu, Qi, Brown. "Measuring the Effects of Non-Identical Data Distribution for Federated
    Visual Classification." arXiv 1909.06335, 2019 (FedAvgM).
    Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan. "Adaptive Federated
    Optimization." ICLR 2021, arXiv 2003.00295 (FedAdagrad, FedAdam, FedYogi: Algorithm 2).

Update: clients train as in FedAvg; the server treats g_t = sum_i p_i (x_t - x_i) as a gradient.
FedAvgM: v <- beta v + g_t, x <- x - lr v. FedAdagrad/FedAdam/FedYogi: first moment m with b1,
second moment v (sum of squares / exponential average with b2 / Yogi's additive rule) from
v_{-1} = tau^2, x <- x - lr m / (sqrt(v) + tau), without bias correction
(`fedjax_lab.core.server_optimizers`).

Each is a preset: FedAvg's config whose `server` defaults name the optimiser and its rate, so
`--algorithm fedadam` is `--algorithm fedavg --algorithm.server.optimizer fedadam
--algorithm.server.lr 0.03`, and every FedAvg option (weighting, stragglers, DP) applies. The papers tune the server rate per task
(Reddi et al. grid-search it and tau per data set, b1 = 0.9 and b2 = 0.99 throughout); the
defaults here are from a sweep of it on the default job (`fedjax-lab sweep --algorithm NAME
--algorithm.server.lr ...`: digits, 200 rounds, tau 1e-3, seed 0), final test accuracy
(FedAvg: 0.9738):

    server lr     0.003   0.01    0.03    0.1     0.3
    fedavgm       -       0.9344  0.9580  0.9738  0.9738   (momentum 0.9)
    fedadagrad    0.9580  0.9738  0.9764  0.9816  0.9764
    fedadam       0.9711  0.9738  0.9764  0.9790  0.8898
    fedyogi       -       0.9738  0.9764  0.9843  0.9501

so FedAvgM runs at 0.1 (effective rate lr / (1 - beta) = 1, plain averaging's), FedAdagrad at
0.1, and FedAdam and FedYogi at 0.03, a factor 10 below where they degrade.
"""

import dataclasses

from fedjax_lab.algorithms.fedavg import FedAvgConfig, build
from fedjax_lab.algorithms.spec import AlgorithmSpec, ServerOptimizer
from fedjax_lab.options import option

_HSU = ("Hsu, Qi, Brown, Measuring the Effects of Non-Identical Data Distribution for Federated "
        "Visual Classification, arXiv 1909.06335")
_REDDI = "Reddi et al., Adaptive Federated Optimization, ICLR 2021, arXiv 2003.00295"


@dataclasses.dataclass(frozen=True)
class FedAvgMConfig(FedAvgConfig):
    """FedAvg with server momentum beta = 0.9 at server rate 0.1 (effective rate 1)."""

    server: ServerOptimizer = option(ServerOptimizer("sgd", lr=0.1, momentum=0.9),
                                     "server optimiser on the mean delta")


@dataclasses.dataclass(frozen=True)
class FedAdagradConfig(FedAvgConfig):
    """FedAvg with FedAdagrad at server rate 0.1, b1 = 0.9, tau = 1e-3."""

    server: ServerOptimizer = option(ServerOptimizer("fedadagrad", lr=0.1),
                                     "server optimiser on the mean delta")


@dataclasses.dataclass(frozen=True)
class FedAdamConfig(FedAvgConfig):
    """FedAvg with FedAdam at server rate 0.03, b1 = 0.9, b2 = 0.99, tau = 1e-3."""

    server: ServerOptimizer = option(ServerOptimizer("fedadam", lr=0.03),
                                     "server optimiser on the mean delta")


@dataclasses.dataclass(frozen=True)
class FedYogiConfig(FedAvgConfig):
    """FedAvg with FedYogi at server rate 0.03, b1 = 0.9, b2 = 0.99, tau = 1e-3."""

    server: ServerOptimizer = option(ServerOptimizer("fedyogi", lr=0.03),
                                     "server optimiser on the mean delta")


SPECS = (
    AlgorithmSpec("fedavgm", FedAvgMConfig, build, paper=_HSU,
                  summary="FedAvg with server momentum: v <- beta v + mean delta, w <- w - lr v",
                  trains_model_state=True),
    AlgorithmSpec("fedadagrad", FedAdagradConfig, build, paper=_REDDI,
                  summary="FedAvg with Adagrad on the server (Algorithm 2, tau outside the root)",
                  trains_model_state=True),
    AlgorithmSpec("fedadam", FedAdamConfig, build, paper=_REDDI,
                  summary="FedAvg with Adam on the server (Algorithm 2: no bias correction, "
                          "v from tau^2)",
                  trains_model_state=True),
    AlgorithmSpec("fedyogi", FedYogiConfig, build, paper=_REDDI,
                  summary="FedAvg with Yogi on the server (Algorithm 2: additive second moment)",
                  trains_model_state=True),
)
