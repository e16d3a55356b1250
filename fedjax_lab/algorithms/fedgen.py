"""FedGen: data-free knowledge distillation through a server-side generator of latent features.

References:
    Zhu, Hong, Zhou. "Data-Free Knowledge Distillation for Heterogeneous Federated Learning."
    ICML 2021, arXiv 2105.10056.

Update (round t): clients train h(f(x)) on CE(h(f(x)), y) + alpha_t * CE(h(G(eps, y')), y') with y'
uniform over the labels and the generator G frozen (alpha_t = max(1e-4, alpha_0 0.98^t),
no term in round 0), and report label counts c_k(y). The server trains G on the round's client
heads, sum_k w_k(y) CE(h_k(G(eps, y)), y) with w_k(y) = c_k(y) / sum_j c_j(y), plus the diversity
loss exp(-mean_ab d(eps_a, eps_b) d(G_a, G_b)) (mean squared and mean absolute differences;
the generator, its losses and its training are in fedgen_generator.py), then averages the
shared part as FedAvg does: the whole model, or (`sharing="head"`, the paper's
communication-light mode) only the head while each client keeps its extractor, whose architecture
may differ between clients.

Reference-code deviations from the paper, each a named option defaulting to the paper
(`REFERENCE_OPTIONS` selects them all): uniform [0, 1) noise commented as Gaussian
(`noise`); label counts starting at 1 and counted over the batches drawn (`label_counts`); the
undocumented "latent loss" beta_t KL(softmax(h(G(eps, y))) || p(x)) on the real batch's labels
(`beta_0`, FedGen#24); a teacher loss whose per-client weight is mean_b w_k(y_b) times the mean
CE rather than w_k(y_b) per sample, a broadcast in the authors' code (`teacher_loss`). The
server's randomness (generated labels and noise) comes from the round's first real client key,
not from a key kept in the state. Not reproduced: the adversarial student term (off in the reference), the
generated-batch weight B_gen / B (1 at the defaults). With alpha_0 = 0 the term is off (the
reference's 1e-4 floor would keep it on), so alpha_0 = beta_0 = 0 without the generator is FedAvg
bit for bit. Pitfalls avoided (ALGORITHMS.md §12f): local batches are reshuffled every epoch
(FedGen#7); experiments report final accuracy, not the best test rounds.
"""

import dataclasses
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.algorithms.fedavg import predict_with
from fedjax_lab.algorithms.fedgen_generator import (LABEL_COUNTS, NOISES, TEACHER_LOSSES,
                                                    ConditionalGenerator, GeneratorTraining,
                                                    client_label_counts, client_terms,
                                                    decay_factor, diversity_loss,
                                                    fedgen_generator, label_weights,
                                                    regularizer_weight, weighted_teacher_loss)
from fedjax_lab.algorithms.fedgen_extractors import FedGenClientState, client_extractors
from fedjax_lab.algorithms.spec import AlgorithmSpec, ClientTraining, ServerOptimizer
from fedjax_lab.core import (Algorithm, ClientBatch, ClientExecution, client_weights, cross_entropy,
                             gather_clients, local_train, model_loss, participants_bytes,
                             scatter_clients, server_update, tree_bytes, weighted_mean)
from fedjax_lab.core.aggregation import WEIGHTINGS
from fedjax_lab.core.metrics import initial_metrics, round_metrics
from fedjax_lab.core.types import DataInfo, server_key
from fedjax_lab.core.validation import check_number, check_positive_int, is_traced, is_zero
from fedjax_lab.models.split import SplitModel
from fedjax_lab.options import OptionError, non_negative, one_of, option, positive_int

__all__ = ["LABEL_COUNTS", "NOISES", "REFERENCE_OPTIONS", "SHARINGS", "TEACHER_LOSSES", "SPECS",
           "ConditionalGenerator", "FedGenClientState", "FedGenConfig", "FedGenState",
           "GeneratorTraining", "build", "client_label_counts", "diversity_loss", "fedgen",
           "label_weights", "regularizer_weight", "weighted_teacher_loss"]

PyTree = Any
SHARINGS = ("all", "head")
REFERENCE_OPTIONS = {"noise": "uniform", "label_counts": "drawn_batches", "beta_0": 10.0,
                     "teacher_loss": "reference"}
# Sub-stream of the init key for the generator's initial parameters.
_GENERATOR_INIT_STREAM = 1


@dataclasses.dataclass(frozen=True)
class FedGenConfig:
    """FedGen's options; defaults are the paper's method (Gaussian noise, dataset label counts,
    per-sample teacher weights, no latent loss: beta_0 = 0) with the reference's MNIST settings
    where the paper is silent: alpha_0 = 10 decayed by 0.98 per round, generated batch 32, the
    generator options of `GeneratorTraining`. The reference's clients take 20 steps of batch 32
    at SGD 0.01; on digits' ~29 examples per client that is one batch per step, so the library
    runs 5 epochs of batch 10 at 0.1 (about 15 steps): with it the default run reaches 0.80 test
    accuracy in 5 rounds (50 clients, 10 per round), against 0.26 at batch 32 and rate 0.05."""

    client: ClientTraining = option(ClientTraining(lr=0.1, epochs=5, batch_size=10),
                                    "local training")
    server: ServerOptimizer = option(ServerOptimizer(), "server optimiser on the mean delta")
    weighting: str = option("num_examples", "aggregation weights p_k", one_of(*WEIGHTINGS))
    sharing: str = option("all", "what is averaged: the whole model, or only the head (each "
                          "client keeps its extractor)", one_of(*SHARINGS))
    use_generator: bool = option(True, "train the generator (off: FedAvg, with alpha_0 = "
                                 "beta_0 = 0)")
    alpha_0: float = option(10.0, "initial weight of the generated-latent CE term",
                            non_negative, sweepable=True)
    beta_0: float = option(0.0, "initial weight of the reference's latent KL term (not in the "
                           "paper)", non_negative, sweepable=True)
    regularizer_decay: float = option(0.98, "per-round factor of alpha_t and beta_t",
                                      decay_factor, sweepable=True)
    regularizer_floor: float = option(1e-4, "floor of alpha_t and beta_t", non_negative,
                                      sweepable=True)
    generated_batch_size: int = option(32, "generated latents per local step", positive_int)
    label_counts: str = option("dataset", "c_k(y): each client's label counts (paper), or 1 + "
                               "the labels of the batches drawn (reference)",
                               one_of(*LABEL_COUNTS))
    generator: GeneratorTraining = option(GeneratorTraining(), "the server's generator")

    def check(self) -> None:
        if not self.use_generator and (self.alpha_0 > 0 or self.beta_0 > 0):
            raise OptionError("use_generator", self.use_generator,
                              "the client terms sample the generator; set alpha_0 = beta_0 = 0 "
                              "to run without it")


def build(config: FedGenConfig, model: SplitModel, data: DataInfo,
          execution: ClientExecution = ClientExecution()) -> Algorithm:
    generator = config.generator
    return fedgen(model, config.client.optimizer(), server_optimizer=config.server.build(),
                  num_epochs=config.client.epochs, batch_size=config.client.batch_size,
                  weighting=config.weighting, sharing=config.sharing,
                  num_clients=data.num_clients if config.sharing == "head" else None,
                  use_generator=config.use_generator, alpha_0=config.alpha_0,
                  beta_0=config.beta_0, regularizer_decay=config.regularizer_decay,
                  regularizer_floor=config.regularizer_floor,
                  generated_batch_size=config.generated_batch_size, noise=generator.noise,
                  label_counts=config.label_counts, teacher_loss=generator.teacher_loss,
                  noise_dim=generator.noise_dim, generator_hidden=generator.hidden,
                  generator_steps=generator.steps, generator_batch_size=generator.batch_size,
                  generator_learning_rate=generator.lr,
                  generator_weight_decay=generator.weight_decay,
                  generator_lr_decay=generator.lr_decay, teacher_weight=generator.teacher_weight,
                  diversity_weight=generator.diversity_weight, execution=execution)


class FedGenState(NamedTuple):
    """Attributes: params (the shared part: whole model or `{"head"}`), opt_state, generator
    (`{"params", "batch_stats"}`), generator_opt_state, round, metrics, client_states
    (`()` when the whole model is shared, a `FedGenClientState` in head sharing)."""

    params: PyTree
    opt_state: PyTree
    generator: PyTree
    generator_opt_state: PyTree
    round: jax.Array
    metrics: dict[str, jax.Array]
    client_states: FedGenClientState | tuple


def fedgen(model: SplitModel, client_optimizer: optax.GradientTransformation, *,
           server_optimizer: optax.GradientTransformation | None = None, num_epochs: int = 1,
           batch_size: int | None = 32, weighting: str = "num_examples", sharing: str = "all",
           num_clients: int | None = None,
           client_architectures: Sequence[SplitModel] | None = None,
           architecture_of_client: Sequence[int] | None = None, use_generator: bool = True,
           alpha_0: float = 10.0, beta_0: float = 0.0, regularizer_decay: float = 0.98,
           regularizer_floor: float = 1e-4, generated_batch_size: int = 32,
           noise: str = "gaussian", label_counts: str = "dataset", teacher_loss: str = "paper",
           noise_dim: int = 32, generator_hidden: int = 256, generator_steps: int = 50,
           generator_batch_size: int = 32, generator_learning_rate: float = 3e-4,
           generator_weight_decay: float = 1e-2, generator_lr_decay: float = 0.98,
           teacher_weight: float = 1.0, diversity_weight: float = 1.0,
           execution: ClientExecution = ClientExecution(), unroll: int = 1) -> Algorithm:
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
        label_counts: "dataset" (each client's label counts, paper) or "drawn_batches" (1 plus
            the labels of the batches drawn, reference; every epoch draws each example once).
        noise, teacher_loss, noise_dim, generator_hidden, generator_steps, generator_batch_size,
            generator_learning_rate, generator_weight_decay, generator_lr_decay, teacher_weight,
            diversity_weight: the generator's options (`fedgen_generator`'s noise, teacher_loss,
            noise_dim, hidden, steps, batch_size, learning_rate, ...): teacher_loss "paper"
            weights each generated sample by w_k(y), "reference" is the authors' mean(w_k) *
            mean(CE) per client; noise "gaussian" (paper) or "uniform" on [0, 1) (reference).
        execution: how clients run. unroll: unroll factor of the local step loop.

    Returns:
        An `Algorithm` whose state is `FedGenState`.
    """
    _validate(locals())
    if not use_generator and any(not is_traced(w) and w > 0 for w in (alpha_0, beta_0)):
        raise ValueError(f"use_generator=False needs alpha_0 = beta_0 = 0 (got alpha_0={alpha_0}, "
                         f"beta_0={beta_0}): the client terms sample the generator")
    if sharing == "all" and (client_architectures, architecture_of_client, num_clients) != (
            None, None, None):
        raise ValueError("client_architectures, architecture_of_client and num_clients are for "
                         "sharing='head'; with sharing='all' every client trains the shared model")
    if sharing == "head":
        if num_clients is None:
            raise ValueError("sharing='head' needs num_clients (each client keeps its extractor)")
        extractors = client_extractors(model, tuple(client_architectures or (model,)),
                                       architecture_of_client, num_clients)
    server_optimizer = optax.sgd(1.0) if server_optimizer is None else server_optimizer
    generator = fedgen_generator(
        model.head, model.latent_dim, noise=noise, noise_dim=noise_dim, hidden=generator_hidden,
        steps=generator_steps, batch_size=generator_batch_size,
        learning_rate=generator_learning_rate, weight_decay=generator_weight_decay,
        lr_decay=generator_lr_decay, teacher_weight=teacher_weight,
        diversity_weight=diversity_weight, teacher_loss=teacher_loss, execution=execution)
    # Traced (swept) initial weights keep the client terms in the program; a grid point whose
    # weights are both 0 then adds 0 times them and, like a concrete 0, downloads no generator.
    uses_generator_on_clients = not (is_zero(alpha_0) and is_zero(beta_0))
    swept_weights = is_traced(alpha_0) or is_traced(beta_0)
    add_generator_terms = client_terms(generator, model.head, alpha_0=alpha_0, beta_0=beta_0,
                                       generated_batch_size=generated_batch_size)

    def head_logits(params, latents):
        return model.head.apply(params["head"], latents)

    def init(key: jax.Array) -> FedGenState:
        params = model.init(key)
        client_states = ()
        if sharing == "head":
            client_states = extractors.init(params["extractor"], key)
            params = {"head": params["head"]}
        variables, generator_opt_state = generator.init(
            jax.random.fold_in(key, _GENERATOR_INIT_STREAM))
        empty = jnp.zeros(0)
        return FedGenState(params, server_optimizer.init(params), variables, generator_opt_state,
                           jnp.zeros((), jnp.int32),
                           initial_metrics(_round_metrics, empty, empty, jnp.zeros(0, jnp.int32),
                                           optax.tree.zeros_like(params), 0.0, 0.0, 0.0, 0.0),
                           client_states)

    def client_loss(variables, regularizer_weights, extract):
        if not uses_generator_on_clients:
            return model_loss(model.apply if sharing == "all" else
                              lambda params, x: head_logits(params, extract(params, x)))

        def loss(params, x, y, mask, rng):
            logits = head_logits(params, extract(params, x))
            return add_generator_terms(cross_entropy(logits, y, mask), variables, params["head"],
                                       logits, y, mask, rng, *regularizer_weights)

        return loss

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
            own_architecture = extractors.architecture_of(batch.client_ids)
            starts = cohort.extractors

        def client_update(client):
            start, architecture, x, y, mask, rng = client
            if sharing == "all":
                start, own_extract = state.params, model.extract
            else:
                start = {"extractor": start, "head": state.params["head"]}
                own_extract = lambda params, x: extractors.extract(architecture,
                                                                   params["extractor"], x)
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
        # The reference's "qualified" labels (max count > 1 with counts starting at 1): the
        # labels some participating client holds; only they are generated.
        held = client_label_counts(batch, model.num_classes) > 0
        qualified = jnp.any(held & participating[:, None], axis=0)
        generator_variables, generator_opt_state = state.generator, state.generator_opt_state
        teacher = diversity = jnp.zeros((), jnp.result_type(float))
        if use_generator:
            generator_variables, generator_opt_state, teacher, diversity = generator.train(
                state.generator, state.generator_opt_state, trained["head"],
                label_weights(counts, participating), qualified, state.round,
                server_key(batch))

        shared = state.params
        deltas = optax.tree.sub(shared,
                                trained if sharing == "all" else {"head": trained["head"]})
        mean_delta = weighted_mean(deltas, weights)
        params, opt_state = server_update(shared, state.opt_state, mean_delta, server_optimizer)
        client_states = state.client_states
        if sharing == "head":
            kept = extractors.keep_own(own_architecture, trained["extractor"], cohort.extractors)
            client_states = scatter_clients(client_states, batch.client_ids,
                                            FedGenClientState(kept), participating)
        down = tree_bytes(shared) + (tree_bytes(state.generator) if uses_generator_on_clients
                                     else 0)
        if swept_weights:
            down = jnp.where((alpha_0 > 0) | (beta_0 > 0), float(down),
                             float(tree_bytes(shared)))
        up = tree_bytes(shared) + (model.num_classes * counts.dtype.itemsize if use_generator
                                   else 0)
        return FedGenState(params, opt_state, generator_variables, generator_opt_state,
                           state.round + 1, _round_metrics(weights, losses, steps, mean_delta,
                                                           teacher, diversity, down, up),
                           client_states)

    def predict(state: FedGenState, batch: ClientBatch) -> jax.Array:
        if sharing == "all":
            return predict_with(model, state.params, batch.x)

        def client_logits(client):
            architecture, own, x = client
            return head_logits(state.params, extractors.extract(architecture, own, x))

        return execution.map(client_logits, (
            extractors.architecture_of(batch.client_ids),
            gather_clients(state.client_states.extractors, batch.client_ids), batch.x))

    return Algorithm(init=init, round=round_fn, predict=predict)



def _validate(options: dict) -> None:
    choices = {"sharing": SHARINGS, "label_counts": LABEL_COUNTS, "weighting": WEIGHTINGS}
    for name, allowed in choices.items():
        if options[name] not in allowed:
            raise ValueError(f"{name} {options[name]!r} is unknown; allowed: {', '.join(allowed)}")
    for name in ("num_epochs", "generated_batch_size", "noise_dim", "generator_hidden",
                 "generator_steps", "generator_batch_size", "batch_size", "num_clients"):
        if options[name] is not None or name not in ("batch_size", "num_clients"):
            check_positive_int(name, options[name])
    for name in ("alpha_0", "beta_0", "regularizer_floor", "generator_learning_rate",
                 "generator_weight_decay", "teacher_weight", "diversity_weight"):
        check_number(name, options[name], f"{name} >= 0", lambda value: value >= 0)
    for name in ("regularizer_decay", "generator_lr_decay"):
        check_number(name, options[name], f"0 < {name} <= 1", lambda value: 0 < value <= 1)


def _round_metrics(weights, losses, steps, mean_delta, teacher, diversity, down,
                   up) -> dict[str, jax.Array]:
    """The round's scalars; `init` calls it on empty cohorts so the structure never changes.
    Every cohort client downloads, as in FedAvg; participants upload."""
    dtype = jnp.result_type(float)
    return round_metrics(
        weights, losses, bytes_up=participants_bytes(weights, up),
        bytes_down=weights.shape[0] * down,
        local_steps=jnp.sum(jnp.where(weights > 0, steps, 0)).astype(jnp.int32),
        update_norm=optax.tree.norm(mean_delta).astype(dtype),
        generator_teacher_loss=jnp.asarray(teacher, dtype),
        generator_diversity_loss=jnp.asarray(diversity, dtype))


SPECS = (AlgorithmSpec(
    "fedgen", FedGenConfig, build,
    paper="Zhu, Hong, Zhou, Data-Free Knowledge Distillation for Heterogeneous Federated "
          "Learning, ICML 2021, arXiv 2105.10056",
    summary="FedAvg (or head-only sharing) whose clients also fit latents from a server-trained "
            "conditional generator, a data-free distillation of the cohort's label knowledge",
    model_kind="split",
    class_labels_only="its generator is conditioned on a class label and counts labels per "
                      "client"),)
