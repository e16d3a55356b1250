"""One module per algorithm, each a factory returning an `Algorithm`."""

from fedjax_lab.algorithms.ditto import DittoClientState, DittoState, ditto
from fedjax_lab.algorithms.fedamp import FedAMPState, fedamp
from fedjax_lab.algorithms.fedavg import FedAvgState, fedavg
from fedjax_lab.algorithms.fedgen import FedGenState, fedgen
from fedjax_lab.algorithms.fedgkt import FedGKTClientState, FedGKTState, fedgkt
from fedjax_lab.algorithms.fedmeta import FedMetaState, fedavg_meta, fedmeta
from fedjax_lab.algorithms.fedproto import FedProtoState, fedproto
from fedjax_lab.algorithms.fedprox import fedprox, proximal_term
from fedjax_lab.algorithms.perfedavg import PerFedAvgState, perfedavg
from fedjax_lab.algorithms.pfedhn import PFedHNState, pfedhn

__all__ = [
    "DittoClientState", "DittoState", "FedAMPState", "FedAvgState", "FedGKTClientState",
    "FedGKTState", "FedGenState", "FedMetaState", "FedProtoState", "PFedHNState", "PerFedAvgState",
    "ditto", "fedamp", "fedavg", "fedavg_meta", "fedgen", "fedgkt", "fedmeta", "fedproto",
    "fedprox", "perfedavg", "pfedhn", "proximal_term",
]
