"""One module per algorithm, each a factory returning an `Algorithm`, and the registry of them.

`REGISTRY` maps each registered name to its `AlgorithmSpec` (config dataclass, builder, paper);
it is built from the `SPECS` each module declares, in the order of `_MODULES`.
"""

import importlib

from fedjax_lab.algorithms.spec import AlgorithmSpec
from fedjax_lab.options import OptionError

from fedjax_lab.algorithms.ditto import DittoClientState, DittoState, ditto
from fedjax_lab.algorithms.fedamp import FedAMPState, fedamp
from fedjax_lab.algorithms.fedavg import FedAvgState, fedavg
from fedjax_lab.algorithms.fedgen import FedGenState, fedgen
from fedjax_lab.algorithms.fedgkt import FedGKTClientState, FedGKTState, fedgkt
from fedjax_lab.algorithms.fedmeta import FedMetaState, fedavg_meta, fedmeta
from fedjax_lab.algorithms.fedproto import FedProtoState, fedproto
from fedjax_lab.algorithms.compressed import FetchSGDState
from fedjax_lab.algorithms.fetchsgd import fetchsgd
from fedjax_lab.algorithms.topk import local_topk, momentum_sgd, true_topk
from fedjax_lab.algorithms.median_mean import MedianMeanState, median_sgd, sign_sgd
from fedjax_lab.algorithms.fedprox import fedprox, proximal_term
from fedjax_lab.algorithms.perfedavg import PerFedAvgState, perfedavg
from fedjax_lab.algorithms.pfedhn import PFedHNState, pfedhn

_MODULES = ("fedavg", "fedprox", "fedopt", "median_mean", "fetchsgd", "topk", "ditto", "fedamp",
            "fedproto", "pfedhn", "fedmeta", "perfedavg", "fedgkt", "fedgen", "feddyn", "fednova",
            "scaffold", "qffl", "ifca", "apfl", "partial_sharing", "moon", "pfedme")
REGISTRY: dict[str, AlgorithmSpec] = {
    spec.name: spec
    for module in _MODULES
    for spec in importlib.import_module(f"fedjax_lab.algorithms.{module}").SPECS}


def get_algorithm(name: str) -> AlgorithmSpec:
    """The registered algorithm `name`, or an `OptionError` listing the registered ones."""
    if name not in REGISTRY:
        raise OptionError("algorithm.name", name, f"unknown algorithm; allowed: "
                          f"{', '.join(REGISTRY)}")
    return REGISTRY[name]


__all__ = [
    "REGISTRY", "AlgorithmSpec", "get_algorithm",
    "DittoClientState", "DittoState", "FedAMPState", "FedAvgState", "FedGKTClientState",
    "FedGKTState", "FedGenState", "FedMetaState", "FedProtoState", "FetchSGDState",
    "MedianMeanState", "PFedHNState", "PerFedAvgState", "ditto", "fedamp", "fedavg", "fedavg_meta",
    "fedgen", "fedgkt", "fedmeta", "fedproto", "fedprox", "fetchsgd", "local_topk", "median_sgd",
    "momentum_sgd", "perfedavg", "pfedhn", "proximal_term", "sign_sgd", "true_topk",
]
