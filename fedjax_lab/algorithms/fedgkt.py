"""FedGKT: group knowledge transfer between small client models and one large server model.

References:
    He, Annavaram, Avestimehr. "Group Knowledge Transfer: Federated Learning of Large CNNs at
    the Edge." NeurIPS 2020, arXiv 2007.14513.

Update (round t; client k holds a small extractor E_k and head h_k, the server a model S on
features): client k trains E_k, h_k for E_c epochs on CE(h_k(E_k(x)), y) + alpha * KD_T(h_k(E_k(x))
<- z_s[id]), z_s the server's logits for the *same samples* from k's previous round (no KD term
before k has any), and uploads H = E_k(x), z_c = h_k(H) and y. The server trains S for E_s epochs
over the cohort's features on CE(S(H), y) + beta * KD_T(S(H) <- z_c) and sends each client
z_s = S(H) for its samples. Features and logits move; parameters are never exchanged or averaged.
Prediction for client k is S(E_k(x)) ("server") or its own h_k(E_k(x)) ("client").

Pitfalls avoided (ALGORITHMS.md §5f): the reference stores server logits by *batch index* while
its loader reshuffles, so from the second round on a client distils toward other samples' logits;
here they are stored by the example's position in the client's padded data (its id), and the loss
closure looks them up by the ids of the batch `local_train` draws. The server loss is CE + beta *
KD (§5a), not the reference's KD + alpha * CE; KD_T adds no epsilon (core/distillation.py).
Choices recorded: the server trains on the current cohort's uploads (the reference's caches
are the same thing under full participation); z_s is computed after the server's epochs; client
and server optimiser states restart each round, as `local_train` gives (plain SGD has none);
the server's batch shuffle comes from the round's first real client key (no key in the state).
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.algorithms.spec import AlgorithmSpec, ClientTraining
from fedjax_lab.core import (Algorithm, ClientBatch, ClientExecution, client_weights,
                             cross_entropy, gather_clients, local_train, scatter_clients)
from fedjax_lab.core.distillation import kd_loss
from fedjax_lab.core.metrics import initial_metrics, round_metrics
from fedjax_lab.core.personal_models import replicate
from fedjax_lab.core.types import DataInfo, server_key
from fedjax_lab.core.validation import check_number, check_positive_int, is_zero
from fedjax_lab.models import Model, get_model
from fedjax_lab.models.split import SplitModel
from fedjax_lab.options import (OptionError, all_positive, non_negative, one_of, option,
                                optional, positive, positive_int)

PyTree = Any
PREDICTIONS = ("server", "client")
# Sub-streams of the init key: client models, server model.
_CLIENT_INIT_STREAM = 0
_SERVER_INIT_STREAM = 1
_BYTES_METRICS = ("bytes_up", "bytes_down", "bytes_features", "bytes_logits", "bytes_parameters")


@dataclasses.dataclass(frozen=True)
class ServerTraining:
    """The server's training of S on the cohort's features: plain SGD, `epochs` passes."""

    lr: float = option(0.1, "server SGD learning rate", positive, sweepable=True)
    epochs: int = option(3, "server epochs E_s per round", positive_int)
    batch_size: int = option(64, "features per server step", positive_int)

    def optimizer(self) -> optax.GradientTransformation:
        return optax.sgd(self.lr)


@dataclasses.dataclass(frozen=True)
class FedGKTConfig:
    """FedGKT's options; defaults are the original FedML scripts' (He et al.'s released
    `main_fedgkt.py`): T = 3, alpha = 1, server-side distillation off (beta = 0,
    `--whether_distill_on_the_server 0`), E_c = E_s = 3 epochs, SGD at 0.1 on both sides, server
    batch 64, the server model predicting on client features. Two choices for the embedded
    digits: plain SGD (the scripts add Nesterov momentum 0.9 and weight decay for ResNets on
    CIFAR), and client batches of 10 rather than 64, so that a client with ~29 examples takes a
    few steps per epoch instead of one full-batch step. The server model is a registry model on
    the clients' features (`server_model`, default `mlp`: the "large" model of the split)."""

    client: ClientTraining = option(ClientTraining(lr=0.1, epochs=3, batch_size=10),
                                    "clients' local training of the small models")
    server: ServerTraining = option(ServerTraining(), "the server's training of S")
    server_model: str = option("mlp", "registry model S from client features to logits")
    server_hidden: tuple[int, ...] | None = option(None, "hidden widths of an mlp S; none = the "
                                                   "model registry's", optional(all_positive))
    alpha: float = option(1.0, "weight of the clients' KD toward the server's logits",
                          non_negative, sweepable=True)
    beta: float = option(0.0, "weight of the server's KD toward the clients' logits (0: off, "
                         "as in the original scripts)", non_negative, sweepable=True)
    temperature: float = option(3.0, "KD temperature T", positive, sweepable=True)
    prediction: str = option("server", "predictor scored: S(E_k(x)) or the client's own head",
                             one_of(*PREDICTIONS))

    def check(self) -> None:
        if self.server_hidden is not None and self.server_model != "mlp":
            raise OptionError("server_hidden", self.server_hidden,
                              "only an mlp server model has hidden widths")


def build(config: FedGKTConfig, model: SplitModel, data: DataInfo,
          execution: ClientExecution = ClientExecution()) -> Algorithm:
    """FedGKT with `model` as every client's small model and `config.server_model` as S."""
    try:
        options = {} if config.server_hidden is None else {"hidden": config.server_hidden}
        server_model = get_model(config.server_model, (model.latent_dim,), data.num_classes,
                                 **options)
    except ValueError as error:  # an unknown name: say which option chose it
        raise OptionError("server_model", config.server_model,
                          getattr(error, "expected", str(error))) from None
    return fedgkt(model, server_model, config.client.optimizer(), config.server.optimizer(),
                  num_clients=data.num_clients, max_examples=data.max_examples,
                  alpha=config.alpha, beta=config.beta, temperature=config.temperature,
                  client_epochs=config.client.epochs, server_epochs=config.server.epochs,
                  batch_size=config.client.batch_size, server_batch_size=config.server.batch_size,
                  prediction=config.prediction, execution=execution)


class FedGKTClientState(NamedTuple):
    """One client's persistent state (stacked over the population in `FedGKTState`).

    Attributes:
        params: `{"extractor", "head"}` of the small client model.
        server_logits: `[N, classes]` the server's logits z_s per training example, row i for the
            example at position i of the client's padded data.
        has_server_logits: bool, False until the client has received z_s once.
    """

    params: PyTree
    server_logits: jax.Array
    has_server_logits: jax.Array


class FedGKTState(NamedTuple):
    """Attributes: params (server model S), round, metrics, client_states `[num_clients]`."""

    params: PyTree
    round: jax.Array
    metrics: dict[str, jax.Array]
    client_states: FedGKTClientState


def fedgkt(client_model: SplitModel, server_model: Model,
           client_optimizer: optax.GradientTransformation,
           server_optimizer: optax.GradientTransformation, *, num_clients: int,
           max_examples: int, alpha: float = 1.0, beta: float = 0.0, temperature: float = 3.0,
           client_epochs: int = 1, server_epochs: int = 1, batch_size: int | None = 32,
           server_batch_size: int | None = None, prediction: str = "server",
           execution: ClientExecution = ClientExecution(), unroll: int = 1) -> Algorithm:
    """Builds FedGKT.

    Args:
        client_model: the small extractor + head every client trains (its own copy).
        server_model: the large model from features `[latent_dim]` to logits.
        client_optimizer: optax optimiser of the clients' local training.
        server_optimizer: optax optimiser of the server's training on features.
        num_clients: population size (the client states are stacked over it).
        max_examples: the padded length N of the training clients (`max n_i`); z_s is cached
            per example position.
        alpha: weight of the clients' KD toward the server's logits (reference 1.0).
        beta: weight of the server's KD toward the clients' logits. The default 0 (server-side
            distillation off) is the original scripts' (`--whether_distill_on_the_server 0`);
            beta > 0 gives the bidirectional transfer with the paper's CE + beta * KD loss.
        temperature: KD temperature T (reference 3.0).
        client_epochs: client epochs E_c per round.
        server_epochs: server epochs E_s per round over the cohort's features.
        batch_size: client batch; None is the full batch.
        server_batch_size: server batch; None uses `batch_size`.
        prediction: "server" (S(E_k(x)), the paper's) or "client" (h_k(E_k(x))).
        execution: how clients run.
        unroll: unroll factor of the local step loops.

    Returns:
        An `Algorithm` whose state is `FedGKTState`.
    """
    for name, value in (("num_clients", num_clients), ("max_examples", max_examples),
                        ("client_epochs", client_epochs), ("server_epochs", server_epochs)):
        check_positive_int(name, value)
    for name, value in (("batch_size", batch_size), ("server_batch_size", server_batch_size)):
        if value is not None:
            check_positive_int(name, value)
    for name, value in (("alpha", alpha), ("beta", beta)):
        check_number(name, value, f"{name} >= 0", lambda weight: weight >= 0)
    check_number("temperature", temperature, "temperature > 0", lambda t: t > 0)
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction {prediction!r} is unknown; allowed: {', '.join(PREDICTIONS)}")
    if tuple(server_model.feature_shape) != (client_model.latent_dim,) or \
            server_model.num_classes != client_model.num_classes:
        raise ValueError(f"server_model maps {server_model.feature_shape} to "
                         f"{server_model.num_classes} logits; expected "
                         f"({client_model.latent_dim},) (the client features) to "
                         f"{client_model.num_classes}")
    server_batch_size = batch_size if server_batch_size is None else server_batch_size
    example_ids = jnp.arange(max_examples, dtype=jnp.int32)

    def init(key: jax.Array) -> FedGKTState:
        client_params = client_model.init(jax.random.fold_in(key, _CLIENT_INIT_STREAM))
        server_params = server_model.init(jax.random.fold_in(key, _SERVER_INIT_STREAM))
        dtype = jax.tree.leaves(server_params)[0].dtype
        population = FedGKTClientState(
            params=replicate(client_params, num_clients),
            server_logits=jnp.zeros((num_clients, max_examples, client_model.num_classes), dtype),
            has_server_logits=jnp.zeros((num_clients,), bool))
        zeros = jnp.zeros(0)
        return FedGKTState(server_params, jnp.zeros((), jnp.int32),
                           initial_metrics(_round_metrics, zeros, zeros, jnp.zeros(0, jnp.int32),
                                           0.0, 0, dict.fromkeys(_BYTES_METRICS, 0.0)),
                           population)

    def round_fn(state: FedGKTState, batch: ClientBatch) -> FedGKTState:
        num_cohort, padded_length = batch.y.shape
        if padded_length != max_examples:
            raise ValueError(f"the batch's clients are padded to {padded_length} examples; "
                             f"expected max_examples={max_examples} given to fedgkt")
        cohort = gather_clients(state.client_states, batch.client_ids)

        def client_update(client):
            own, x, y, mask, rng = client
            loss_fn = _client_loss(client_model, x, own, alpha, temperature)
            result = local_train(loss_fn, client_optimizer, own.params, example_ids, y, mask, rng,
                                 num_epochs=client_epochs, batch_size=batch_size, unroll=unroll)
            features = client_model.extract(result.params, x)
            logits = client_model.head.apply(result.params["head"], features)
            return result.params, features, logits, result.mean_loss, result.num_steps

        params, features, client_logits, losses, steps = execution.map(
            client_update, (cohort, batch.x, batch.y, batch.mask, batch.rng))

        # Real clients' rows first (in cohort order): a padded client then shifts no real row,
        # and the server's shuffle, drawn per row position, is the one of the round without it.
        real_first = jnp.argsort(batch.num_examples <= 0, stable=True)
        flat = lambda a: a[real_first].reshape((num_cohort * padded_length,) + a.shape[2:])
        server_features, server_targets = flat(features), flat(client_logits)

        def server_loss(server_params, ids, y, mask, rng):
            del rng
            logits = server_model.apply(server_params, server_features[ids])
            loss = cross_entropy(logits, y, mask)
            if not is_zero(beta):
                loss = loss + beta * kd_loss(logits, server_targets[ids], mask, temperature)
            return loss

        server = local_train(server_loss, server_optimizer, state.params,
                             jnp.arange(num_cohort * padded_length, dtype=jnp.int32),
                             flat(batch.y), flat(batch.mask), server_key(batch),
                             num_epochs=server_epochs, batch_size=server_batch_size,
                             unroll=unroll)
        server_logits = server_model.apply(
            server.params, features.reshape(num_cohort * padded_length, -1)).reshape(
                num_cohort, padded_length, -1)

        valid = batch.num_examples > 0
        updated = FedGKTClientState(params, server_logits.astype(cohort.server_logits.dtype),
                                    jnp.ones_like(cohort.has_server_logits))
        client_states = scatter_clients(state.client_states, batch.client_ids, updated, valid)
        weights = client_weights(batch.num_examples)
        return FedGKTState(server.params, state.round + 1,
                           _round_metrics(weights, losses, steps, server.mean_loss,
                                          server.num_steps,
                                          _bytes_moved(features, client_logits, batch)),
                           client_states)

    def predict(state: FedGKTState, batch: ClientBatch) -> jax.Array:
        client_params = gather_clients(state.client_states.params, batch.client_ids)

        def client_logits(client):
            params, x = client
            features = client_model.extract(params, x)
            if prediction == "server":
                return server_model.apply(state.params, features)
            return client_model.head.apply(params["head"], features)

        return execution.map(client_logits, (client_params, batch.x))

    return Algorithm(init=init, round=round_fn, predict=predict)



def _client_loss(client_model: SplitModel, x: jax.Array, own: FedGKTClientState, alpha: float,
                 temperature: float):
    """The client's loss on a batch given by example ids (so z_s is looked up per sample)."""

    def loss(params, ids, y, mask, rng):
        del rng
        logits = client_model.apply(params, x[ids])
        loss = cross_entropy(logits, y, mask)
        if not is_zero(alpha):
            distill = kd_loss(logits, own.server_logits[ids], mask, temperature)
            loss = loss + alpha * jnp.where(own.has_server_logits, distill, 0)
        return loss

    return loss


def _bytes_moved(features: jax.Array, client_logits: jax.Array,
                 batch: ClientBatch) -> dict[str, jax.Array]:
    """Bytes of the round's real examples: features, logits and labels; never a parameter.

    Up, per example: its features H, logits z_c and label y; down: the server's logits z_s.
    """
    dtype = jnp.result_type(float)
    examples = jnp.sum(jnp.maximum(batch.num_examples, 0)).astype(dtype)
    logit_bytes = examples * client_logits.shape[-1] * client_logits.dtype.itemsize
    feature_bytes = examples * features.shape[-1] * features.dtype.itemsize
    label_bytes = examples * batch.y.dtype.itemsize
    return {"bytes_up": feature_bytes + logit_bytes + label_bytes, "bytes_down": logit_bytes,
            "bytes_features": feature_bytes, "bytes_logits": 2 * logit_bytes,
            "bytes_parameters": jnp.zeros((), dtype)}


def _round_metrics(weights, losses, steps, server_loss, server_steps,
                   bytes_moved) -> dict[str, jax.Array]:
    """The round's scalars; `init` calls it on an empty cohort so the structure never changes."""
    dtype = jnp.result_type(float)
    bytes_moved = {name: jnp.asarray(value, dtype) for name, value in bytes_moved.items()}
    return round_metrics(
        weights, losses, **bytes_moved, server_loss=jnp.asarray(server_loss, dtype),
        local_steps=jnp.sum(jnp.where(weights > 0, steps, 0)).astype(jnp.int32),
        server_steps=jnp.asarray(server_steps, jnp.int32))


SPECS = (AlgorithmSpec(
    "fedgkt", FedGKTConfig, build,
    paper="He, Annavaram, Avestimehr, Group Knowledge Transfer: Federated Learning of Large CNNs "
          "at the Edge, NeurIPS 2020, arXiv 2007.14513",
    summary="small client models upload features and logits; a large server model trains on "
            "them and sends its logits back for distillation; no parameters move",
    model_kind="split",
    class_labels_only="the server model trains on one feature vector and label per example"),)
