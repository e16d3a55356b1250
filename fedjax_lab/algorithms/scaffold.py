"""SCAFFOLD: local SGD whose every step is corrected by control variates against client drift.

References:
    Karimireddy, Kale, Mohri, Reddi, Stich, Suresh. "SCAFFOLD: Stochastic Controlled Averaging
    for Federated Learning." ICML 2020, arXiv 1910.06378 (Algorithm 1).

Update: sampled client i starts at y_i = x and takes K_i steps y_i <- y_i - eta_l (g_i(y_i) + c -
c_i); then c_i+ = c_i - c + (x - y_i) / (K_i eta_l) (option II) or g_i(x) (option I). The server
steps x <- x + eta_g sum_i p_i (y_i - x) and c <- c + (1/N) sum_{i in S} (c_i+ - c_i).

Built by composition: each client runs `local_train` with the linear term <c - c_i, y> added to
its minibatch loss (its gradient is exactly the correction c - c_i), so with zero control variates
a round is FedAvg's bit for bit. The c_i are stacked over the whole population in
`client_states`, gathered and scattered by client id; padded cohort rows are never written.

Pitfalls avoided: K_i is each client's own number of active steps (`LocalTrainingResult
.num_steps`), not the largest client's step count used for every client; c moves by the mean of
the differences c_i+ - c_i scaled by |S|/N (so c stays the population mean of the c_i), neither
by the new c_i themselves nor without the |S|/N factor; a client that took no step keeps its c_i.
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.algorithms.fedavg import predict_with
from fedjax_lab.algorithms.spec import AlgorithmSpec, ClientTraining
from fedjax_lab.core import (Algorithm, ClientBatch, ClientExecution, client_weights,
                             gather_clients, local_train, model_loss, participants_bytes,
                             scatter_clients, server_update, tree_bytes)
from fedjax_lab.core.aggregation import WEIGHTINGS, check_weighting
from fedjax_lab.core.losses import split_loss
from fedjax_lab.core.metrics import initial_metrics, round_metrics
from fedjax_lab.core.personal_models import check_num_clients
from fedjax_lab.core.types import DataInfo
from fedjax_lab.core.validation import check_number, check_positive_int
from fedjax_lab.models import Model
from fedjax_lab.options import OptionError, one_of, option, positive

PyTree = Any
VARIATE_UPDATES = ("II", "I")
# Sub-stream of a client's round key for option I's full-batch gradient (dropout draws), apart
# from local training's ClientStream sub-streams.
_GRADIENT_STREAM = 102


@dataclasses.dataclass(frozen=True)
class ScaffoldConfig:
    """SCAFFOLD's options. eta_g = 1, option II and uniform weights 1/|S| are the paper's
    experiments. The paper tunes eta_l per method and takes 5 steps per epoch (batches of 20% of
    a client's data), which a fixed batch size cannot express; the local job here is FedAvg's
    default (SGD 0.05, E = 5, B = 10), so default SCAFFOLD and FedAvg runs do the same work."""

    client: ClientTraining = option(ClientTraining(lr=0.05, epochs=5, batch_size=10),
                                    "local training (plain SGD: no momentum, decay or clipping)")
    global_lr: float = option(1.0, "global step size eta_g", positive, sweepable=True)
    variate_update: str = option("II", "c_i+: II = c_i - c + (x - y_i) / (K_i eta_l), "
                                 "I = full-batch gradient at x", one_of(*VARIATE_UPDATES))
    weighting: str = option("uniform", "weights p_i of the model update (the paper: uniform)",
                            one_of(*WEIGHTINGS))

    def check(self) -> None:
        # Option II reads the mean corrected gradient off (x - y_i) / (K_i eta_l), which holds
        # for plain SGD only; momentum, decay or clipping would also bend the correction itself.
        if self.client.momentum != 0:
            raise OptionError("client.momentum", self.client.momentum,
                              "SCAFFOLD's clients run plain SGD; expected 0")
        if self.client.weight_decay != 0:
            raise OptionError("client.weight_decay", self.client.weight_decay,
                              "SCAFFOLD's clients run plain SGD; expected 0")
        if self.client.clip_norm is not None:
            raise OptionError("client.clip_norm", self.client.clip_norm,
                              "SCAFFOLD's clients run plain SGD; expected none")


def build(config: ScaffoldConfig, model: Model, data: DataInfo,
          execution: ClientExecution = ClientExecution()) -> Algorithm:
    return scaffold(model, config.client.lr, num_clients=data.num_clients,
                    num_epochs=config.client.epochs, batch_size=config.client.batch_size,
                    global_lr=config.global_lr, variate_update=config.variate_update,
                    weighting=config.weighting, execution=execution)


class ScaffoldClientState(NamedTuple):
    """Attributes: control_variate, each client's c_i (leaves `[num_clients, ...]`)."""

    control_variate: PyTree


class ScaffoldState(NamedTuple):
    """Attributes: params (x), control_variate (the server's c), round, metrics, client_states
    (a `ScaffoldClientState` stacked over the whole population)."""

    params: PyTree
    control_variate: PyTree
    round: jax.Array
    metrics: dict[str, jax.Array]
    client_states: ScaffoldClientState


def scaffold(model: Model, learning_rate: float, *, num_clients: int, num_epochs: int = 1,
             batch_size: int | None = 10, global_lr: float = 1.0, variate_update: str = "II",
             weighting: str = "uniform", execution: ClientExecution = ClientExecution(),
             unroll: int = 1) -> Algorithm:
    """Builds SCAFFOLD.

    Args:
        model: the `(init, apply)` model trained with softmax cross-entropy.
        learning_rate: the clients' plain SGD step size eta_l (> 0).
        num_clients: the population size N (client control variates are stacked over it).
        num_epochs: local epochs E; client i takes K_i = E * ceil(n_i / B) steps.
        batch_size: local batch B; None is the full batch.
        global_lr: the server's step size eta_g (> 0); 1 is plain averaging.
        variate_update: "II" (c_i - c + (x - y_i) / (K_i eta_l), free) or "I" (the client's
            full-batch gradient at x, one more pass over its data).
        weighting: weights p_i of the model update, "uniform" (the paper) or "num_examples".
        execution: how clients run (vmap, chunked, sequential, unrolled, sharded).
        unroll: unroll factor of the local step loop.

    Returns:
        An `Algorithm` whose state is `ScaffoldState`; `predict` uses the global model.
    """
    check_num_clients(num_clients)
    check_positive_int("num_epochs", num_epochs)
    if batch_size is not None:
        check_positive_int("batch_size", batch_size)
    check_number("learning_rate", learning_rate, "> 0", lambda value: value > 0)
    check_number("global_lr", global_lr, "> 0", lambda value: value > 0)
    if variate_update not in VARIATE_UPDATES:
        raise ValueError(f"variate_update {variate_update!r} is unknown; "
                         f"allowed: {', '.join(VARIATE_UPDATES)}")
    check_weighting(weighting)
    client_optimizer = optax.sgd(learning_rate)
    server_sgd = optax.sgd(global_lr)
    base_loss = model_loss(model.apply)

    def trainable(tree: PyTree) -> PyTree:
        # BatchNorm statistics travel in the parameters but are no gradient's variable.
        if not model.mutable:
            return tree
        return {name: jax.tree.map(jnp.zeros_like, value) if name in model.mutable else value
                for name, value in tree.items()}

    def init(key: jax.Array) -> ScaffoldState:
        params = model.init(key)
        zeros = optax.tree.zeros_like(params)
        client_states = ScaffoldClientState(jax.tree.map(
            lambda leaf: jnp.zeros((num_clients,) + leaf.shape, leaf.dtype), params))
        empty = jnp.zeros(0, jnp.int32)
        return ScaffoldState(params, zeros, jnp.zeros((), jnp.int32),
                             initial_metrics(_round_metrics, jnp.zeros(0), jnp.zeros(0), empty,
                                             empty, params, zeros, zeros),
                             client_states)

    def round_fn(state: ScaffoldState, batch: ClientBatch) -> ScaffoldState:
        x, c = state.params, state.control_variate
        weights = client_weights(batch.num_examples, weighting=weighting)

        def client_update(client):
            features, labels, mask, rng, c_i = client
            correction = optax.tree.sub(c, c_i)

            def loss_fn(params, xb, yb, mb, key):
                # d/dy <c - c_i, y> = c - c_i: every step moves along g_i(y) + c - c_i.
                return base_loss(params, xb, yb, mb, key) + optax.tree.vdot(correction, params)

            result = local_train(loss_fn, client_optimizer, x, features, labels, mask, rng,
                                 num_epochs=num_epochs, batch_size=batch_size, unroll=unroll)
            if variate_update == "II":
                took_steps = result.num_steps > 0
                # Each client's own K_i; one that took no step keeps its c_i (no division by 0).
                steps_times_lr = jnp.maximum(result.num_steps, 1) * learning_rate
                new_c_i = jax.tree.map(
                    lambda ci, ce, start, end: jnp.where(
                        took_steps, ci - ce + (start - end) / steps_times_lr.astype(ci.dtype), ci),
                    c_i, c, x, result.params)
            else:
                key = jax.random.fold_in(rng, _GRADIENT_STREAM)
                new_c_i = jax.grad(lambda p: split_loss(base_loss(p, features, labels, mask,
                                                                  key))[0])(x)
            new_c_i = trainable(new_c_i)
            # x - y_i, FedAvg's delta, so a round without correction is FedAvg's bit for bit.
            return optax.tree.sub(x, result.params), (new_c_i, result.mean_loss,
                                                      result.num_steps)

        cohort = gather_clients(state.client_states, batch.client_ids)
        mean_delta, (new_variates, losses, steps) = execution.map_reduce(
            client_update, (batch.x, batch.y, batch.mask, batch.rng, cohort.control_variate),
            weights)
        # x + eta_g sum_i p_i (y_i - x) as FedAvg's server SGD step on sum_i p_i (x - y_i).
        params, _ = server_update(x, server_sgd.init(x), mean_delta, server_sgd)
        has_data = batch.num_examples > 0
        # c <- c + (|S| / N) mean_{i in S} (c_i+ - c_i): padded rows (has_data False) add 0.
        share = jnp.where(has_data, 1.0 / num_clients, 0.0)
        variate_change = jax.tree.map(
            lambda new, old: jnp.tensordot(share.astype(new.dtype), new - old, axes=1),
            new_variates, cohort.control_variate)
        control_variate = optax.tree.add(c, variate_change)
        client_states = scatter_clients(state.client_states, batch.client_ids,
                                        ScaffoldClientState(new_variates), valid=has_data)
        return ScaffoldState(params, control_variate, state.round + 1,
                             _round_metrics(weights, losses, steps, has_data, x, mean_delta,
                                            control_variate),
                             client_states)

    def predict(state: ScaffoldState, batch: ClientBatch) -> jax.Array:
        return predict_with(model, state.params, batch.x)

    return Algorithm(init=init, round=round_fn, predict=predict)


def _round_metrics(weights, losses, steps, has_data, params, mean_delta,
                   control_variate) -> dict[str, jax.Array]:
    """The round's metrics. Each real client receives (x, c) and sends (delta y_i, delta c_i):
    twice the model's bytes each way; padded rows are no clients and send or receive nothing."""
    dtype = jnp.result_type(float)
    size = 2 * tree_bytes(params)
    # Two products, not one array twice: `init` runs eagerly and the run loop donates its state,
    # which XLA refuses when two leaves share a buffer.
    return round_metrics(
        weights, losses, bytes_up=participants_bytes(has_data, size),
        bytes_down=participants_bytes(has_data, size),
        local_steps=jnp.sum(jnp.where(weights > 0, steps, 0)).astype(jnp.int32),
        update_norm=optax.tree.norm(mean_delta).astype(dtype),
        control_variate_norm=optax.tree.norm(control_variate).astype(dtype))


SPECS = (AlgorithmSpec(
    "scaffold", ScaffoldConfig, build,
    paper="Karimireddy et al., SCAFFOLD: Stochastic Controlled Averaging for Federated Learning, "
          "ICML 2020, arXiv 1910.06378",
    summary="local SGD corrected by control variates c - c_i against client drift; c_i by "
            "option II (free) or I (gradient at x)",
    trains_model_state=True),)
