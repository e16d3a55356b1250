"""Federated data: host-side client containers, partitions, data sets, loaders and sampling.

The LEAF and HDF5 loaders (`fedjax_lab.data.leaf`, `fedjax_lab.data.h5`) and MNIST-1D
(`fedjax_lab.data.mnist1d`) are imported from their modules, so that h5py and mnist1d stay
optional until used.
"""

from fedjax_lab.data.digits import digits
from fedjax_lab.data.federated import (ClientData, FederatedDataset, PaddedClients,
                                       split_clients, train_test_split_per_client)
from fedjax_lab.data.partition import (dirichlet_partition, iid_partition,
                                       quantity_skew_partition)
from fedjax_lab.data.partitioned import PARTITIONS, partition_examples, partitioned_dataset
from fedjax_lab.data.pathological import (class_partition, shard_partition,
                                          ways_shots_partition)
from fedjax_lab.data.sampling import (check_cohort_size, cohort_batch, cohort_schedule,
                                      sample_cohort, size_weighted_probabilities)
from fedjax_lab.data.stream import (HostCohortStream, PackedClients, pack_clients,
                                    pack_partition)
from fedjax_lab.data.synthetic import fedprox_synthetic, leaf_synthetic

__all__ = [
    "PARTITIONS",
    "ClientData",
    "FederatedDataset",
    "HostCohortStream",
    "PackedClients",
    "PaddedClients",
    "check_cohort_size",
    "class_partition",
    "cohort_batch",
    "cohort_schedule",
    "digits",
    "dirichlet_partition",
    "fedprox_synthetic",
    "iid_partition",
    "leaf_synthetic",
    "pack_clients",
    "pack_partition",
    "partition_examples",
    "partitioned_dataset",
    "quantity_skew_partition",
    "sample_cohort",
    "shard_partition",
    "size_weighted_probabilities",
    "split_clients",
    "train_test_split_per_client",
    "ways_shots_partition",
]
