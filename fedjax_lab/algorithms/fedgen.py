"""FedGen: data-free knowledge distillation through a server-side generator of latent features.

References:
    Zhu, Hong, Zhou. "Data-Free Knowledge Distillation for Heterogeneous Federated Learning."
    ICML 2021, arXiv 2105.10056.

Update (round t): clients train h(f(x)) on CE(h(f(x)), y) + alpha_t * CE(h(G(eps, y')), y') with y'
uniform over the labels and the generator G frozen (alpha_t = max(1e-4, alpha_0 0.98^t),
no term in round 0), and report label counts c_k(y). The server trains G on the round's client
heads, sum_k w_k(y) CE(h_k(G(eps, y)), y) with w_k(y) = c_k(y) / sum_j c_j(y), plus the diversity
loss exp(-mean_ab d(eps_a, eps_b) d(G_a, G_b)) (mean squared and mean absolute differences), then
averages the shared part as FedAvg does: the whole model, or (`sharing="head"`, the paper's
communication-light mode) only the head while each client keeps its extractor, whose architecture
may differ between clients.

Reference-code deviations from the paper, each a named option defaulting to the paper
(`REFERENCE_OPTIONS` selects them all): uniform [0, 1) noise commented as Gaussian
(`noise`); label counts starting at 1 and counted over the batches drawn (`label_counts`); the
undocumented "latent loss" beta_t KL(softmax(h(G(eps, y))) || p(x)) on the real batch's labels
(`beta_0`, FedGen#24). Not reproduced: the adversarial student term (off in the reference), the
generated-batch weight B_gen / B (1 at the defaults). With alpha_0 = 0 the term is off (the
reference's 1e-4 floor would keep it on), so alpha_0 = beta_0 = 0 without the generator is FedAvg
bit for bit. Pitfalls avoided (ALGORITHMS.md §12f): local batches are reshuffled every epoch
(FedGen#7); experiments report final accuracy, not the best test rounds.
"""

from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab.algorithms.fedavg import predict_with
from fedjax_lab.core import (Algorithm, ClientBatch, ClientExecution, client_weights,
                             cross_entropy, gather_clients, local_train, model_loss,
                             scatter_clients, server_update, tree_bytes, weighted_mean)
from fedjax_lab.core.distillation import kd_loss
from fedjax_lab.models.split import SplitModel

PyTree = Any
SHARINGS = ("all", "head")
NOISES = ("gaussian", "uniform")
LABEL_COUNTS = ("dataset", "drawn_batches")
REFERENCE_OPTIONS = {"noise": "uniform", "label_counts": "drawn_batches", "beta_0": 10.0}
# Key sub-streams: init of the generator and of the per-round server key; the client terms.
_GENERATOR_INIT_STREAM = 1
_SERVER_STREAM = 2
_TEACHER_TERM = 3
_LATENT_TERM = 4


class ConditionalGenerator(nn.Module):
    """G(eps, y): concat(noise, one-hot y) -> Dense -> BatchNorm -> ReLU -> Dense to the latent."""

    hidden: int
    latent_dim: int
    num_classes: int

    @nn.compact
    def __call__(self, noise, labels, train: bool):
        inputs = jnp.concatenate([noise, jax.nn.one_hot(labels, self.num_classes,
                                                        dtype=noise.dtype)], axis=-1)
        hidden = nn.Dense(self.hidden)(inputs)
        # PyTorch's BatchNorm1d defaults: running-average momentum 0.1, epsilon 1e-5.
        hidden = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(hidden)
        return nn.Dense(self.latent_dim)(nn.relu(hidden))


class FedGenState(NamedTuple):
    """Attributes: params (the shared part: whole model or `{"head"}`), opt_state, generator
    (`{"params", "batch_stats"}`), generator_opt_state, round, key, metrics, client_states
    (None, or `{"extractors": one stacked tree per architecture}` in head sharing)."""

    params: PyTree
    opt_state: PyTree
    generator: PyTree
    generator_opt_state: PyTree
    round: jax.Array
    key: jax.Array
    metrics: dict[str, jax.Array]
    client_states: PyTree


def client_label_counts(batch: ClientBatch, num_classes: int, *, mode: str = "dataset",
                        num_epochs: int = 1) -> jax.Array:
    """c_k(y) `[C, classes]` int32: each client's label counts ("dataset", the paper), or the
    reference's 1 + the labels of the batches drawn ("drawn_batches"), which `local_train`'s
    epochs make exactly 1 + num_epochs * the label counts."""
    counts = jnp.sum(jax.nn.one_hot(batch.y, num_classes, dtype=jnp.int32)
                     * batch.mask[..., None], axis=1)
    return 1 + num_epochs * counts if mode == "drawn_batches" else counts


def label_weights(label_counts: jax.Array, participating: jax.Array) -> jax.Array:
    """w_k(y) = c_k(y) / sum_j c_j(y) over participating clients: `[C, classes]`, each label's
    column summing to 1 (0 for a label no participating client counts)."""
    counts = jnp.where(participating[:, None], label_counts, 0).astype(jnp.result_type(float))
    total = jnp.sum(counts, axis=0)
    return jnp.where(total > 0, counts / jnp.where(total > 0, total, 1), 0)


def regularizer_weight(initial: float, round_index, decay: float = 0.98,
                       floor: float = 1e-4) -> jax.Array:
    """w_t = max(floor, w_0 decay^t) from round 1 on; 0 in round 0 and whenever w_0 = 0."""
    if initial == 0:
        return jnp.zeros((), jnp.result_type(float))
    round_index = jnp.asarray(round_index)
    decayed = initial * jnp.asarray(decay, jnp.result_type(float)) ** round_index
    return jnp.where(round_index > 0, jnp.maximum(floor, decayed), 0.0)


def diversity_loss(noise: jax.Array, latents: jax.Array) -> jax.Array:
    """exp(-mean_ab d_noise(a, b) d_out(a, b)): mean squared noise distance times mean absolute
    output distance over all pairs; in (0, 1], and 1 when the outputs ignore the noise."""
    noise_distance = jnp.mean((noise[:, None] - noise[None]) ** 2, axis=-1)
    latent_distance = jnp.mean(jnp.abs(latents[:, None] - latents[None]), axis=-1)
    return jnp.exp(-jnp.mean(noise_distance * latent_distance))


def fedgen(model: SplitModel, client_optimizer: optax.GradientTransformation, *,
           server_optimizer: optax.GradientTransformation | None = None, num_epochs: int = 1,
           batch_size: int | None = 32, weighting: str = "num_examples", sharing: str = "all",
           num_clients: int | None = None,
           client_architectures: Sequence[SplitModel] | None = None,
           architecture_of_client: Sequence[int] | None = None, use_generator: bool = True,
           alpha_0: float = 10.0, beta_0: float = 0.0, regularizer_decay: float = 0.98,
           regularizer_floor: float = 1e-4, generated_batch_size: int = 32,
           noise: str = "gaussian", label_counts: str = "dataset", noise_dim: int = 32,
           generator_hidden: int = 256, generator_steps: int = 50, generator_batch_size: int = 32,
           generator_learning_rate: float = 3e-4, generator_weight_decay: float = 1e-2,
           generator_lr_decay: float = 0.98, teacher_weight: float = 1.0,
           diversity_weight: float = 1.0, execution: ClientExecution = ClientExecution(),
           unroll: int = 1) -> Algorithm:
    """Builds FedGen (defaults: the reference's MNIST settings where the paper is silent).

    Args:
        model: the extractor + head model; its head is what the generator's latents feed.
        client_optimizer: optax optimiser of local training.
        server_optimizer: optimiser on the mean delta of the shared part; default plain averaging.
        num_epochs: local epochs per round. batch_size: local batch (None: full batch).
        weighting: aggregation weights, "num_examples" or "uniform" (as in FedAvg).
        sharing: "all" (FedAvg of the whole model) or "head" (only the head is shared).
        num_clients: population size; required by head sharing (extractors stay on clients).
        client_architectures: head sharing only: the models whose extractors clients use
            (heads ignored; default `(model,)`); all must produce `model.latent_dim` features.
        architecture_of_client: `[num_clients]` index into `client_architectures` per client.
        use_generator: train the generator; False needs alpha_0 = beta_0 = 0.
        alpha_0, beta_0: initial weights of the generated-latent CE term and of the reference's
            latent KL term (0 turns a term off); decayed as max(floor, w_0 * decay^t) from round 1.
        regularizer_decay, regularizer_floor: that schedule (reference 0.98, 1e-4).
        generated_batch_size: generated latents per local step for the CE term.
        noise: "gaussian" (paper) or "uniform" on [0, 1) (reference code).
        label_counts: "dataset" (each client's label counts, paper) or "drawn_batches" (1 plus
            the labels of the batches drawn, reference; every epoch draws each example once).
        noise_dim, generator_hidden: generator sizes (reference MNIST 32, 256).
        generator_steps, generator_batch_size: server Adam steps per round and their batch.
        generator_learning_rate, generator_weight_decay, generator_lr_decay: Adam with coupled
            (PyTorch-style) weight decay, learning rate times decay^t (reference 3e-4, 1e-2, 0.98).
        teacher_weight, diversity_weight: alpha_gen and eta_div of the generator loss.
        execution: how clients run. unroll: unroll factor of the local step loop.

    Returns:
        An `Algorithm` whose state is `FedGenState`.
    """
    _validate(locals())
    if not use_generator and (alpha_0 > 0 or beta_0 > 0):
        raise ValueError(f"use_generator=False needs alpha_0 = beta_0 = 0 (got alpha_0={alpha_0}, "
                         f"beta_0={beta_0}): the client terms sample the generator")
    if sharing == "all" and (client_architectures is not None or num_clients is not None):
        raise ValueError("client_architectures and num_clients are for sharing='head'; with "
                         "sharing='all' every client trains the shared model")
    if sharing == "head" and num_clients is None:
        raise ValueError("sharing='head' needs num_clients (each client keeps its extractor)")
    architectures = tuple(client_architectures or (model,))
    assignment = _architecture_assignment(architectures, architecture_of_client, num_clients,
                                          model)
    server_optimizer = optax.sgd(1.0) if server_optimizer is None else server_optimizer
    generator = ConditionalGenerator(generator_hidden, model.latent_dim, model.num_classes)
    generator_optimizer = optax.chain(optax.add_decayed_weights(generator_weight_decay),
                                      optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8))
    uses_generator_on_clients = alpha_0 > 0 or beta_0 > 0

    def head_logits(params, latents):
        return model.head.apply(params["head"], latents)

    def sample_noise(key, shape):
        sampler = jax.random.normal if noise == "gaussian" else jax.random.uniform
        return sampler(key, shape)

    def generate(variables, key, labels, train=False):
        eps = sample_noise(key, (labels.shape[0], noise_dim))
        return eps, generator.apply(variables, eps, labels, train=train,
                                    mutable=["batch_stats"] if train else False)

    def extract_with(architecture, extractors, x):
        branches = [lambda p, x, arch=arch, j=j: arch.extractor.apply(p[j], x)
                    for j, arch in enumerate(architectures)]
        if len(branches) == 1:
            return branches[0](extractors, x)
        return jax.lax.switch(architecture, branches, extractors, x)

    def init(key: jax.Array) -> FedGenState:
        params = model.init(key)
        client_states = None
        if sharing == "head":
            extractors = tuple(params["extractor"] if j == 0 else
                               arch.init(jax.random.fold_in(key, j))["extractor"]
                               for j, arch in enumerate(architectures))
            client_states = {"extractors": jax.tree.map(
                lambda p: jnp.repeat(p[None], num_clients, axis=0), extractors)}
            params = {"head": params["head"]}
        variables = generator.init(jax.random.fold_in(key, _GENERATOR_INIT_STREAM),
                                   jnp.zeros((1, noise_dim)), jnp.zeros((1,), jnp.int32),
                                   train=False)
        empty = jnp.zeros(0)
        return FedGenState(params, server_optimizer.init(params), variables,
                           generator_optimizer.init(variables["params"]),
                           jnp.zeros((), jnp.int32), jax.random.fold_in(key, _SERVER_STREAM),
                           _round_metrics(empty, empty, jnp.zeros(0, jnp.int32),
                                          optax.tree.zeros_like(params), 0.0, 0.0, 0.0, 0.0),
                           client_states)

    def client_loss(variables, regularizer_weights, extract):
        if not uses_generator_on_clients:
            return model_loss(model.apply if sharing == "all" else
                              lambda params, x: head_logits(params, extract(params, x)))
        alpha_t, beta_t = regularizer_weights

        def loss(params, x, y, mask, rng):
            logits = head_logits(params, extract(params, x))
            loss = cross_entropy(logits, y, mask)
            if alpha_0 > 0:
                label_key, noise_key = jax.random.split(jax.random.fold_in(rng, _TEACHER_TERM))
                sampled = jax.random.randint(label_key, (generated_batch_size,), 0,
                                             model.num_classes)
                _, latents = generate(variables, noise_key, sampled)
                loss = loss + alpha_t * jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
                    head_logits(params, latents), sampled))
            if beta_0 > 0:
                _, latents = generate(variables, jax.random.fold_in(rng, _LATENT_TERM), y)
                loss = loss + beta_t * kd_loss(logits, head_logits(params, latents), mask)
            return loss

        return loss

    def train_generator(state, heads, weights, qualified):
        label_probabilities = qualified / jnp.maximum(jnp.sum(qualified), 1)
        learning_rate = generator_learning_rate * generator_lr_decay ** state.round.astype(
            jnp.result_type(float))

        def loss_fn(params, batch_stats, key):
            label_key, noise_key = jax.random.split(key)
            labels = jax.random.choice(label_key, model.num_classes, (generator_batch_size,),
                                       p=label_probabilities)
            eps, (latents, updates) = generate({"params": params, "batch_stats": batch_stats},
                                               noise_key, labels, train=True)
            logits = execution.map(lambda head: model.head.apply(head, latents), heads)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels[None])
            teacher = jnp.sum(jnp.mean(weights[:, labels] * ce, axis=1))
            diversity = diversity_loss(eps, latents)
            total = teacher_weight * teacher + diversity_weight * diversity
            return total, (updates["batch_stats"], teacher, diversity)

        def step(carry, index):
            variables, opt_state = carry
            grads, (batch_stats, teacher, diversity) = jax.grad(loss_fn, has_aux=True)(
                variables["params"], variables["batch_stats"],
                jax.random.fold_in(jax.random.fold_in(state.key, state.round), index))
            updates, opt_state = generator_optimizer.update(grads, opt_state, variables["params"])
            params = optax.apply_updates(variables["params"],
                                         optax.tree.scale(-learning_rate, updates))
            return ({"params": params, "batch_stats": batch_stats}, opt_state), (teacher,
                                                                                 diversity)

        (variables, opt_state), (teacher, diversity) = jax.lax.scan(
            step, (state.generator, state.generator_opt_state), jnp.arange(generator_steps))
        return variables, opt_state, jnp.mean(teacher), jnp.mean(diversity)

    def round_fn(state: FedGenState, batch: ClientBatch) -> FedGenState:
        weights_t = tuple(regularizer_weight(w0, state.round, regularizer_decay, regularizer_floor)
                          for w0 in (alpha_0, beta_0))
        if sharing == "all":
            # The global model is closed over, not broadcast, so that without the generator the
            # compiled client program is FedAvg's, bit for bit.
            own_architecture = jnp.zeros(batch.num_clients, jnp.int32)
            starts = jnp.zeros(batch.num_clients)
        else:
            cohort = gather_clients(state.client_states, batch.client_ids)
            own_architecture = jnp.asarray(assignment)[batch.client_ids]
            starts = cohort["extractors"]

        def client_update(client):
            start, architecture, x, y, mask, rng = client
            if sharing == "all":
                start, own_extract = state.params, model.extract
            else:
                start = {"extractor": start, "head": state.params["head"]}
                own_extract = lambda params, x: extract_with(architecture, params["extractor"], x)
            loss_fn = client_loss(state.generator, weights_t, own_extract)
            result = local_train(loss_fn, client_optimizer, start, x, y, mask, rng,
                                 num_epochs=num_epochs, batch_size=batch_size, unroll=unroll)
            return result.params, result.mean_loss, result.num_steps

        trained, losses, steps = execution.map(
            client_update, (starts, own_architecture, batch.x, batch.y, batch.mask, batch.rng))
        weights = client_weights(batch.num_examples, weighting=weighting)
        participating = batch.num_examples > 0
        counts = client_label_counts(batch, model.num_classes, mode=label_counts,
                                     num_epochs=num_epochs)
        per_label = label_weights(counts, participating)
        # The reference's "qualified" labels (max count > 1 with counts starting at 1): the
        # labels some participating client holds; only they are generated.
        held = client_label_counts(batch, model.num_classes) > 0
        qualified = jnp.any(held & participating[:, None], axis=0)
        generator, generator_opt_state = state.generator, state.generator_opt_state
        teacher = diversity = jnp.zeros((), jnp.result_type(float))
        if use_generator:
            generator, generator_opt_state, teacher, diversity = train_generator(
                state, trained["head"], per_label, qualified)

        shared = state.params
        deltas = optax.tree.sub(shared,
                                trained if sharing == "all" else {"head": trained["head"]})
        mean_delta = weighted_mean(deltas, weights)
        params, opt_state = server_update(shared, state.opt_state, mean_delta, server_optimizer)
        client_states = state.client_states
        if sharing == "head":
            kept = _keep_own_architecture(own_architecture, trained["extractor"],
                                          cohort["extractors"])
            client_states = scatter_clients(client_states, batch.client_ids,
                                            {"extractors": kept}, participating)
        down = tree_bytes(shared) + (tree_bytes(state.generator) if uses_generator_on_clients
                                     else 0)
        up = tree_bytes(shared) + (model.num_classes * counts.dtype.itemsize if use_generator
                                   else 0)
        return FedGenState(params, opt_state, generator, generator_opt_state, state.round + 1,
                           state.key, _round_metrics(weights, losses, steps, mean_delta, teacher,
                                                     diversity, down, up), client_states)

    def predict(state: FedGenState, batch: ClientBatch) -> jax.Array:
        if sharing == "all":
            return predict_with(model, state.params, batch.x)
        extractors = gather_clients(state.client_states["extractors"], batch.client_ids)

        def client_logits(client):
            architecture, own, x = client
            return head_logits(state.params, extract_with(architecture, own, x))

        return execution.map(client_logits, (jnp.asarray(assignment)[batch.client_ids],
                                             extractors, batch.x))

    return Algorithm(init=init, round=round_fn, predict=predict)


def _keep_own_architecture(architecture, trained, previous):
    """Each client's trained extractor of its own architecture `[C]`; its others unchanged."""

    def keep(j, new, old):
        own = (architecture == j).reshape((-1,) + (1,) * (new.ndim - 1))
        return jnp.where(own, new, old)

    return tuple(jax.tree.map(lambda new, old, j=j: keep(j, new, old), t, p)
                 for j, (t, p) in enumerate(zip(trained, previous)))


def _architecture_assignment(architectures, architecture_of_client, num_clients, model):
    for j, arch in enumerate(architectures):
        if (arch.latent_dim, arch.num_classes, tuple(arch.feature_shape)) != (
                model.latent_dim, model.num_classes, tuple(model.feature_shape)):
            raise ValueError(f"client_architectures[{j}] maps {arch.feature_shape} to "
                             f"{arch.latent_dim} features; expected {model.feature_shape} to "
                             f"{model.latent_dim} like model")
    if architecture_of_client is None:
        if len(architectures) > 1:
            raise ValueError("client_architectures has several models; give "
                             "architecture_of_client, one index per client")
        return np.zeros(num_clients or 1, np.int32)
    assignment = np.asarray(architecture_of_client)
    if assignment.shape != (num_clients,) or not np.issubdtype(assignment.dtype, np.integer) \
            or assignment.min() < 0 or assignment.max() >= len(architectures):
        raise ValueError(f"architecture_of_client={architecture_of_client!r} is invalid; "
                         f"expected {num_clients} integers in [0, {len(architectures)})")
    return assignment.astype(np.int32)


def _validate(options: dict) -> None:
    choices = {"sharing": SHARINGS, "noise": NOISES, "label_counts": LABEL_COUNTS}
    for name, allowed in choices.items():
        if options[name] not in allowed:
            raise ValueError(f"{name} {options[name]!r} is unknown; allowed: {', '.join(allowed)}")
    for name in ("num_epochs", "generated_batch_size", "noise_dim", "generator_hidden",
                 "generator_steps", "generator_batch_size", "batch_size", "num_clients"):
        value = options[name]
        if value is None and name in ("batch_size", "num_clients"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid; expected a positive integer")
    for name in ("alpha_0", "beta_0", "regularizer_floor", "generator_learning_rate",
                 "generator_weight_decay", "teacher_weight", "diversity_weight"):
        if not options[name] >= 0:
            raise ValueError(f"{name}={options[name]!r} is invalid; expected {name} >= 0")
    for name in ("regularizer_decay", "generator_lr_decay"):
        if not 0 < options[name] <= 1:
            raise ValueError(f"{name}={options[name]!r} is invalid; expected 0 < {name} <= 1")
    client_weights(jnp.ones(1), weighting=options["weighting"])


def _round_metrics(weights, losses, steps, mean_delta, teacher, diversity, down,
                   up) -> dict[str, jax.Array]:
    """The round's scalars; `init` calls it on empty cohorts so the structure never changes."""
    dtype = jnp.result_type(float)
    return {
        "bytes_down": jnp.asarray(weights.shape[0] * down, dtype),
        "bytes_up": (jnp.sum(weights > 0) * up).astype(dtype),
        "train_loss": jnp.sum(weights * losses).astype(dtype),
        "participants": jnp.sum(weights > 0).astype(jnp.int32),
        "local_steps": jnp.sum(jnp.where(weights > 0, steps, 0)).astype(jnp.int32),
        "update_norm": optax.tree.norm(mean_delta).astype(dtype),
        "generator_teacher_loss": jnp.asarray(teacher, dtype),
        "generator_diversity_loss": jnp.asarray(diversity, dtype),
    }
