"""FedGen invariants (ALGORITHMS.md §12e): FedAvg without the generator, per-label weights, the
teacher loss in the paper's and the reference's form, the diversity loss, a generator step that
moves only the generator, no key in the state, and head-only sharing."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common import NUM_CLASSES, NUM_FEATURES, assert_trees_equal, make_clients, stack_clients
from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.algorithms.fedgen import (REFERENCE_OPTIONS, ConditionalGenerator, FedGenConfig,
                                          client_label_counts, diversity_loss, fedgen,
                                          label_weights, regularizer_weight,
                                          weighted_teacher_loss)
from fedjax_lab.data import fedprox_synthetic
from fedjax_lab.experiment import run_experiment
from fedjax_lab.models import logistic_regression, mlp
from fedjax_lab.models.split import split_model
from fedjax_lab.options import OptionError, validate

LATENT = 6
SMALL_GENERATOR = dict(noise_dim=4, generator_hidden=8, generator_steps=3, generator_batch_size=8,
                       generated_batch_size=8)
LOCAL = dict(num_epochs=2, batch_size=10)


def _split(feature_shape, num_classes, width=12):
    return split_model(mlp(feature_shape, LATENT, hidden=(width,)),
                       logistic_regression((LATENT,), num_classes))


@functools.lru_cache(maxsize=None)
def _dataset():
    return fedprox_synthetic(1, 1, num_clients=8, max_examples=60, seed=3)


@functools.lru_cache(maxsize=None)
def _run(name: str):
    """Runs of four rounds under one seed: the same cohorts and batches for every algorithm."""
    dataset = _dataset()
    model = _split(dataset.feature_shape, dataset.num_classes)
    algorithm = {
        "fedavg": lambda: fedavg(model, optax.sgd(0.05), **LOCAL),
        "fedgen_off": lambda: fedgen(model, optax.sgd(0.05), use_generator=False, alpha_0=0.0,
                                     **LOCAL, **SMALL_GENERATOR),
        "generator_only": lambda: fedgen(model, optax.sgd(0.05), alpha_0=0.0, **LOCAL,
                                         **SMALL_GENERATOR),
    }[name]()
    return run_experiment(algorithm, dataset, num_rounds=4, cohort_size=4, seed=11, eval_every=2,
                          progress=False)


def test_without_generator_and_regularisers_fedgen_is_fedavg_bit_for_bit():
    fedavg_run, fedgen_run = _run("fedavg"), _run("fedgen_off")
    assert_trees_equal(fedavg_run.state.params, fedgen_run.state.params)
    assert fedavg_run.evaluations == fedgen_run.evaluations
    for fedavg_row, fedgen_row in zip(fedavg_run.history, fedgen_run.history):
        assert {name: fedgen_row[name] for name in fedavg_row} == fedavg_row


def test_the_generator_step_changes_only_the_generator():
    fedavg_run, run = _run("fedavg"), _run("generator_only")
    assert_trees_equal(fedavg_run.state.params, run.state.params)
    assert fedavg_run.evaluations == run.evaluations
    dataset = _dataset()
    initial = fedgen(_split(dataset.feature_shape, dataset.num_classes), optax.sgd(0.05),
                     alpha_0=0.0, **LOCAL, **SMALL_GENERATOR).init(jax.random.key(0)).generator
    for before, after in zip(jax.tree.leaves(initial), jax.tree.leaves(run.state.generator)):
        assert not np.allclose(before, after)
    assert all(row["generator_teacher_loss"] > 0 for row in run.history)


def test_the_state_keeps_no_key_so_server_randomness_comes_from_the_round():
    leaves = jax.tree.leaves(_run("generator_only").state)
    assert not any(jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key) for leaf in leaves)


def test_teacher_loss_weights_each_sample_in_the_paper_and_the_mean_in_the_reference():
    # Two clients, two generated samples. Paper: sum_k mean_b w_k(y_b) CE_kb; the authors'
    # broadcast gives sum_k mean_b w_k(y_b) * mean_b CE_kb.
    ce = jnp.array([[1.0, 5.0], [2.0, 4.0]])
    sample_weights = jnp.array([[0.75, 0.0], [0.25, 1.0]])
    paper = 2.625  # (0.75 * 1 + 0 * 5) / 2 + (0.25 * 2 + 1 * 4) / 2 = 0.375 + 2.25
    reference = 3.0  # (0.75 + 0) / 2 * (1 + 5) / 2 + (0.25 + 1) / 2 * (2 + 4) / 2 = 1.125 + 1.875
    np.testing.assert_allclose(weighted_teacher_loss(ce, sample_weights), paper, rtol=1e-6)
    np.testing.assert_allclose(weighted_teacher_loss(ce, sample_weights, "reference"),
                               reference, rtol=1e-6)
    # Both agree when a client's weight does not depend on the sample's label.
    flat = jnp.array([[0.5, 0.5], [0.5, 0.5]])
    np.testing.assert_allclose(weighted_teacher_loss(ce, flat),
                               weighted_teacher_loss(ce, flat, "reference"), rtol=1e-6)


def test_per_label_client_weights_sum_to_one_over_participating_clients():
    counts = jnp.array([[3, 0, 1, 0], [1, 0, 0, 0], [0, 0, 5, 0], [7, 7, 7, 0]])
    participating = jnp.array([True, True, True, False])
    weights = label_weights(counts, participating)
    np.testing.assert_allclose(weights.sum(axis=0), [1, 0, 1, 0], rtol=1e-6)
    np.testing.assert_allclose(weights[:, 0], [0.75, 0.25, 0, 0], rtol=1e-6)
    np.testing.assert_array_equal(weights[3], 0)
    reference = label_weights(1 + 2 * counts, participating)
    np.testing.assert_allclose(reference.sum(axis=0), 1, rtol=1e-6)


def test_label_counts_are_the_dataset_counts_or_one_plus_the_labels_drawn():
    xs, ys = make_clients([7, 0, 12])
    batch = stack_clients(xs, ys, 15)
    dataset = client_label_counts(batch, NUM_CLASSES)
    expected = np.stack([np.bincount(y, minlength=NUM_CLASSES) for y in ys])
    np.testing.assert_array_equal(dataset, expected)
    drawn = client_label_counts(batch, NUM_CLASSES, mode="drawn_batches", num_epochs=3)
    np.testing.assert_array_equal(drawn, 1 + 3 * expected)


def test_diversity_loss_is_in_the_unit_interval_and_one_when_the_noise_is_ignored():
    rng = np.random.default_rng(0)
    noise, latents = (jnp.asarray(rng.normal(size=(16, d))) for d in (4, 6))
    value = float(diversity_loss(noise, latents))
    assert 0.0 < value < 1.0
    assert float(diversity_loss(noise, jnp.tile(latents[:1], (16, 1)))) == 1.0

    generator = ConditionalGenerator(hidden=8, latent_dim=LATENT, num_classes=NUM_CLASSES)
    labels = jnp.full((16,), 2)
    variables = generator.init(jax.random.key(0), noise, labels, train=False)
    first_layer = variables["params"]["Dense_0"]
    deaf = {**variables, "params": {**variables["params"], "Dense_0": {
        **first_layer, "kernel": first_layer["kernel"].at[:4].set(0.0)}}}  # the noise's rows
    for train in (False, True):
        out = generator.apply(deaf, noise, labels, train=train, mutable=["batch_stats"])[0]
        assert float(diversity_loss(noise, out)) == 1.0
        live = generator.apply(variables, noise, labels, train=train, mutable=["batch_stats"])[0]
        assert float(diversity_loss(noise, live)) < 1.0


def test_generator_output_depends_on_the_label():
    generator = ConditionalGenerator(hidden=8, latent_dim=LATENT, num_classes=NUM_CLASSES)
    noise = jax.random.normal(jax.random.key(1), (4, 5))
    variables = generator.init(jax.random.key(0), noise, jnp.zeros(4, jnp.int32), train=False)
    outputs = [generator.apply(variables, noise, jnp.full(4, label), train=False)
               for label in range(NUM_CLASSES)]
    assert not np.allclose(outputs[0], outputs[1]) and not np.allclose(outputs[1], outputs[2])


def test_regulariser_weights_decay_from_round_one_to_the_floor():
    assert float(regularizer_weight(10.0, 0)) == 0.0
    np.testing.assert_allclose(regularizer_weight(10.0, 1), 9.8, rtol=1e-6)
    np.testing.assert_allclose(regularizer_weight(10.0, 5), 10 * 0.98 ** 5, rtol=1e-6)
    np.testing.assert_allclose(regularizer_weight(10.0, 2000), 1e-4, rtol=1e-6)
    assert float(regularizer_weight(0.0, 7)) == 0.0


def _head_sharing(num_clients=6):
    model = _split((NUM_FEATURES,), NUM_CLASSES)
    wide = _split((NUM_FEATURES,), NUM_CLASSES, width=20)
    return fedgen(model, optax.sgd(0.1), sharing="head", num_clients=num_clients,
                  client_architectures=(model, wide), architecture_of_client=[0, 1, 0, 1, 0, 1],
                  alpha_0=1.0, **REFERENCE_OPTIONS, **LOCAL, **SMALL_GENERATOR), (model, wide)


def _row(tree, client):
    return jax.tree.map(lambda leaf: leaf[client], tree)


def test_head_sharing_keeps_extractors_local_of_each_clients_architecture():
    algorithm, (model, wide) = _head_sharing()
    round_fn = jax.jit(algorithm.round)
    xs, ys = make_clients([9, 12, 6, 11, 8, 10])
    state = algorithm.init(jax.random.key(0))
    assert set(state.params) == {"head"}
    ids = [3, 0]
    after = state
    for t in range(2):  # round 1 also runs the generator terms
        after = round_fn(after, stack_clients([xs[i] for i in ids], [ys[i] for i in ids], 12,
                                              round_index=t, client_ids=ids))
    before_rows, after_rows = (s.client_states.extractors for s in (state, after))
    for client in (1, 2, 4, 5):
        assert_trees_equal(_row(before_rows, client), _row(after_rows, client))
    for client, own in ((0, 0), (3, 1)):
        assert_trees_equal(_row(before_rows[1 - own], client), _row(after_rows[1 - own], client))
        changed = jax.tree.map(lambda a, b: not np.allclose(a, b),
                               _row(before_rows[own], client), _row(after_rows[own], client))
        assert all(jax.tree.leaves(changed))
    assert not np.allclose(state.params["head"]["Dense_0"]["kernel"],
                           after.params["head"]["Dense_0"]["kernel"])

    batch = stack_clients([xs[3], xs[4]], [ys[3], ys[4]], 12, client_ids=[3, 4])
    logits = jax.jit(algorithm.predict)(after, batch)
    for row, (client, architecture) in enumerate(((3, wide), (4, model))):
        features = architecture.extractor.apply(
            _row(after_rows[1 if architecture is wide else 0], client), batch.x[row])
        np.testing.assert_allclose(logits[row], model.head.apply(after.params["head"], features),
                                   rtol=1e-5, atol=1e-6)
    head_bytes = sum(leaf.size * 4 for leaf in jax.tree.leaves(state.params))
    assert float(after.metrics["bytes_up"]) == 2 * (head_bytes + NUM_CLASSES * 4)
    generator_bytes = sum(leaf.size * 4 for leaf in jax.tree.leaves(state.generator))
    assert float(after.metrics["bytes_down"]) == 2 * (head_bytes + generator_bytes)


def test_fedgen_validates_its_options():
    model = _split((NUM_FEATURES,), NUM_CLASSES)
    with pytest.raises(ValueError, match="noise 'laplace' is unknown; allowed: gaussian, uniform"):
        fedgen(model, optax.sgd(0.1), noise="laplace")
    with pytest.raises(ValueError, match="teacher_loss 'mean' is unknown; allowed: paper, "
                                         "reference"):
        fedgen(model, optax.sgd(0.1), teacher_loss="mean")
    with pytest.raises(ValueError, match="alpha_0=-1.0 is invalid; expected alpha_0 >= 0"):
        fedgen(model, optax.sgd(0.1), alpha_0=-1.0)
    with pytest.raises(ValueError, match="use_generator=False needs alpha_0 = beta_0 = 0"):
        fedgen(model, optax.sgd(0.1), use_generator=False)
    with pytest.raises(ValueError, match="sharing='head' needs num_clients"):
        fedgen(model, optax.sgd(0.1), sharing="head")
    with pytest.raises(ValueError, match="architecture_of_client=.* expected 3 integers in"):
        fedgen(model, optax.sgd(0.1), sharing="head", num_clients=3,
               client_architectures=(model, model), architecture_of_client=[0, 2, 1])
    other = split_model(mlp((NUM_FEATURES,), LATENT + 1), logistic_regression((LATENT + 1,), 3))
    with pytest.raises(ValueError, match=r"client_architectures\[1\] maps"):
        fedgen(model, optax.sgd(0.1), sharing="head", num_clients=2,
               client_architectures=(model, other), architecture_of_client=[0, 1])


def test_config_defaults_are_the_papers_and_refuse_client_terms_without_the_generator():
    config = FedGenConfig()
    assert (config.generator.noise, config.label_counts, config.generator.teacher_loss,
            config.beta_0) == ("gaussian", "dataset", "paper", 0.0)
    with pytest.raises(OptionError, match="use_generator=False is invalid"):
        validate(FedGenConfig(use_generator=False))
    validate(FedGenConfig(use_generator=False, alpha_0=0.0))
