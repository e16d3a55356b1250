"""Shared pieces of federated meta-learning: support/query splits, inner adaptation, the
meta-gradient and the `adapted_predict` of algorithms whose clients adapt before they predict.

References:
    Finn, Abbeel, Levine. "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks."
    ICML 2017, arXiv 1703.03400 (MAML, FOMAML).
    Li, Zhou, Chen, Li. "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning."
    arXiv 1707.09835 (learned per-parameter inner learning rates).
    Chen, Luo, Dong, Li, He. "Federated Meta-Learning with Fast Convergence and Efficient
    Communication." arXiv 1802.07876 (FedMeta; fedmeta.py).
    Fallah, Mokhtari, Ozdaglar. "Personalized Federated Learning with Theoretical Guarantees: A
    Model-Agnostic Meta-Learning Approach." NeurIPS 2020, arXiv 2002.07948 (perfedavg.py).

Inner adaptation runs K steps theta <- theta - alpha (*) grad L_S(theta) on the support set (alpha
a scalar, or a pytree of per-parameter rates for Meta-SGD). The meta-gradient is `jax.grad` of
theta -> L_Q(inner(theta)) with the inner gradients computed inside the differentiated function,
so the chain of factors (I - alpha grad^2 L_S) is exact; FOMAML is the same function with the
inner gradients stop-gradiented. Reverse mode through K inner steps keeps every step's
activations; `remat=True` wraps each step in `jax.checkpoint`, so only the K parameter iterates
are kept and each step's forward and backward pass is recomputed during the meta-backward pass.

Pitfalls avoided (ALGORITHMS.md section 10f): a silently first-order MAML (the inner gradient
computed outside the traced function); support and query overlapping (one permutation of the
client's real examples, cut in two); padding leaking into either set (slot masks); scoring a
client on the examples it adapted on (`adapted_predict` adapts on one batch and predicts another;
`fedjax_lab.evaluation` gives it a client's training data and scores its test data).
"""

import enum
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.core.client_execution import ClientExecution
from fedjax_lab.core.local_training import epoch_permutation
from fedjax_lab.core.losses import cross_entropy
from fedjax_lab.core.types import Algorithm, ClientBatch, PyTree, ServerState

# loss_fn(params, data) -> scalar, where data is whatever pytree the loss reads, e.g. (x, y, mask).
DataLoss = Callable[[PyTree, Any], jax.Array]
# adapt_client(server_state, support=(x, y, mask)) -> one client's adapted parameters.
AdaptFn = Callable[[ServerState, tuple], PyTree]


class MetaStream(enum.IntEnum):
    """Sub-streams of a client's round key used only by meta-learning (after `ClientStream`)."""

    SPLIT = 16
    BATCHES = 17


class SupportQuery(NamedTuple):
    """One client's disjoint support and query sets as index slots into its padded examples.

    Attributes: support_indices `[S]`, support_mask `[S]`, query_indices `[Q]`, query_mask `[Q]`
    (slots beyond the client's own counts are masked), num_support and num_query (int32).
    """

    support_indices: jax.Array
    support_mask: jax.Array
    query_indices: jax.Array
    query_mask: jax.Array
    num_support: jax.Array
    num_query: jax.Array

    def support(self, x: jax.Array, y: jax.Array) -> tuple:
        return x[self.support_indices], y[self.support_indices], self.support_mask

    def query(self, x: jax.Array, y: jax.Array) -> tuple:
        return x[self.query_indices], y[self.query_indices], self.query_mask


def check_fraction(name: str, value, *, low: float = 0.0, high: float = 1.0) -> None:
    """Raises a one-line ValueError unless `low < value < high`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value < high:
        raise ValueError(f"{name}={value!r} is invalid; expected a number in ({low:g}, {high:g})")


def support_sizes(padded_length: int, support_fraction: float) -> np.ndarray:
    """Support-set size for a client of n = 0..padded_length real examples.

    fraction * n rounded half up, clipped to [1, n - 1], so a client with n >= 2 has a support
    and a query set; a one-example client has only a support set. A static table (looked up with the
    traced n) keeps the traced sizes and the static slot counts exactly consistent.
    """
    n = np.arange(padded_length + 1)
    sizes = np.clip(np.floor(support_fraction * n + 0.5), 1, np.maximum(n - 1, 1))
    return np.where(n >= 2, sizes, n).astype(np.int32)


def split_support_query(key: jax.Array, mask: jax.Array, support_fraction: float) -> SupportQuery:
    """Splits one client's real examples (mask True) at random into support and query sets.

    The split is one permutation of the real examples (`epoch_permutation` on the client's
    `MetaStream.SPLIT` stream, independent of padding), its first `support_sizes(...)[n]` entries
    the support and the rest the query, so the two sets are disjoint and cover the client.
    """
    padded_length = mask.shape[0]
    table = support_sizes(padded_length, support_fraction)
    support_slots = int(table.max())
    query_slots = max(int((np.arange(padded_length + 1) - table).max()), 1)
    num_real = jnp.sum(mask, dtype=jnp.int32)
    num_support = jnp.asarray(table)[num_real]
    num_query = num_real - num_support
    order = epoch_permutation(jax.random.fold_in(key, MetaStream.SPLIT), mask)
    # Room after the last example, so the query slice never has its start clamped.
    order = jnp.concatenate([order, jnp.zeros(query_slots, order.dtype)])
    return SupportQuery(
        support_indices=order[:support_slots],
        support_mask=jnp.arange(support_slots) < num_support,
        query_indices=jax.lax.dynamic_slice_in_dim(order, num_support, query_slots),
        query_mask=jnp.arange(query_slots) < num_query,
        num_support=num_support, num_query=num_query)


def model_data_loss(apply_fn: Callable[[PyTree, jax.Array], jax.Array]) -> DataLoss:
    """Mean cross-entropy over the real examples of `data = (x, y, mask)`."""

    def loss(params: PyTree, data: tuple) -> jax.Array:
        x, y, mask = data
        return cross_entropy(apply_fn(params, x), y, mask)

    return loss


def sgd_step(params: PyTree, grads: PyTree, learning_rates) -> PyTree:
    """params - learning_rates * grads, with one scalar rate or a pytree of per-parameter rates."""
    if isinstance(learning_rates, (int, float)) or getattr(learning_rates, "ndim", None) == 0:
        return jax.tree.map(lambda p, g: p - learning_rates * g, params, grads)
    return jax.tree.map(lambda p, g, a: p - a * g, params, grads, learning_rates)


def inner_adapt(loss_fn: DataLoss, params: PyTree, inner_lrs, support, *, num_steps: int,
                first_order: bool = False, remat: bool = False) -> PyTree:
    """`num_steps` full-batch gradient steps on the support data, differentiable end to end.

    Args:
        loss_fn: `loss_fn(params, support)`.
        params: the starting parameters theta.
        inner_lrs: alpha, a scalar or a pytree like `params` (Meta-SGD).
        support: the data `loss_fn` reads.
        num_steps: inner steps K (static).
        first_order: stop-gradient the inner gradients (FOMAML: d theta' / d theta = I).
        remat: recompute each step in the backward pass instead of storing its activations.
    """

    def step(current, _):
        grads = jax.grad(loss_fn)(current, support)
        if first_order:
            grads = jax.lax.stop_gradient(grads)
        return sgd_step(current, grads, inner_lrs), None

    if remat:
        step = jax.checkpoint(step)
    adapted, _ = jax.lax.scan(step, params, None, length=num_steps)
    return adapted


def meta_gradient(loss_fn: DataLoss, params: PyTree, inner_lrs, support, query, *,
                  num_steps: int, first_order: bool = False, remat: bool = False,
                  learn_inner_lrs: bool = False):
    """The query loss after adaptation and its gradient through the inner loop.

    Returns `(L_Q(theta'), grad)` where grad is d L_Q / d theta, or the pair (d / d theta,
    d / d alpha) when `learn_inner_lrs` (Meta-SGD). Other arguments as in `inner_adapt`.
    """

    def objective(params, inner_lrs):
        adapted = inner_adapt(loss_fn, params, inner_lrs, support, num_steps=num_steps,
                              first_order=first_order, remat=remat)
        return loss_fn(adapted, query)

    argnums = (0, 1) if learn_inner_lrs else 0
    return jax.value_and_grad(objective, argnums=argnums)(params, inner_lrs)


def adapted_predictor(adapt_client: AdaptFn, apply_fn, execution: ClientExecution):
    """`adapted_predict(state, support, query)` of an `Algorithm` from one client's adaptation
    rule: each client adapts on the real examples of its `support` row, then predicts its
    `query` row, so a client is never scored on the examples it adapted on."""

    def adapted_predict(state, support: ClientBatch, query: ClientBatch) -> jax.Array:
        def client(data):
            x, y, mask, query_x = data
            return apply_fn(adapt_client(state, (x, y, mask)), query_x)

        return execution.map(client, (support.x, support.y, support.mask, query.x))

    return adapted_predict


def with_adaptation(algorithm: Algorithm, model, *, inner_lr: float, num_inner_steps: int = 1,
                    execution: ClientExecution = ClientExecution()) -> Algorithm:
    """`algorithm` trained as it is, adapted by `num_inner_steps` local steps of lr `inner_lr`.

    "FedAvg(Meta)" of FedMeta and "FedAvg + one step" of Per-FedAvg; `state.params` must be the
    global model. `predict` stays `algorithm.predict` (the global model, unadapted).
    """
    loss_fn = model_data_loss(model.apply)

    def adapt_client(state, support):
        return inner_adapt(loss_fn, state.params, inner_lr, support, num_steps=num_inner_steps)

    return algorithm._replace(
        adapted_predict=adapted_predictor(adapt_client, model.apply, execution))


def split_clients(num_clients: int, test_fraction: float, seed: int):
    """Seeded split of client indices into (meta-train, unseen test) index arrays, each sorted.

    round(test_fraction * num_clients) test clients, at least one of each kind.
    """
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 2:
        raise ValueError(f"num_clients={num_clients!r} is invalid; expected an integer >= 2")
    check_fraction("test_fraction", test_fraction)
    num_test = min(max(int(round(test_fraction * num_clients)), 1), num_clients - 1)
    order = np.random.default_rng(seed).permutation(num_clients)
    return np.sort(order[num_test:]), np.sort(order[:num_test])
