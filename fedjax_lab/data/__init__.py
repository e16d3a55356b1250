"""Federated data: host-side client containers, partitions and dataset generators."""

from fedjax_lab.data.digits import digits
from fedjax_lab.data.federated import (ClientData, FederatedDataset, PaddedClients,
                                       train_test_split_per_client)
from fedjax_lab.data.partition import dirichlet_partition, iid_partition
from fedjax_lab.data.synthetic import fedprox_synthetic

__all__ = [
    "ClientData",
    "FederatedDataset",
    "PaddedClients",
    "digits",
    "dirichlet_partition",
    "fedprox_synthetic",
    "iid_partition",
    "train_test_split_per_client",
]
