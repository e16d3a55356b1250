"""The engine: types, local training, client execution, aggregation and straggler simulation."""

from fedjax_lab.core.aggregation import client_weights, server_update, weighted_mean
from fedjax_lab.core.client_execution import ClientExecution
from fedjax_lab.core.communication import participants_bytes, sign_bytes, tree_bytes
from fedjax_lab.core.local_training import LocalTrainingResult, local_train
from fedjax_lab.core.losses import cross_entropy, masked_mean, model_loss
from fedjax_lab.core.stragglers import Stragglers, sample_stragglers
from fedjax_lab.core.types import (Algorithm, ClientBatch, client_key, client_keys, cohort_key,
                                   experiment_key, gather_clients, init_key, scatter_clients)

__all__ = [
    "Algorithm", "ClientBatch", "ClientExecution", "LocalTrainingResult", "Stragglers",
    "client_key", "client_keys", "client_weights", "cohort_key", "cross_entropy",
    "experiment_key", "gather_clients", "init_key", "local_train", "masked_mean", "model_loss",
    "participants_bytes", "sample_stragglers", "scatter_clients", "server_update", "sign_bytes",
    "tree_bytes", "weighted_mean",
]
