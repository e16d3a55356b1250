"""Per-FedAvg: federated averaging of a model meant to be personalised by one gradient step.

References:
    Fallah, Mokhtari, Ozdaglar. "Personalized Federated Learning with Theoretical Guarantees: A
    Model-Agnostic Meta-Learning Approach." NeurIPS 2020, arXiv 2002.07948.

Update: the objective is (1/n) sum_i f_i(w - alpha grad f_i(w)). Each sampled client runs tau local
steps; each step draws three minibatches D, D', D'' and sets w~ = w - alpha grad f(w; D),
g = grad f(w~; D'), then w <- w - beta d with d = g (FO), d = g - alpha [grad f(w + delta g; D'') -
grad f(w - delta g; D'')] / (2 delta) (HF) or d = (I - alpha grad^2 f(w; D'')) g (MAML, the exact
Hessian-vector product `jax.jvp` of `jax.grad`). The server averages the returned models
uniformly; at test time a client personalises with one step w - alpha grad f(w; its data).

Pitfalls avoided (ALGORITHMS.md section 11f): the three batches are separate draws (one
permutation of the client's examples cut into D, D', D'', so D'' never reuses D, unlike the
double-size batch split in common code); HF is a finite-difference Hessian-vector product, not a
diagonal Hessian; alpha (personalisation) and beta (local meta step) are separate hyperparameters.
Caveat measured in experiments/meta_learning.py: on a ReLU MLP the gradient jumps where a unit
switches, so the difference quotient can be far from the Hessian-vector product; with alpha = 0.1
HF collapsed to chance accuracy in 5 of 5 seeds there (NaN loss in 4) while "maml" did not.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.algorithms.fedavg import predict_with
from fedjax_lab.algorithms.spec import AlgorithmSpec, ServerOptimizer
from fedjax_lab.core import Algorithm, ClientBatch, ClientExecution, client_weights
from fedjax_lab.core import server_update, weighted_mean
from fedjax_lab.core.communication import model_exchange_bytes
from fedjax_lab.core.local_training import epoch_permutation
from fedjax_lab.core.meta import (DataLoss, MetaStream, adapted_predictor, inner_adapt,
                                  model_data_loss, sgd_step)
from fedjax_lab.core.metrics import initial_metrics, round_metrics
from fedjax_lab.core.types import DataInfo, PyTree
from fedjax_lab.core.validation import check_number, is_scalar, is_traced
from fedjax_lab.models import Model
from fedjax_lab.options import non_negative, one_of, option, positive, positive_int

VARIANTS = ("fo", "hf", "maml")


@dataclasses.dataclass(frozen=True)
class PerFedAvgConfig:
    """Per-FedAvg's options. Fallah et al. use tau = 10 local steps, delta = 1e-3 and small alpha
    and beta (order 1e-3; flgo's alpha is 0.01) on a two-hidden-layer MLP over 50 users; alpha,
    delta, tau and B = 10 are kept here. beta = 1e-3 moves the model too little for a run of a
    few rounds, so beta is 0.05 (the value experiments/meta_learning.py uses on digits)."""

    variant: str = option("hf", "fo (first order), hf (finite-difference Hessian-vector "
                          "product) or maml (exact one)", one_of(*VARIANTS))
    alpha: float = option(0.01, "personalisation step, in the objective and before scoring",
                          non_negative, sweepable=True)
    beta: float = option(0.05, "local meta step size", non_negative, sweepable=True)
    delta: float = option(1e-3, "finite-difference step of hf", positive, sweepable=True)
    num_local_steps: int = option(10, "local steps tau per round, each on three fresh "
                                  "minibatches", positive_int)
    batch_size: int = option(10, "examples in each of the minibatches D, D', D''", positive_int)
    server: ServerOptimizer = option(ServerOptimizer(), "server optimiser on the mean client "
                                     "delta; sgd at lr 1 is the paper's average of the models")


def build(config: PerFedAvgConfig, model: Model, data: DataInfo,
          execution: ClientExecution = ClientExecution()) -> Algorithm:
    del data
    return perfedavg(model, variant=config.variant, alpha=config.alpha, beta=config.beta,
                     delta=config.delta, num_local_steps=config.num_local_steps,
                     batch_size=config.batch_size, server_optimizer=config.server.build(),
                     execution=execution)


class PerFedAvgState(NamedTuple):
    """Attributes: params (global model w), opt_state (server optimiser), round, metrics."""

    params: PyTree
    opt_state: PyTree
    round: jax.Array
    metrics: dict[str, jax.Array]


def three_batches(key: jax.Array, mask: jax.Array, batch_size: int) -> jax.Array:
    """Indices `[3, batch_size]` of D, D', D'': consecutive cuts of one permutation of the real
    examples, so they are disjoint when the client has n >= 3 B real examples; with fewer, the
    permutation repeats and the batches share examples."""
    order = epoch_permutation(key, mask)
    num_real = jnp.maximum(jnp.sum(mask, dtype=jnp.int32), 1)
    return order[jnp.arange(3 * batch_size) % num_real].reshape(3, batch_size)


def perfedavg_direction(loss_fn: DataLoss, params: PyTree, batches: tuple, *, alpha: float,
                        variant: str, delta: float = 1e-3):
    """The local step's direction d (w <- w - beta d) and the loss f(w~; D').

    Args:
        loss_fn: `loss_fn(params, data)`.
        params: the client's current w.
        batches: the data of D, D', D''.
        alpha: the personalisation step.
        variant: "fo", "hf" or "maml".
        delta: the finite-difference step of "hf".
    """
    batch, batch_prime, batch_second = batches
    grad_fn = jax.grad(loss_fn)
    adapted = sgd_step(params, grad_fn(params, batch), alpha)
    loss, g = jax.value_and_grad(loss_fn)(adapted, batch_prime)
    if variant == "fo":
        return g, loss
    if variant == "hf":
        plus = grad_fn(jax.tree.map(lambda w, v: w + delta * v, params, g), batch_second)
        minus = grad_fn(jax.tree.map(lambda w, v: w - delta * v, params, g), batch_second)
        hessian_g = jax.tree.map(lambda a, b: (a - b) / (2 * delta), plus, minus)
    else:
        _, hessian_g = jax.jvp(lambda w: grad_fn(w, batch_second), (params,), (g,))
    return jax.tree.map(lambda v, h: v - alpha * h, g, hessian_g), loss


def perfedavg(model: Model, *, variant: str = "hf", alpha: float = 0.01, beta: float = 0.001,
              delta: float = 1e-3, num_local_steps: int = 10, batch_size: int = 10,
              server_optimizer: optax.GradientTransformation | None = None,
              execution: ClientExecution = ClientExecution()) -> Algorithm:
    """Builds Per-FedAvg.

    Args:
        model: the `(init, apply)` model trained with softmax cross-entropy.
        variant: "fo", "hf" (finite-difference Hessian-vector product) or "maml" (exact one).
        alpha: the personalisation step, inside the objective and at test time.
        beta: the local meta step size.
        delta: the finite-difference step of "hf".
        num_local_steps: tau, local steps per round, each on three fresh minibatches.
        batch_size: B, examples in each of D, D', D''.
        server_optimizer: applied to the mean client delta; default `optax.sgd(1.0)`, the
            paper's uniform average of the returned models.
        execution: how clients run.

    Returns:
        An `Algorithm` whose state is `PerFedAvgState`; `predict` is the global model w and
        `adapted_predict` takes one step of size alpha on all of a client's support examples
        (its local training data) and predicts its query (its test data).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is unknown; allowed: {', '.join(VARIANTS)}")
    for name, value in (("alpha", alpha), ("beta", beta), ("delta", delta)):
        check_number(name, value, "a number >= 0",
                     lambda number: is_scalar(number) and number >= 0)
    if variant == "hf" and not is_traced(delta) and not delta > 0:
        raise ValueError(f"delta={delta!r} is invalid for the hf variant; expected delta > 0")
    for name, value in (("num_local_steps", num_local_steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid; expected a positive integer")
    server_optimizer = optax.sgd(1.0) if server_optimizer is None else server_optimizer
    loss_fn = model_data_loss(model.apply)

    def init(key: jax.Array) -> PerFedAvgState:
        params = model.init(key)
        return PerFedAvgState(params, server_optimizer.init(params), jnp.zeros((), jnp.int32),
                              initial_metrics(_round_metrics, jnp.zeros(0), jnp.zeros(0),
                                              optax.tree.zeros_like(params)))

    def round_fn(state: PerFedAvgState, batch: ClientBatch) -> PerFedAvgState:
        global_params = state.params

        def client_update(client):
            x, y, mask, rng = client
            batch_key = jax.random.fold_in(rng, MetaStream.BATCHES)
            valid = jnp.broadcast_to(jnp.any(mask), (batch_size,))

            def local_step(params, step_index):
                indices = three_batches(jax.random.fold_in(batch_key, step_index), mask,
                                        batch_size)
                batches = tuple((x[i], y[i], valid) for i in indices)
                direction, loss = perfedavg_direction(loss_fn, params, batches, alpha=alpha,
                                                      variant=variant, delta=delta)
                return sgd_step(params, direction, beta), loss

            params, losses = jax.lax.scan(local_step, global_params, jnp.arange(num_local_steps))
            return optax.tree.sub(global_params, params), jnp.mean(losses)

        deltas, losses = execution.map(client_update, (batch.x, batch.y, batch.mask, batch.rng))
        weights = client_weights(batch.num_examples, weighting="uniform")
        mean_delta = weighted_mean(deltas, weights)
        params, opt_state = server_update(global_params, state.opt_state, mean_delta,
                                          server_optimizer)
        return PerFedAvgState(params, opt_state, state.round + 1,
                              _round_metrics(weights, losses, mean_delta))

    def personalise(state: PerFedAvgState, support: tuple) -> PyTree:
        return inner_adapt(loss_fn, state.params, alpha, support, num_steps=1)

    def predict(state: PerFedAvgState, batch: ClientBatch) -> jax.Array:
        return predict_with(model, state.params, batch.x)

    return Algorithm(init=init, round=round_fn, predict=predict,
                     adapted_predict=adapted_predictor(personalise, model.apply, execution))


def _round_metrics(weights, losses, mean_delta) -> dict[str, jax.Array]:
    """The round's metrics; `init` calls it on an empty cohort so the structure never changes.

    `train_loss` is the clients' mean loss f(w~; D') at the adapted points of their local steps.
    """
    return round_metrics(weights, losses, **model_exchange_bytes(weights, mean_delta),
                         update_norm=optax.tree.norm(mean_delta).astype(jnp.result_type(float)))


SPECS = (AlgorithmSpec(
    "perfedavg", PerFedAvgConfig, build,
    paper="Fallah, Mokhtari, Ozdaglar, Personalized Federated Learning with Theoretical "
          "Guarantees: A Model-Agnostic Meta-Learning Approach, NeurIPS 2020, arXiv 2002.07948",
    summary="FedAvg of a MAML objective (first order, Hessian-free or exact); clients are "
            "scored after one step of alpha on their local data"),)
