"""One module per algorithm, each a factory returning an `Algorithm`."""

from fedjax_lab.algorithms.ditto import DittoClientState, DittoState, ditto
from fedjax_lab.algorithms.fedamp import FedAMPState, fedamp
from fedjax_lab.algorithms.fedavg import FedAvgState, fedavg
from fedjax_lab.algorithms.fedgen import FedGenState, fedgen
from fedjax_lab.algorithms.fedgkt import FedGKTClientState, FedGKTState, fedgkt
from fedjax_lab.algorithms.fedmeta import FedMetaState, fedavg_meta, fedmeta
from fedjax_lab.algorithms.fedproto import FedProtoState, fedproto
from fedjax_lab.algorithms.fetchsgd import (FetchSGDState, fetchsgd, local_topk, momentum_sgd,
                                            true_topk)
from fedjax_lab.algorithms.median_mean import MedianMeanState, median_sgd, sign_sgd
from fedjax_lab.algorithms.fedprox import fedprox, proximal_term
from fedjax_lab.algorithms.perfedavg import PerFedAvgState, perfedavg
from fedjax_lab.algorithms.pfedhn import PFedHNState, pfedhn

__all__ = [
    "DittoClientState", "DittoState", "FedAMPState", "FedAvgState", "FedGKTClientState",
    "FedGKTState", "FedGenState", "FedMetaState", "FedProtoState", "FetchSGDState",
    "MedianMeanState", "PFedHNState", "PerFedAvgState", "ditto", "fedamp", "fedavg", "fedavg_meta",
    "fedgen", "fedgkt", "fedmeta", "fedproto", "fedprox", "fetchsgd", "local_topk", "median_sgd",
    "momentum_sgd", "perfedavg", "pfedhn", "proximal_term", "sign_sgd", "true_topk",
]
