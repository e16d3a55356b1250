"""One module per algorithm, each a factory returning an `Algorithm`."""

from fedjax_lab.algorithms.fedavg import FedAvgState, fedavg
from fedjax_lab.algorithms.fedprox import fedprox, proximal_term

__all__ = ["FedAvgState", "fedavg", "fedprox", "proximal_term"]
