"""FedGen's generator of latent features: the model, its training, and the client terms using it.

References:
    Zhu, Hong, Zhou. "Data-Free Knowledge Distillation for Heterogeneous Federated Learning."
    ICML 2021, arXiv 2105.10056.

The generator G(eps, y) maps noise and a label to a latent feature that the clients' heads should
classify as y. Each round the server trains it, with the clients' models frozen, on
alpha_gen * teacher + eta_div * diversity over generated batches of "qualified" labels (those some
participating client holds):

    teacher   = sum_k (1/B) sum_b w_k(y_b) CE(h_k(G(eps_b, y_b)), y_b)          ("paper")
    diversity = exp(-mean_ab d_noise(eps_a, eps_b) d_out(G_a, G_b))

with w_k(y) = c_k(y) / sum_j c_j(y) the share of label y that client k holds (the paper's label
distribution sharing). The authors' code multiplies a `[B]` vector of cross-entropies by a
`[B, 1]` column of weights and averages the `[B, B]` broadcast, so each client's term there is
mean_b w_k(y_b) * mean_b CE_kb: a client's weight no longer follows the label of each sample.
`teacher_loss="reference"` reproduces that; "paper" (the default) weights each sample.

Clients use the frozen G as a regulariser (`client_terms`): alpha_t CE(h(G(eps, y')), y') on
labels y' drawn uniformly, and the reference's undocumented latent loss beta_t KL(softmax(h(G(eps,
y))) || p(x)) on the real batch's labels, both weighted by max(floor, w_0 decay^t) from round 1.

Pitfalls avoided (ALGORITHMS.md §12f): the reference draws the noise uniform on [0, 1) while
commenting it as Gaussian (`noise` names both); its label counts start at 1 and count the batches
drawn (`client_label_counts(mode="drawn_batches")`).
"""

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedjax_lab.core import ClientBatch, ClientExecution
from fedjax_lab.core.distillation import kd_loss
from fedjax_lab.core.validation import is_zero
from fedjax_lab.models import Model
from fedjax_lab.options import non_negative, one_of, option, positive, positive_int

PyTree = Any
NOISES = ("gaussian", "uniform")
LABEL_COUNTS = ("dataset", "drawn_batches")
TEACHER_LOSSES = ("paper", "reference")
# Sub-streams of a local step's key for the two client terms.
_TEACHER_TERM = 3
_LATENT_TERM = 4


def decay_factor(value) -> str | None:
    return None if 0 < value <= 1 else "expected a factor in (0, 1]"


@dataclasses.dataclass(frozen=True)
class GeneratorTraining:
    """The generator and its training each round; defaults are the reference's MNIST settings
    (the paper gives none), with the paper's Gaussian noise and per-sample teacher weights."""

    noise: str = option("gaussian", "noise eps: the paper's gaussian, or uniform on [0, 1) as "
                        "the reference code draws it", one_of(*NOISES))
    noise_dim: int = option(32, "noise dimension", positive_int)
    hidden: int = option(256, "hidden width of G", positive_int)
    steps: int = option(50, "server Adam steps per round", positive_int)
    batch_size: int = option(32, "generated samples per server step", positive_int)
    lr: float = option(3e-4, "Adam learning rate", positive, sweepable=True)
    weight_decay: float = option(1e-2, "coupled (PyTorch-style) weight decay", non_negative,
                                 sweepable=True)
    lr_decay: float = option(0.98, "learning-rate factor per round", decay_factor,
                             sweepable=True)
    teacher_weight: float = option(1.0, "alpha_gen, weight of the teacher loss", non_negative,
                                   sweepable=True)
    diversity_weight: float = option(1.0, "eta_div, weight of the diversity loss",
                                     non_negative, sweepable=True)
    teacher_loss: str = option("paper", "per-sample weights w_k(y) (paper) or the authors' "
                               "mean(w) * mean(CE) per client (reference)",
                               one_of(*TEACHER_LOSSES))


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


@functools.cache
def _initial_variables(hidden: int, latent_dim: int, num_classes: int,
                       noise_dim: int) -> Callable:
    """The generator's flax init as one compiled program per shape, shared by every build (the
    next seed or rate): eager, its forward pass was some 30 programs to compile, or to read from
    the persistent cache, in every process. Bit for bit the eager init's variables."""
    module = ConditionalGenerator(hidden, latent_dim, num_classes)
    return jax.jit(lambda key: module.init(key, jnp.zeros((1, noise_dim)),
                                           jnp.zeros((1,), jnp.int32), train=False))


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


def weighted_teacher_loss(cross_entropies: jax.Array, sample_weights: jax.Array,
                 form: str = "paper") -> jax.Array:
    """The generator's teacher loss from each client's CE on each generated sample.

    Args:
        cross_entropies: `[K, B]` CE(h_k(G(eps_b, y_b)), y_b).
        sample_weights: `[K, B]` w_k(y_b).
        form: "paper", sum_k mean_b w_k(y_b) CE_kb; or "reference", the authors' code,
            sum_k mean_b w_k(y_b) * mean_b CE_kb (their `[B] * [B, 1]` broadcast).
    """
    if form == "reference":
        return jnp.sum(jnp.mean(sample_weights, axis=1) * jnp.mean(cross_entropies, axis=1))
    return jnp.sum(jnp.mean(sample_weights * cross_entropies, axis=1))


def diversity_loss(noise: jax.Array, latents: jax.Array) -> jax.Array:
    """exp(-mean_ab d_noise(a, b) d_out(a, b)): mean squared noise distance times mean absolute
    output distance over all pairs; in (0, 1], and 1 when the outputs ignore the noise."""
    noise_distance = jnp.mean((noise[:, None] - noise[None]) ** 2, axis=-1)
    latent_distance = jnp.mean(jnp.abs(latents[:, None] - latents[None]), axis=-1)
    return jnp.exp(-jnp.mean(noise_distance * latent_distance))


class Generator(NamedTuple):
    """FedGen's generator as pure functions over `(variables, opt_state)`.

    Attributes:
        init: `init(key) -> (variables, opt_state)`, variables `{"params", "batch_stats"}`.
        generate: `generate(variables, key, labels [B]) -> latents [B, latent_dim]`, inference
            mode (what clients sample).
        train: `train(variables, opt_state, heads, weights, qualified, round_index, key) ->
            (variables, opt_state, mean teacher loss, mean diversity loss)`: the round's
            generator steps against the stacked client `heads` `[K, ...]`, with label weights
            `[K, classes]` and the `qualified [classes]` labels that are generated.
    """

    init: Callable
    generate: Callable
    train: Callable


def fedgen_generator(head: Model, latent_dim: int, *, noise: str = "gaussian",
                     noise_dim: int = 32, hidden: int = 256, steps: int = 50,
                     batch_size: int = 32, learning_rate: float = 3e-4,
                     weight_decay: float = 1e-2, lr_decay: float = 0.98,
                     teacher_weight: float = 1.0, diversity_weight: float = 1.0,
                     teacher_loss: str = "paper",
                     execution: ClientExecution = ClientExecution()) -> Generator:
    """Builds the generator and its training (defaults: the reference's MNIST settings).

    Args:
        head: the clients' head model (latent features to logits) the generator feeds.
        latent_dim: the width of the latent features.
        noise: "gaussian" (paper) or "uniform" on [0, 1) (reference code).
        noise_dim, hidden: generator sizes (reference MNIST 32, 256).
        steps, batch_size: server Adam steps per round and their generated batch.
        learning_rate, weight_decay, lr_decay: Adam with coupled (PyTorch-style) weight decay and
            learning rate times lr_decay^t in round t (reference 3e-4, 1e-2, 0.98).
        teacher_weight, diversity_weight: alpha_gen and eta_div of the generator loss.
        teacher_loss: "paper" or "reference" (`weighted_teacher_loss`).
        execution: how the clients' heads are applied.
    """
    for name, value, allowed in (("noise", noise, NOISES),
                                 ("teacher_loss", teacher_loss, TEACHER_LOSSES)):
        if value not in allowed:
            raise ValueError(f"{name} {value!r} is unknown; allowed: {', '.join(allowed)}")
    module = ConditionalGenerator(hidden, latent_dim, head.num_classes)
    initial_variables = _initial_variables(hidden, latent_dim, head.num_classes, noise_dim)
    optimizer = optax.chain(optax.add_decayed_weights(weight_decay),
                            optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8))
    sampler = jax.random.normal if noise == "gaussian" else jax.random.uniform

    def init(key):
        variables = initial_variables(key)
        return variables, optimizer.init(variables["params"])

    def sample(variables, key, labels, train):
        eps = sampler(key, (labels.shape[0], noise_dim))
        return eps, module.apply(variables, eps, labels, train=train,
                                 mutable=["batch_stats"] if train else False)

    def generate(variables, key, labels):
        return sample(variables, key, labels, train=False)[1]

    def train(variables, opt_state, heads, weights, qualified, round_index, key):
        label_probabilities = qualified / jnp.maximum(jnp.sum(qualified), 1)
        rate = learning_rate * lr_decay ** jnp.asarray(round_index, jnp.result_type(float))

        def loss_fn(params, batch_stats, step_key):
            label_key, noise_key = jax.random.split(step_key)
            labels = jax.random.choice(label_key, head.num_classes, (batch_size,),
                                       p=label_probabilities)
            eps, (latents, updates) = sample({"params": params, "batch_stats": batch_stats},
                                             noise_key, labels, train=True)
            logits = execution.map(lambda h: head.apply(h, latents), heads)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels[None])
            teacher = weighted_teacher_loss(ce, weights[:, labels], teacher_loss)
            diversity = diversity_loss(eps, latents)
            total = teacher_weight * teacher + diversity_weight * diversity
            return total, (updates["batch_stats"], teacher, diversity)

        def step(carry, index):
            variables, opt_state = carry
            grads, (batch_stats, teacher, diversity) = jax.grad(loss_fn, has_aux=True)(
                variables["params"], variables["batch_stats"], jax.random.fold_in(key, index))
            updates, opt_state = optimizer.update(grads, opt_state, variables["params"])
            params = optax.apply_updates(variables["params"], optax.tree.scale(-rate, updates))
            return ({"params": params, "batch_stats": batch_stats}, opt_state), (teacher,
                                                                                 diversity)

        (variables, opt_state), (teacher, diversity) = jax.lax.scan(
            step, (variables, opt_state), jnp.arange(steps))
        return variables, opt_state, jnp.mean(teacher), jnp.mean(diversity)

    return Generator(init=init, generate=generate, train=train)


def regularizer_weight(initial: float, round_index, decay: float = 0.98,
                       floor: float = 1e-4) -> jax.Array:
    """w_t = max(floor, w_0 decay^t) from round 1 on; 0 in round 0 and whenever w_0 = 0."""
    if is_zero(initial):
        return jnp.zeros((), jnp.result_type(float))
    round_index = jnp.asarray(round_index)
    decayed = initial * jnp.asarray(decay, jnp.result_type(float)) ** round_index
    return jnp.where((round_index > 0) & (initial > 0), jnp.maximum(floor, decayed), 0.0)


def client_terms(generator: Generator, head: Model, *, alpha_0: float, beta_0: float,
                 generated_batch_size: int) -> Callable:
    """The client's generator terms: `add(loss, variables, head_params, logits, y, mask, rng,
    alpha_t, beta_t)` is `loss` plus the terms whose initial weight is positive.

    `logits` are the head's on the real batch `(y, mask)`; `rng` is the local step's key, so each
    step samples its own labels and noise; G (`variables`) is frozen. A traced (swept) initial
    weight keeps its term, weighted by its w_t (0 when the swept w_0 is 0).
    """

    def add(loss, variables, head_params, logits, y, mask, rng, alpha_t, beta_t):
        if not is_zero(alpha_0):
            label_key, noise_key = jax.random.split(jax.random.fold_in(rng, _TEACHER_TERM))
            sampled = jax.random.randint(label_key, (generated_batch_size,), 0, head.num_classes)
            latents = generator.generate(variables, noise_key, sampled)
            loss = loss + alpha_t * jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
                head.apply(head_params, latents), sampled))
        if not is_zero(beta_0):
            latents = generator.generate(variables, jax.random.fold_in(rng, _LATENT_TERM), y)
            loss = loss + beta_t * kd_loss(logits, head.apply(head_params, latents), mask)
        return loss

    return add
