"""MOON: local representations pulled to the global model's, pushed from the last local model's.

References:
    Li, He, Song. "Model-Contrastive Federated Learning." CVPR 2021, arXiv 2103.16257 (reference
    code: QinbinLi/MOON).

Update: sampled client i trains from w^t on l_sup(w; x, y) + mu l_con, where for z = R_w(x),
z_glob = R_{w^t}(x) and z_prev = R_{w_i^{t-1}}(x) (both frozen) l_con = -log(e^{sim(z, z_glob)/tau}
/ (e^{sim(z, z_glob)/tau} + e^{sim(z, z_prev)/tau})), sim the cosine similarity, averaged over the
minibatch's real examples; the server averages like FedAvg (sample-weighted) and client i keeps
its trained model as w_i^t.

Built by composition: `local_train` with the contrastive term in its loss closure (the frozen
global and previous models reach each client through `execution.map_reduce`'s per-client arguments,
as SCAFFOLD's control variates do), then FedAvg's aggregation (the weighted mean of the deltas,
summed by `map_reduce` as FedAvg's is) and `server_update`. The previous models are stacked over
the WHOLE population in `client_states`, initialised to the initial global model w^0, gathered by
client id and scattered back with `valid`, so unsampled clients and padded rows are never written.
In round 0 z_glob = z_prev, so l_con = log 2 with zero gradient (up to rounding): the reference
starts with an empty model pool, no negative term and so no contrastive gradient either. A client
first sampled later contrasts with w^0 (the reference: its own randomly initialised network, never
trained). `train_loss` is the local objective, cross-entropy + mu l_con.

The representation R is the split model's extractor output (`SplitModel.extract`): our split
models have no separate projection head, and their head reads the extractor's output, as the
reference's ModelFedCon's classifier reads its projection. The local z comes from the same
training pass as the logits (dropout and BatchNorm as in training); z_glob and z_prev from
inference passes (the reference's `eval()` networks).

Pitfalls avoided: the previous model is the client's own last local model, not the last global
model; z_glob and z_prev carry no gradient (`stop_gradient`, and the frozen parameters are no
argument of the differentiated loss); the temperature divides both similarities; the cosine
similarity clamps each norm at 1e-8 (the eps of torch's `CosineSimilarity`), so an all-zero ReLU
representation (padding, dead units) gives a finite gradient, not NaN.
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.algorithms.fedavg import _round_metrics, predict_with
from fedjax_lab.algorithms.spec import AlgorithmSpec, ClientTraining, ServerOptimizer
from fedjax_lab.core import (Algorithm, ClientBatch, ClientExecution, client_weights,
                             cross_entropy, gather_clients, local_train, masked_mean,
                             scatter_clients, server_update)
from fedjax_lab.core.aggregation import WEIGHTINGS, check_weighting
from fedjax_lab.core.losses import LossWithState
from fedjax_lab.core.metrics import initial_metrics
from fedjax_lab.core.personal_models import check_num_clients, replicate
from fedjax_lab.core.types import DataInfo
from fedjax_lab.core.validation import check_number, check_positive_int
from fedjax_lab.models.split import SplitModel, _apply_part
from fedjax_lab.options import non_negative, one_of, option, positive

PyTree = Any
# torch.nn.CosineSimilarity's default eps, the reference's similarity.
_COSINE_EPS = 1e-8


@dataclasses.dataclass(frozen=True)
class MoonConfig:
    """MOON's options. tau = 0.5 and the client optimiser (SGD 0.01, momentum 0.9, weight decay
    1e-5) are the paper's; mu = 1 is its value for CIFAR-100 and Tiny-ImageNet and the reference
    code's default (5 for CIFAR-10). E = 5 and B = 10 are the library's default job (FedAvg's)
    where the paper runs E = 10, B = 64: a default digits client holds about 29 training
    examples on average, so B = 64 would make most epochs one full-batch step."""

    client: ClientTraining = option(
        ClientTraining(lr=0.01, epochs=5, batch_size=10, momentum=0.9, weight_decay=1e-5),
        "local training")
    server: ServerOptimizer = option(ServerOptimizer(), "server optimiser on the mean delta; sgd "
                                     "at lr 1 is the paper's averaging")
    mu: float = option(1.0, "weight mu of the model-contrastive loss (0: FedAvg)", non_negative,
                       sweepable=True)
    temperature: float = option(0.5, "temperature tau dividing both similarities", positive,
                                sweepable=True)
    weighting: str = option("num_examples", "client weights p_i (the paper: sample-weighted)",
                            one_of(*WEIGHTINGS))


def build(config: MoonConfig, model: SplitModel, data: DataInfo,
          execution: ClientExecution = ClientExecution()) -> Algorithm:
    return moon(model, config.client.optimizer(), num_clients=data.num_clients, mu=config.mu,
                temperature=config.temperature, server_optimizer=config.server.build(),
                num_epochs=config.client.epochs, batch_size=config.client.batch_size,
                weighting=config.weighting, execution=execution)


class MoonClientState(NamedTuple):
    """Attributes: previous_params, each client's last local model w_i^{t-1} (leaves
    `[num_clients, ...]`; w^0 for a client never sampled)."""

    previous_params: PyTree


class MoonState(NamedTuple):
    """Attributes: params (w^t), opt_state (server optimiser), round, metrics, client_states (a
    `MoonClientState` stacked over the whole population)."""

    params: PyTree
    opt_state: PyTree
    round: jax.Array
    metrics: dict[str, jax.Array]
    client_states: MoonClientState


def moon(model: SplitModel, client_optimizer: optax.GradientTransformation, *, num_clients: int,
         mu: float = 1.0, temperature: float = 0.5,
         server_optimizer: optax.GradientTransformation | None = None, num_epochs: int = 1,
         batch_size: int | None = 10, weighting: str = "num_examples",
         execution: ClientExecution = ClientExecution(), unroll: int = 1) -> Algorithm:
    """Builds MOON.

    Args:
        model: the `SplitModel`; its extractor's output is the representation R_w(x).
        client_optimizer: optax optimiser of local training (the paper: SGD 0.01, momentum 0.9,
            weight decay 1e-5).
        num_clients: the population size (previous models are stacked over it).
        mu: weight of the model-contrastive loss (>= 0); 0 is FedAvg.
        temperature: tau > 0, dividing both cosine similarities.
        server_optimizer: optax optimiser on the mean delta; default `optax.sgd(1.0)`, averaging.
        num_epochs: local epochs E.
        batch_size: local batch B; None is the full batch.
        weighting: "num_examples" (the paper) or "uniform".
        execution: how clients run (vmap, chunked, sequential, unrolled, sharded).
        unroll: unroll factor of the local step loop.

    Returns:
        An `Algorithm` whose state is `MoonState`; `predict` uses the global model.
    """
    if not isinstance(model, SplitModel):
        raise ValueError("moon needs a SplitModel (feature extractor + head): its extractor's "
                         "output is the representation the contrastive loss compares")
    check_num_clients(num_clients)
    check_number("mu", mu, "mu >= 0", lambda value: value >= 0)
    check_number("temperature", temperature, "temperature > 0", lambda value: value > 0)
    check_positive_int("num_epochs", num_epochs)
    if batch_size is not None:
        check_positive_int("batch_size", batch_size)
    check_weighting(weighting)
    server_optimizer = optax.sgd(1.0) if server_optimizer is None else server_optimizer

    def init(key: jax.Array) -> MoonState:
        params = model.init(key)
        empty = jnp.zeros(0)
        return MoonState(params, server_optimizer.init(params), jnp.zeros((), jnp.int32),
                         initial_metrics(_round_metrics, empty, empty, jnp.zeros(0, jnp.int32),
                                         optax.tree.zeros_like(params)),
                         MoonClientState(replicate(params, num_clients)))

    def round_fn(state: MoonState, batch: ClientBatch) -> MoonState:
        global_params = state.params
        weights = client_weights(batch.num_examples, weighting=weighting)

        def client_update(client):
            previous_params, x, y, mask, rng = client
            loss_fn = contrastive_loss_fn(model, mu, temperature, global_params, previous_params)
            result = local_train(loss_fn, client_optimizer, global_params, x, y, mask, rng,
                                 num_epochs=num_epochs, batch_size=batch_size, unroll=unroll)
            # FedAvg's delta w^t - w_i, so mu = 0 is FedAvg's round bit for bit.
            delta = optax.tree.sub(global_params, result.params)
            return delta, (result.params, result.mean_loss, result.num_steps)

        cohort = gather_clients(state.client_states, batch.client_ids)
        mean_delta, (local_params, losses, steps) = execution.map_reduce(
            client_update, (cohort.previous_params, batch.x, batch.y, batch.mask, batch.rng),
            weights)
        params, opt_state = server_update(global_params, state.opt_state, mean_delta,
                                          server_optimizer)
        client_states = scatter_clients(state.client_states, batch.client_ids,
                                        MoonClientState(local_params),
                                        valid=batch.num_examples > 0)
        # The model travels both ways; the previous model never leaves its client.
        return MoonState(params, opt_state, state.round + 1,
                         _round_metrics(weights, losses, steps, mean_delta), client_states)

    def predict(state: MoonState, batch: ClientBatch) -> jax.Array:
        return predict_with(model, state.params, batch.x)

    return Algorithm(init=init, round=round_fn, predict=predict)


def contrastive_loss_fn(model: SplitModel, mu, temperature, global_params: PyTree,
                        previous_params: PyTree):
    """The client's `local_train` loss: cross-entropy + mu * `model_contrastive_loss`.

    The supervised part is `model_loss(model.apply)`'s (the same training pass, dropout keys and
    updated statistics), with the representation z taken from that pass; the frozen models'
    representations are inference passes without gradient.
    """
    def loss(params, x, y, mask, rng):
        logits, features, state = training_pass(model, params, x, rng, mask)
        global_features = jax.lax.stop_gradient(model.extract(global_params, x))
        previous_features = jax.lax.stop_gradient(model.extract(previous_params, x))
        value = cross_entropy(logits, y, mask) + mu * model_contrastive_loss(
            features, global_features, previous_features, mask, temperature)
        return LossWithState(value, state) if state else value

    return loss


def training_pass(model: SplitModel, params: PyTree, x: jax.Array, rng, mask):
    """`(logits, features, state)`: `SplitModel.apply(train=True, return_state=True)` with the
    extractor's features kept (the same key split and part calls, so the logits are its own)."""
    keys = (None, None) if rng is None else tuple(jax.random.split(rng))
    features, extractor_state = _apply_part(model.extractor, params["extractor"], x, True,
                                            keys[0], mask)
    logits, head_state = _apply_part(model.head, params["head"], features, True, keys[1], mask)
    state = {part: updated for part, updated in (("extractor", extractor_state),
                                                 ("head", head_state)) if updated}
    return logits, features, state


def cosine_similarity(a: jax.Array, b: jax.Array) -> jax.Array:
    """a . b / (max(|a|, eps) max(|b|, eps)) over the last axis; the clamp inside the square root
    keeps the gradient finite at a zero vector."""
    def norm(v):
        return jnp.sqrt(jnp.maximum(jnp.sum(v * v, axis=-1), _COSINE_EPS ** 2))
    return jnp.sum(a * b, axis=-1) / (norm(a) * norm(b))


def model_contrastive_loss(features: jax.Array, global_features: jax.Array,
                           previous_features: jax.Array, mask: jax.Array,
                           temperature) -> jax.Array:
    """Mean over real examples of -log(e^{s_g/tau} / (e^{s_g/tau} + e^{s_p/tau})), s_g and s_p
    the cosine similarities of z to z_glob and z_prev; log 2 where z_glob = z_prev."""
    positive = cosine_similarity(features, global_features) / temperature
    negative = cosine_similarity(features, previous_features) / temperature
    # -log(e^p / (e^p + e^n)) = log(1 + e^(n - p)): the reference's two-logit cross-entropy.
    return masked_mean(jax.nn.softplus(negative - positive), mask)


SPECS = (AlgorithmSpec(
    "moon", MoonConfig, build,
    paper="Li, He, Song, Model-Contrastive Federated Learning, CVPR 2021, arXiv 2103.16257",
    summary="FedAvg whose clients add mu * a contrastive loss pulling their representation to "
            "the global model's and away from their own previous local model's",
    model_kind="split", trains_model_state=True,
    class_labels_only="its contrastive loss compares one representation per example"),)
