"""pFedHN: a server hypernetwork generates each client's model from a learned client embedding.

References:
    Shamsian, Navon, Fetaya, Chechik. "Personalized Federated Learning using Hypernetworks."
    ICML 2021, arXiv 2103.04628.

Update: the server sends client i the generated weights theta_i = h(e_i; phi); the client trains
them locally to theta~_i and returns Delta_i = theta_i - theta~_i; the server steps on the
vector-Jacobian product J_{(phi, e_i)}(theta_i)^T Delta_i, which is the gradient of
1/2 ||h(e_i; phi) - sg(theta~_i)||^2. With one plain SGD step of size alpha it equals alpha times
the end-to-end gradient of the client's loss through the hypernetwork.

A cohort of K clients generalises the reference's one client per step: phi steps on
sum_i p_i J_phi^T Delta_i (p uniform by default: the reference's uniformly sampled client per
step, in expectation), and each sampled client's embedding e_i on its own J_{e_i}^T Delta_i, so
that an embedding learns at the same rate whatever K is. pFedHN-PC (`personal_head=True`)
generates only the feature extractor; each client trains it jointly with a private linear head,
which is never sent and persists in `client_states`. A new client is fitted with the
hypernetwork frozen (`freeze_network=True`): only the embeddings move.

Pitfalls avoided (ALGORITHMS.md section 9f): Delta is initial minus final (a descent direction);
clients receive generated weights, never the hypernetwork; weight decay and momentum on the
embedding table move unsampled rows too (as in the reference), so "only sampled rows change" holds
for plain SGD only. Choices recorded: local training is `num_epochs` passes over the client's
reshuffled data rather than K independently drawn batches; the client optimiser (the private
head's too) restarts each round, where the reference keeps the head's SGD momentum.
"""

import dataclasses
import math
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedjax_lab.algorithms.spec import AlgorithmSpec, ClientTraining
from fedjax_lab.core import (Algorithm, ClientBatch, ClientExecution, client_weights,
                             gather_clients, local_train, model_loss, participants_bytes,
                             scatter_clients, server_update, tree_bytes)
from fedjax_lab.core.aggregation import WEIGHTINGS, check_weighting
from fedjax_lab.core.metrics import initial_metrics, round_metrics
from fedjax_lab.core.types import DataInfo
from fedjax_lab.core.validation import check_positive_int
from fedjax_lab.models import Model
from fedjax_lab.models.split import SplitModel
from fedjax_lab.options import (OptionError, non_negative_int, one_of, option, optional,
                                optional_positive_int, positive, positive_int)

PyTree = Any
# Sub-streams of the init key.
_NETWORK_STREAM = 0
_EMBEDDING_STREAM = 1
_HEAD_STREAM = 2


@dataclasses.dataclass(frozen=True)
class PFedHNConfig:
    """pFedHN's options; defaults are the reference's (AvivSham/pFedHN): hypernetwork hidden 100
    with 3 hidden layers, embeddings of 1 + N // 4, its server optimiser (SGD momentum 0.9, weight
    decay 1e-3, clip 50, lr 1e-2 or 5e-2 for pFedHN-PC), batches of 64 and K = 50 inner steps,
    which on the ~29-example digits clients are 50 full-batch epochs. The registry's clients run
    plain SGD at 0.05 where the reference runs SGD 5e-3 with momentum 0.9 (the same long-run
    step) and weight decay; `pfedhn` takes any optax optimiser for the reference's exactly."""

    client: ClientTraining = option(ClientTraining(lr=0.05, epochs=50, batch_size=64),
                                    "inner training of the generated models")
    server_lr: float | None = option(None, "hypernetwork SGD rate; none = 1e-2 (5e-2 with "
                                     "personal_head)", optional(positive), sweepable=True)
    embedding_dim: int | None = option(None, "client embedding size m; none = 1 + N // 4",
                                       optional_positive_int)
    hidden: int = option(100, "hypernetwork hidden width", positive_int)
    num_hidden: int = option(3, "hypernetwork hidden-to-hidden layers", non_negative_int)
    personal_head: bool = option(False, "pFedHN-PC: generate the extractor only, each client "
                                 "keeps a private head (needs a split model)")
    weighting: str = option("uniform", "weights p_i of the hypernetwork update",
                            one_of(*WEIGHTINGS))


def build(config: PFedHNConfig, model: Model | SplitModel, data: DataInfo,
          execution: ClientExecution = ClientExecution()) -> Algorithm:
    if config.personal_head and not isinstance(model, SplitModel):
        raise OptionError("algorithm.personal_head", True,
                          "pFedHN-PC generates the feature extractor and keeps a private head "
                          "per client, so it needs a split model (extractor + head); choose one "
                          "that `fedjax-lab list` marks [split], or set personal_head false")
    server_optimizer = None
    if config.server_lr is not None:
        server_optimizer = reference_server_optimizer(config.server_lr)
    return pfedhn(model, config.client.optimizer(), num_clients=data.num_clients,
                  embedding_dim=config.embedding_dim, hidden=config.hidden,
                  num_hidden=config.num_hidden, server_optimizer=server_optimizer,
                  personal_head=config.personal_head, num_epochs=config.client.epochs,
                  batch_size=config.client.batch_size, weighting=config.weighting,
                  execution=execution)


class HyperNetworkParams(NamedTuple):
    """Attributes: network (phi, the MLP's parameters); embeddings (`[num_clients, m]`, one
    e_i per client). Both live on the server and are trained by its optimiser."""

    network: PyTree
    embeddings: jax.Array


class PFedHNClientState(NamedTuple):
    """Attributes: head, pFedHN-PC's private heads (leaves `[num_clients, ...]`)."""

    head: PyTree


class PFedHNState(NamedTuple):
    """Attributes:
        hypernetwork: a `HyperNetworkParams`, all server-side.
        opt_state: the server optimiser's state over `hypernetwork`.
        client_states: a `PFedHNClientState` for pFedHN-PC; () for pFedHN.
        round: int32.
        metrics: the round's scalars.
    """

    hypernetwork: HyperNetworkParams
    opt_state: PyTree
    client_states: PFedHNClientState | tuple
    round: jax.Array
    metrics: dict[str, jax.Array]


class HyperNetwork(nn.Module):
    """MLP on the client embedding, then one linear output per target tensor (the reference's)."""

    output_sizes: Sequence[int]
    hidden: int
    num_hidden: int

    @nn.compact
    def __call__(self, embedding):
        features = nn.Dense(self.hidden)(embedding)
        for _ in range(self.num_hidden):
            features = nn.Dense(self.hidden)(nn.relu(features))
        return tuple(nn.Dense(size, name=f"output_{k}")(features)
                     for k, size in enumerate(self.output_sizes))


def reference_server_optimizer(learning_rate: float = 1e-2) -> optax.GradientTransformation:
    """The reference's hypernetwork optimiser: clip 50, weight decay 1e-3, SGD momentum 0.9.

    Its learning rate is 1e-2 for pFedHN and 5e-2 for pFedHN-PC.
    """
    return optax.chain(optax.clip_by_global_norm(50.0), optax.add_decayed_weights(1e-3),
                       optax.sgd(learning_rate, momentum=0.9))


def pfedhn(target: Model | SplitModel, client_optimizer: optax.GradientTransformation, *,
           num_clients: int, embedding_dim: int | None = None, hidden: int = 100,
           num_hidden: int = 3, server_optimizer: optax.GradientTransformation | None = None,
           personal_head: bool = False, freeze_network: bool = False, num_epochs: int = 1,
           batch_size: int | None = 64, weighting: str = "uniform",
           execution: ClientExecution = ClientExecution(), unroll: int = 1) -> Algorithm:
    """Builds pFedHN, or pFedHN-PC with `personal_head=True`.

    Args:
        target: the client model whose parameters are generated (a `SplitModel` for PC).
        client_optimizer: optax optimiser of the clients' inner training (reference: SGD 5e-3,
            momentum 0.9, weight decay 5e-5, clip 50).
        num_clients: the population size (one embedding each).
        embedding_dim: m; default 1 + num_clients // 4, the reference's.
        hidden: width of the hypernetwork's hidden layers.
        num_hidden: hidden-to-hidden layers after the first (reference 3).
        server_optimizer: optax optimiser of phi and the embeddings; default
            `reference_server_optimizer` (lr 1e-2, or 5e-2 for PC).
        personal_head: pFedHN-PC: generate `target.extractor` only; clients keep a private head.
        freeze_network: update only the embeddings (fitting new clients); phi never changes.
        num_epochs: local epochs per round.
        batch_size: local batch; None is the full batch.
        weighting: weights p_i of the phi update, "uniform" or "num_examples".
        execution: how clients run.
        unroll: unroll factor of the local step loop.

    Returns:
        An `Algorithm` whose state is `PFedHNState`.
    """
    for name, value in (("num_clients", num_clients), ("hidden", hidden),
                        ("num_epochs", num_epochs)):
        check_positive_int(name, value)
    if embedding_dim is None:
        embedding_dim = 1 + num_clients // 4
    check_positive_int("embedding_dim", embedding_dim)
    if batch_size is not None:
        check_positive_int("batch_size", batch_size)
    if isinstance(num_hidden, bool) or not isinstance(num_hidden, int) or num_hidden < 0:
        raise ValueError(f"num_hidden={num_hidden!r} is invalid; expected an integer >= 0")
    if personal_head and not isinstance(target, SplitModel):
        raise ValueError("personal_head=True needs a SplitModel target (extractor + head)")
    check_weighting(weighting)
    if server_optimizer is None:
        server_optimizer = reference_server_optimizer(5e-2 if personal_head else 1e-2)
    if freeze_network:
        server_optimizer = optax.multi_transform(
            {"frozen": optax.set_to_zero(), "trained": server_optimizer},
            HyperNetworkParams(network="frozen", embeddings="trained"))

    generate, network_module = hypernetwork_generator(target, personal_head=personal_head,
                                                      hidden=hidden, num_hidden=num_hidden)
    template = _generated_template(target, personal_head)
    target_loss = model_loss(target.apply)

    def generate_cohort(network: PyTree, embeddings: jax.Array) -> PyTree:
        return jax.vmap(generate, in_axes=(None, 0))(network, embeddings)

    def full_params(theta: PyTree, head: PyTree) -> PyTree:
        return {"extractor": theta, "head": head} if personal_head else theta

    def init(key: jax.Array) -> PFedHNState:
        network = network_module.init(jax.random.fold_in(key, _NETWORK_STREAM),
                                      jnp.zeros((embedding_dim,), jnp.float32))["params"]
        # torch's nn.Embedding draws N(0, 1), as the reference's embeddings do.
        embeddings = jax.random.normal(jax.random.fold_in(key, _EMBEDDING_STREAM),
                                       (num_clients, embedding_dim), jnp.float32)
        hypernetwork = HyperNetworkParams(network, embeddings)
        client_states = ()
        if personal_head:
            head_key = jax.random.fold_in(key, _HEAD_STREAM)
            client_states = PFedHNClientState(jax.vmap(lambda i: target.init(
                jax.random.fold_in(head_key, i))["head"])(jnp.arange(num_clients)))
        empty = jnp.zeros((0,), jnp.float32)
        return PFedHNState(hypernetwork, server_optimizer.init(hypernetwork), client_states,
                           jnp.zeros((), jnp.int32),
                           initial_metrics(_round_metrics, empty, empty, jnp.zeros(0, jnp.int32),
                                           0, float(tree_bytes(template)),
                                           optax.tree.zeros_like(hypernetwork)))

    def round_fn(state: PFedHNState, batch: ClientBatch) -> PFedHNState:
        hypernetwork = state.hypernetwork
        thetas, pullback = jax.vjp(generate_cohort, hypernetwork.network,
                                   hypernetwork.embeddings[batch.client_ids])
        heads = _heads(state.client_states, batch.client_ids)

        def client_update(client):
            theta, head, x, y, mask, rng = client
            result = local_train(target_loss, client_optimizer, full_params(theta, head), x, y,
                                 mask, rng, num_epochs=num_epochs, batch_size=batch_size,
                                 unroll=unroll)
            trained = result.params["extractor"] if personal_head else result.params
            new_head = result.params["head"] if personal_head else ()
            return (optax.tree.sub(theta, trained), new_head, result.mean_loss,
                    result.num_steps)

        deltas, new_heads, losses, steps = execution.map(
            client_update, (thetas, heads, batch.x, batch.y, batch.mask, batch.rng))
        weights = client_weights(batch.num_examples, weighting=weighting)
        network_grad, _ = pullback(jax.tree.map(
            lambda delta: _per_client(weights, delta) * delta, deltas))
        _, embedding_grads = pullback(deltas)
        grads = HyperNetworkParams(network_grad, jnp.zeros_like(hypernetwork.embeddings).at[
            batch.client_ids].add(embedding_grads))
        hypernetwork, opt_state = server_update(hypernetwork, state.opt_state, grads,
                                                server_optimizer)
        client_states = state.client_states
        if personal_head:
            client_states = scatter_clients(client_states, batch.client_ids,
                                            PFedHNClientState(new_heads), batch.num_examples > 0)
        return PFedHNState(hypernetwork, opt_state, client_states, state.round + 1,
                           _round_metrics(weights, losses, steps, batch.num_clients,
                                          tree_bytes(_one_client(thetas)), grads))

    def predict(state: PFedHNState, batch: ClientBatch) -> jax.Array:
        thetas = generate_cohort(state.hypernetwork.network,
                                 state.hypernetwork.embeddings[batch.client_ids])
        heads = _heads(state.client_states, batch.client_ids)

        def client_logits(client):
            theta, head, x = client
            return target.apply(full_params(theta, head), x)

        return execution.map(client_logits, (thetas, heads, batch.x))

    # Initialising per-client models op by op compiles each op separately (seconds on CPU).
    return Algorithm(init=jax.jit(init), round=round_fn, predict=predict)


def hypernetwork_generator(target: Model | SplitModel, *, personal_head: bool = False,
                           hidden: int = 100, num_hidden: int = 3):
    """The map (phi, e) -> generated target parameters, and the hypernetwork's flax module.

    Returns:
        `(generate, module)`: `generate(network, embedding [m])` gives a pytree with the shapes
        and structure of `target.init(key)` (of its `"extractor"` part for pFedHN-PC); `module`
        is the `HyperNetwork` whose `init` builds `network`.
    """
    leaves, treedef = jax.tree.flatten(_generated_template(target, personal_head))
    module = HyperNetwork(tuple(math.prod(leaf.shape) for leaf in leaves), hidden, num_hidden)

    def generate(network: PyTree, embedding: jax.Array) -> PyTree:
        outputs = module.apply({"params": network}, embedding)
        return jax.tree.unflatten(treedef, [output.reshape(leaf.shape)
                                            for output, leaf in zip(outputs, leaves)])

    return generate, module


def _generated_template(target, personal_head: bool) -> PyTree:
    """Shapes and dtypes of what the hypernetwork generates."""
    template = jax.eval_shape(target.init, jax.random.key(0))
    return template["extractor"] if personal_head else template


def _heads(client_states: PFedHNClientState | tuple, client_ids: jax.Array) -> PyTree:
    """The cohort's private heads (pFedHN-PC), or () for pFedHN."""
    return gather_clients(client_states.head, client_ids) if client_states else ()


def _one_client(stacked: PyTree) -> PyTree:
    """Shapes and dtypes of one client's slice of a stacked pytree."""
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype), stacked)


def _per_client(weights: jax.Array, leaf: jax.Array) -> jax.Array:
    """`weights [K]` shaped to broadcast against a stacked leaf `[K, ...]`."""
    return weights.reshape((-1,) + (1,) * (leaf.ndim - 1)).astype(leaf.dtype)


def _round_metrics(weights, losses, steps, cohort_size, generated_bytes,
                   grads) -> dict[str, jax.Array]:
    """The round's scalars; `init` calls it on an empty cohort so the structure never changes.

    Every cohort client downloads its generated weights (`generated_bytes`); each participating
    client uploads Delta of the same size. pFedHN-PC's private heads never travel.
    """
    dtype = jnp.result_type(float)
    return round_metrics(
        weights, losses, bytes_down=cohort_size * generated_bytes,
        bytes_up=participants_bytes(weights, generated_bytes),
        local_steps=jnp.sum(jnp.where(weights > 0, steps, 0)).astype(jnp.int32),
        update_norm=optax.tree.norm(grads).astype(dtype))


SPECS = (AlgorithmSpec(
    "pfedhn", PFedHNConfig, build,
    paper="Shamsian, Navon, Fetaya, Chechik, Personalized Federated Learning using Hypernetworks, "
          "ICML 2021, arXiv 2103.04628",
    summary="a server hypernetwork generates each client's model from a learned embedding "
            "(pFedHN-PC: personal_head, split models)"),)
