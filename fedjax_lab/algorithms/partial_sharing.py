"""Partial sharing: some parameters averaged by the server, the rest kept by each client.

References:
    Arivazhagan, Aggarwal, Singh, Choudhary. "Federated Learning with Personalization Layers."
    arXiv 1912.00818, 2019 (FedPer: shared body, personal head, trained jointly).
    Liang et al. "Think Locally, Act Globally: Federated Learning with Local and Global
    Representations." arXiv 2001.01523, 2020 (LG-FedAvg: personal body, shared head).
    Collins, Hassani, Mokhtari, Shakkottai. "Exploiting Shared Representations for Personalized
    Federated Learning." ICML 2021, arXiv 2102.07078 (FedRep: the personal head trained for
    `head_epochs` with the body frozen, then the shared body for `body_epochs` with the head
    frozen; only the body is averaged).
    Oh, Kim, Yun. "FedBABU: Toward Enhanced Representation for Federated Image Classification."
    ICLR 2022, arXiv 2106.06042 (the head stays at its random initialisation in training, only
    the body is trained and averaged; clients fine-tune before predicting).
    Li, Jiang, Zhang, Kamp, Dou. "FedBN: Federated Learning on Non-IID Features via Local Batch
    Normalization." ICLR 2021, arXiv 2102.07623 (BatchNorm parameters and statistics local).

Update: one mechanism. A predicate on parameter paths (tuples of dict keys, e.g. ("head",
"Dense_0", "kernel")) splits the model into a shared part w and a personal part v_i, one copy per
client stacked over the WHOLE population in `client_states`. Sampled client i trains (w, v_i)
through a schedule of phases, each `(trains, epochs)`: `local_train` runs `epochs` epochs and
only the leaves `trains` selects move (the others get a zero update). The server steps w on
sum_i p_i (w - w_i), FedAvg's pseudo-gradient restricted to w; v_i is written back by client id.
The five presets are five predicates and schedules (`SPECS`).

Pitfalls avoided: a frozen part gets a zero *update* (optax.multi_transform with set_to_zero),
not just a zero gradient, so momentum or weight decay never moves it; unsampled clients' and
padded rows' personal parts never change (`scatter_clients` with `valid`); a never-sampled
client's personal part is the initial one; bytes count only the shared part the clients train.
"""

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from fedjax_lab.algorithms.spec import AlgorithmSpec, ClientTraining, ServerOptimizer
from fedjax_lab.core import (Algorithm, ClientBatch, ClientExecution, client_weights,
                             gather_clients, local_train, model_loss, scatter_clients,
                             server_update)
from fedjax_lab.core.aggregation import WEIGHTINGS, check_weighting
from fedjax_lab.core.communication import model_exchange_bytes
from fedjax_lab.core.metrics import initial_metrics, round_metrics
from fedjax_lab.core.personal_models import check_num_clients, replicate
from fedjax_lab.core.types import DataInfo
from fedjax_lab.models import Model
from fedjax_lab.options import non_negative_int, one_of, option, positive_int

PyTree = Any
Path = tuple[str, ...]
# is_part(path) -> whether the parameter at `path` (dict keys from the root) belongs to a part.
PathPredicate = Callable[[Path], bool]
# One phase of local training: (which leaves move, epochs); None moves every leaf.
Phase = tuple[PathPredicate | None, int]
FINETUNE_PARTS = ("all", "head")
# Sub-streams of a client's key: later phases and fine-tuning shuffle apart from the first phase.
_PHASE_STREAM = 110
_FINETUNE_STREAM = 120


def nothing(path: Path) -> bool:
    del path
    return False


def everything(path: Path) -> bool:
    del path
    return True


def is_head(path: Path) -> bool:
    return path[0] == "head"


def is_body(path: Path) -> bool:
    return path[0] == "extractor"


def is_batch_norm(path: Path) -> bool:
    """BatchNorm's scale and bias ("params"/BatchNorm_k) and running statistics
    ("batch_stats"/BatchNorm_k)."""
    return any(name == "batch_stats" or name.startswith("BatchNorm") for name in path)


def partition(tree: PyTree, is_personal: PathPredicate) -> tuple[dict, dict]:
    """(shared, personal): the leaves of the nested dict `tree` that `is_personal` rejects and
    selects, each as a nested dict of its own (`{}` when empty)."""
    flat = traverse_util.flatten_dict(tree)
    return (traverse_util.unflatten_dict({k: v for k, v in flat.items() if not is_personal(k)}),
            traverse_util.unflatten_dict({k: v for k, v in flat.items() if is_personal(k)}))


def merge(*parts: dict) -> dict:
    """The nested dict holding every leaf of the disjoint `parts`."""
    flat = {}
    for part in parts:
        flat.update(traverse_util.flatten_dict(part))
    return traverse_util.unflatten_dict(flat)


def frozen_except(optimizer: optax.GradientTransformation,
                  trains: PathPredicate | None) -> optax.GradientTransformation:
    """`optimizer` on the leaves `trains` selects; a zero update (the leaf kept exactly) on the
    others. None is `optimizer` itself."""
    if trains is None:
        return optimizer

    def labels(params):
        flat = traverse_util.flatten_dict(params)
        return traverse_util.unflatten_dict(
            {k: "train" if trains(k) else "frozen" for k in flat})

    return optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, labels)


@dataclasses.dataclass(frozen=True)
class PartialSharingConfig:
    """FedPer's, LG-FedAvg's and FedBN's options: both parts trained jointly by FedAvg's default
    local job (SGD 0.05, E = 5, B = 10) and plain averaging of the shared part."""

    client: ClientTraining = option(ClientTraining(lr=0.05, epochs=5, batch_size=10),
                                    "local training of both parts")
    server: ServerOptimizer = option(ServerOptimizer(), "server optimiser on the shared part's "
                                     "mean delta")
    weighting: str = option("num_examples", "client weights p_i", one_of(*WEIGHTINGS))


@dataclasses.dataclass(frozen=True)
class FedRepConfig:
    """FedRep's options; the reference code (lgcollins/FedRep) runs 10 head epochs then 1 body
    epoch of SGD 0.01 on batches of 10; `client.epochs` is the body's epochs."""

    client: ClientTraining = option(ClientTraining(lr=0.01, epochs=1, batch_size=10),
                                    "local training; client.epochs = the body's epochs")
    head_epochs: int = option(10, "epochs on the personal head (body frozen) before the body's",
                              positive_int)
    server: ServerOptimizer = option(ServerOptimizer(), "server optimiser on the body's delta")
    weighting: str = option("num_examples", "client weights p_i", one_of(*WEIGHTINGS))


@dataclasses.dataclass(frozen=True)
class FedBABUConfig:
    """FedBABU's options: FedAvg's default local job on the body (the head frozen at its random
    initialisation); at evaluation each client fine-tunes for `finetune_epochs` at client.lr (the
    paper fine-tunes the whole model, its main results with 5 epochs)."""

    client: ClientTraining = option(ClientTraining(lr=0.05, epochs=5, batch_size=10),
                                    "local training of the body")
    server: ServerOptimizer = option(ServerOptimizer(), "server optimiser on the body's delta")
    weighting: str = option("num_examples", "client weights p_i", one_of(*WEIGHTINGS))
    finetune_epochs: int = option(5, "fine-tuning epochs before predicting (adapted view)",
                                  non_negative_int)
    finetune: str = option("all", "what fine-tuning trains: all (the paper) or head",
                           one_of(*FINETUNE_PARTS))


def _common(config, execution) -> dict:
    return dict(server_optimizer=config.server.build(), batch_size=config.client.batch_size,
                weighting=config.weighting, execution=execution)


def build_fedper(config: PartialSharingConfig, model: Model, data: DataInfo,
                 execution: ClientExecution = ClientExecution()) -> Algorithm:
    return partial_sharing(model, config.client.optimizer(), num_clients=data.num_clients,
                           is_personal=is_head, phases=((None, config.client.epochs),),
                           **_common(config, execution))


def build_lg_fedavg(config: PartialSharingConfig, model: Model, data: DataInfo,
                    execution: ClientExecution = ClientExecution()) -> Algorithm:
    return partial_sharing(model, config.client.optimizer(), num_clients=data.num_clients,
                           is_personal=is_body, phases=((None, config.client.epochs),),
                           **_common(config, execution))


def build_fedbn(config: PartialSharingConfig, model: Model, data: DataInfo,
                execution: ClientExecution = ClientExecution()) -> Algorithm:
    return partial_sharing(model, config.client.optimizer(), num_clients=data.num_clients,
                           is_personal=is_batch_norm, phases=((None, config.client.epochs),),
                           **_common(config, execution))


def build_fedrep(config: FedRepConfig, model: Model, data: DataInfo,
                 execution: ClientExecution = ClientExecution()) -> Algorithm:
    return fedrep(model, config.client.optimizer(), num_clients=data.num_clients,
                  head_epochs=config.head_epochs, body_epochs=config.client.epochs,
                  **_common(config, execution))


def build_fedbabu(config: FedBABUConfig, model: Model, data: DataInfo,
                  execution: ClientExecution = ClientExecution()) -> Algorithm:
    return fedbabu(model, config.client.optimizer(), num_clients=data.num_clients,
                   num_epochs=config.client.epochs, finetune_epochs=config.finetune_epochs,
                   finetune=config.finetune, **_common(config, execution))


def fedrep(model: Model, client_optimizer: optax.GradientTransformation, *, num_clients: int,
           head_epochs: int = 10, body_epochs: int = 1, **options) -> Algorithm:
    """FedRep: personal head trained first (body frozen), then the shared body (head frozen)."""
    return partial_sharing(model, client_optimizer, num_clients=num_clients, is_personal=is_head,
                           phases=((is_head, head_epochs), (is_body, body_epochs)), **options)


def fedbabu(model: Model, client_optimizer: optax.GradientTransformation, *, num_clients: int,
            num_epochs: int = 5, finetune_epochs: int = 5, finetune: str = "all",
            **options) -> Algorithm:
    """FedBABU: the body trained and averaged, the head never; clients fine-tune at evaluation
    (`finetune` "all", the paper's, or "head")."""
    if finetune not in FINETUNE_PARTS:
        raise ValueError(f"finetune {finetune!r} is unknown; allowed: {', '.join(FINETUNE_PARTS)}")
    return partial_sharing(model, client_optimizer, num_clients=num_clients, is_personal=nothing,
                           phases=((is_body, num_epochs),),
                           finetune=(None if finetune == "all" else is_head, finetune_epochs),
                           **options)


class PartialSharingClientState(NamedTuple):
    """Attributes: personal_params, each client's personal part (leaves `[num_clients, ...]`;
    `{}` where nothing is personal)."""

    personal_params: PyTree


class PartialSharingState(NamedTuple):
    """Attributes: params (the whole model: the shared part averaged, the personal part at its
    initial value, which every client starts from), opt_state (server optimiser), round,
    metrics, client_states (a `PartialSharingClientState`)."""

    params: PyTree
    opt_state: PyTree
    round: jax.Array
    metrics: dict[str, jax.Array]
    client_states: PartialSharingClientState


def partial_sharing(model: Model, client_optimizer: optax.GradientTransformation, *,
                    num_clients: int, is_personal: PathPredicate,
                    phases: tuple[Phase, ...],
                    server_optimizer: optax.GradientTransformation | None = None,
                    batch_size: int | None = 10, weighting: str = "num_examples",
                    finetune: Phase | None = None,
                    execution: ClientExecution = ClientExecution(),
                    unroll: int = 1) -> Algorithm:
    """Builds partial sharing.

    Args:
        model: the `(init, apply)` model (a `SplitModel` for head/body predicates) trained with
            softmax cross-entropy; its parameters a nested dict.
        client_optimizer: optax optimiser of local training (fresh state in every phase).
        num_clients: the population size (personal parts are stacked over it).
        is_personal: the predicate on parameter paths selecting the personal part.
        phases: the local schedule, `(trains, epochs)` pairs run in order; `trains` None trains
            every leaf; a phase of 0 epochs is skipped.
        server_optimizer: optax optimiser on the shared part's mean delta; default sgd(1.0).
        batch_size: local batch; None is the full batch.
        weighting: "num_examples" or "uniform".
        finetune: optional `(trains, epochs)`: `adapted_predict` fine-tunes each client's model
            on its support row for `epochs` epochs before predicting its query row.
        execution: how clients run (vmap, chunked, sequential, unrolled, sharded).
        unroll: unroll factor of the local step loop.

    Returns:
        An `Algorithm` whose state is `PartialSharingState`; `predict` is each client's own model
        (the shared part and its personal part).
    """
    check_num_clients(num_clients)
    if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 1):
        raise ValueError(f"batch_size={batch_size!r} is invalid; expected a positive integer")
    for trains, epochs in tuple(phases) + (() if finetune is None else (finetune,)):
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"epochs={epochs!r} of a phase is invalid; expected an integer >= 0")
    phases = tuple((trains, epochs) for trains, epochs in phases if epochs > 0)
    if not phases:
        raise ValueError("every phase has 0 epochs: clients would never train")
    check_weighting(weighting)
    server_optimizer = optax.sgd(1.0) if server_optimizer is None else server_optimizer
    base_loss = model_loss(model.apply)
    optimizers = tuple(frozen_except(client_optimizer, trains) for trains, _ in phases)

    def uploaded_part(tree: PyTree) -> PyTree:
        """The leaves of `tree` the clients train and upload: shared, trained in some phase."""
        return partition(tree, lambda path: is_personal(path) or not any(
            trains is None or trains(path) for trains, _ in phases))[0]

    def train(params, x, y, mask, rng):
        """(params, mean loss, steps) after the phases; one phase's loss is its own, bit for bit
        FedAvg's; several phases' losses are averaged over their steps."""
        loss_sum, total_steps, mean_loss = 0.0, jnp.zeros((), jnp.int32), None
        for index, (optimizer, (_, epochs)) in enumerate(zip(optimizers, phases)):
            key = rng if index == 0 else jax.random.fold_in(rng, _PHASE_STREAM + index)
            result = local_train(base_loss, optimizer, params, x, y, mask, key,
                                 num_epochs=epochs, batch_size=batch_size, unroll=unroll)
            params, mean_loss = result.params, result.mean_loss
            loss_sum = loss_sum + result.mean_loss * result.num_steps
            total_steps = total_steps + result.num_steps
        if len(phases) > 1:
            mean_loss = loss_sum / jnp.maximum(total_steps, 1).astype(mean_loss.dtype)
        return params, mean_loss, total_steps

    def init(key: jax.Array) -> PartialSharingState:
        params = model.init(key)
        shared, personal = partition(params, is_personal)
        client_states = PartialSharingClientState(replicate(personal, num_clients))
        return PartialSharingState(params, server_optimizer.init(params),
                                   jnp.zeros((), jnp.int32),
                                   initial_metrics(_round_metrics, jnp.zeros(0), jnp.zeros(0),
                                                   jnp.zeros(0, jnp.int32),
                                                   optax.tree.zeros_like(shared),
                                                   uploaded_part(shared)),
                                   client_states)

    def round_fn(state: PartialSharingState, batch: ClientBatch) -> PartialSharingState:
        shared, global_personal = partition(state.params, is_personal)
        weights = client_weights(batch.num_examples, weighting=weighting)

        def client_update(client):
            x, y, mask, rng, personal = client
            params, loss, steps = train(merge(shared, personal), x, y, mask, rng)
            new_shared, new_personal = partition(params, is_personal)
            # FedAvg's delta (w - w_i) on the shared part: with nothing personal, its round.
            return optax.tree.sub(shared, new_shared), (new_personal, loss, steps)

        cohort = gather_clients(state.client_states, batch.client_ids)
        mean_delta, (personal, losses, steps) = execution.map_reduce(
            client_update, (batch.x, batch.y, batch.mask, batch.rng, cohort.personal_params),
            weights)
        # The personal leaves of the global model stay the initial ones (a zero step).
        params, opt_state = server_update(
            state.params, state.opt_state,
            merge(mean_delta, optax.tree.zeros_like(global_personal)), server_optimizer)
        client_states = state.client_states
        if jax.tree.leaves(personal):  # nothing personal (FedBABU): nothing to write back
            client_states = scatter_clients(client_states, batch.client_ids,
                                            PartialSharingClientState(personal),
                                            valid=batch.num_examples > 0)
        return PartialSharingState(params, opt_state, state.round + 1,
                                   _round_metrics(weights, losses, steps, mean_delta,
                                                  uploaded_part(mean_delta)),
                                   client_states)

    def own_models(state: PartialSharingState, client_ids: jax.Array) -> PyTree:
        shared, _ = partition(state.params, is_personal)
        personal = gather_clients(state.client_states.personal_params, client_ids)
        return personal, shared

    def predict(state: PartialSharingState, batch: ClientBatch) -> jax.Array:
        personal, shared = own_models(state, batch.client_ids)
        return execution.map(lambda client: model.apply(merge(shared, client[0]), client[1]),
                             (personal, batch.x))

    adapted_predict = None
    if finetune is not None:
        finetune_trains, finetune_epochs = finetune
        finetune_optimizer = frozen_except(client_optimizer, finetune_trains)

        def finetuned_predict(state: PartialSharingState, support: ClientBatch,
                              query: ClientBatch) -> jax.Array:
            personal, shared = own_models(state, support.client_ids)

            def client(data):
                own, x, y, mask, rng, query_x = data
                params = merge(shared, own)
                if finetune_epochs > 0:
                    params = local_train(base_loss, finetune_optimizer, params, x, y, mask,
                                         jax.random.fold_in(rng, _FINETUNE_STREAM),
                                         num_epochs=finetune_epochs, batch_size=batch_size,
                                         unroll=unroll).params
                return model.apply(params, query_x)

            return execution.map(client, (personal, support.x, support.y, support.mask,
                                          support.rng, query.x))

        adapted_predict = finetuned_predict

    return Algorithm(init=init, round=round_fn, predict=predict,
                     adapted_predict=adapted_predict)


def _round_metrics(weights, losses, steps, mean_delta, uploaded) -> dict[str, jax.Array]:
    """FedAvg's metrics with bytes of `uploaded`, the shared part the clients train (each way)."""
    return round_metrics(
        weights, losses, **model_exchange_bytes(weights, uploaded),
        local_steps=jnp.sum(jnp.where(weights > 0, steps, 0)).astype(jnp.int32),
        update_norm=optax.tree.norm(mean_delta).astype(jnp.result_type(float)))


SPECS = (
    AlgorithmSpec(
        "fedper", PartialSharingConfig, build_fedper,
        paper="Arivazhagan et al., Federated Learning with Personalization Layers, arXiv "
              "1912.00818, 2019",
        summary="shared body averaged, personal head kept by each client; trained jointly",
        model_kind="split", trains_model_state=True),
    AlgorithmSpec(
        "lg_fedavg", PartialSharingConfig, build_lg_fedavg,
        paper="Liang et al., Think Locally, Act Globally: Federated Learning with Local and "
              "Global Representations, arXiv 2001.01523, 2020",
        summary="personal body (local representation), shared head averaged; trained jointly",
        model_kind="split", trains_model_state=True),
    AlgorithmSpec(
        "fedrep", FedRepConfig, build_fedrep,
        paper="Collins et al., Exploiting Shared Representations for Personalized Federated "
              "Learning, ICML 2021, arXiv 2102.07078",
        summary="personal head trained first (body frozen), then the shared body (head "
                "frozen); only the body averaged",
        model_kind="split", trains_model_state=True),
    AlgorithmSpec(
        "fedbabu", FedBABUConfig, build_fedbabu,
        paper="Oh, Kim, Yun, FedBABU: Toward Enhanced Representation for Federated Image "
              "Classification, ICLR 2022, arXiv 2106.06042",
        summary="head fixed at its random init, body trained and averaged; clients fine-tune "
                "before predicting (adapted view)",
        model_kind="split", trains_model_state=True),
    AlgorithmSpec(
        "fedbn", PartialSharingConfig, build_fedbn,
        paper="Li et al., FedBN: Federated Learning on Non-IID Features via Local Batch "
              "Normalization, ICLR 2021, arXiv 2102.07623",
        summary="BatchNorm scale, bias and running statistics local, the rest averaged "
                "(FedAvg on a model without BatchNorm)",
        trains_model_state=True),
)
