"""Federated data: host-side client containers, partitions, data sets, loaders and sampling.

`REGISTRY` (`fedjax_lab.data.registry`) maps each data set a run can name to its config and
loader; `describe` summarises a loaded data set. `dialects` generates the default text data set;
it and the text loaders give next-token sequences (`y [n, T]`). The LEAF and HDF5 loaders
(`fedjax_lab.data.leaf`, `fedjax_lab.data.h5`) and MNIST-1D (`fedjax_lab.data.mnist1d`) import
h5py and mnist1d only when called, so both stay optional until used.
"""

from fedjax_lab.data.describe import describe, format_description, plot_label_distribution
from fedjax_lab.data.dialects import dialects
from fedjax_lab.data.digits import digits
from fedjax_lab.data.federated import (ClientData, FederatedDataset, PaddedClients,
                                       split_clients, train_test_split_per_client)
from fedjax_lab.data.partition import (dirichlet_partition, iid_partition,
                                       quantity_skew_partition)
from fedjax_lab.data.partitioned import (PARTITION_OPTIONS, PARTITIONS, partition_examples,
                                         partitioned_dataset)
from fedjax_lab.data.pathological import (class_partition, shard_partition,
                                          ways_shots_partition)
from fedjax_lab.data.registry import REGISTRY, DataSpec, get_dataset, load_dataset
from fedjax_lab.data.sampling import (check_cohort_size, cohort_batch, cohort_schedule,
                                      sample_cohort, size_weighted_probabilities)
from fedjax_lab.data.stream import (HostCohortStream, PackedClients, pack_clients,
                                    pack_partition)
from fedjax_lab.data.synthetic import fedprox_synthetic, leaf_synthetic

__all__ = [
    "PARTITIONS",
    "PARTITION_OPTIONS",
    "REGISTRY",
    "ClientData",
    "DataSpec",
    "FederatedDataset",
    "HostCohortStream",
    "PackedClients",
    "PaddedClients",
    "check_cohort_size",
    "class_partition",
    "cohort_batch",
    "cohort_schedule",
    "describe",
    "dialects",
    "digits",
    "dirichlet_partition",
    "fedprox_synthetic",
    "format_description",
    "get_dataset",
    "iid_partition",
    "leaf_synthetic",
    "load_dataset",
    "pack_clients",
    "pack_partition",
    "partition_examples",
    "partitioned_dataset",
    "plot_label_distribution",
    "quantity_skew_partition",
    "sample_cohort",
    "shard_partition",
    "size_weighted_probabilities",
    "split_clients",
    "train_test_split_per_client",
    "ways_shots_partition",
]
