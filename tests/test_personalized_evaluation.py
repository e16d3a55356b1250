"""Personalised evaluation: per-client distribution, global view, fine-tuning, client subsets."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common import make_clients, small_model
from fedjax_lab.algorithms.ditto import ditto
from fedjax_lab.algorithms.fedamp import fedamp
from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.core import client_keys, experiment_key, local_train, model_loss
from fedjax_lab.data import ClientData
from fedjax_lab.evaluation import (_FINE_TUNING_STREAM, FineTuning, client_scores,
                                   make_evaluator, summarize)

NUM = 7
KEY = experiment_key(3)


def population(seed=0, sizes=(12, 5, 9, 1, 14, 7, 10)):
    xs, ys = make_clients(sizes, seed=seed)
    return ClientData(tuple(xs), tuple(ys), tuple(f"c{i}" for i in range(len(sizes)))).pad()


TRAIN, TEST = population(0), population(1, sizes=(6, 3, 4, 2, 5, 8, 3))
MODEL = small_model()


def moved(state, seed=2):
    """A state whose models (global and per-client) differ from the initial ones."""
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [
        leaf + 0.5 * jax.random.normal(k, leaf.shape, leaf.dtype)
        if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.ndim else leaf
        for leaf, k in zip(leaves, keys)])


def assert_metrics_close(actual: dict, expected: dict, rtol=1e-6):
    """Two `summarize` dicts agree key for key (deciles included)."""
    assert set(actual) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(actual[key], value, rtol=rtol, err_msg=key)


def without(metrics: dict, *views) -> dict:
    return {k: v for k, v in metrics.items() if k not in views}


def manual_scores(logits_per_client, clients, rows):
    """`summarize` of per-client logits computed one client at a time."""
    columns = [client_scores(logits[None], clients.y[r][None], clients.mask[r][None])
               for logits, r in zip(logits_per_client, rows)]
    return summarize(*(np.concatenate([np.asarray(c[k]) for c in columns]) for k in range(3)))


def test_summary_reports_deciles_and_the_worst_ten_percent():
    correct = np.array([1, 3, 0, 9, 4, 2, 5, 7, 1, 6, 8, 0])
    counts = np.array([2, 4, 0, 10, 8, 4, 5, 10, 4, 6, 10, 5])
    metrics = summarize(correct, np.ones(12), counts)
    accuracy = correct[counts > 0] / counts[counts > 0]
    np.testing.assert_allclose(metrics["client_accuracy_deciles"],
                               np.percentile(accuracy, [10, 20, 30, 40, 50, 60, 70, 80, 90]))
    assert metrics["client_accuracy_deciles"][0] == metrics["client_accuracy_p10"]
    # 11 clients with data: the worst ceil(1.1) = 2 are 0.0 and 0.25.
    assert metrics["client_accuracy_worst10"] == pytest.approx(0.125)
    assert metrics["num_clients"] == 11


def test_global_algorithm_reports_its_model_and_fine_tuning_from_it():
    algorithm = fedavg(MODEL, optax.sgd(0.1))
    state = moved(algorithm.init(jax.random.key(0)))
    plain = make_evaluator(algorithm, TEST, KEY)(state)
    assert "global" not in plain and "fine_tuned" not in plain
    tuning = FineTuning(MODEL, optax.sgd(0.5), num_epochs=3, batch_size=4)
    tuned = make_evaluator(algorithm, TEST, KEY, train_clients=TRAIN, fine_tuning=tuning,
                           chunk_size=3)(state)
    assert without(tuned, "fine_tuned") == plain
    # Fine-tuning is local SGD from the global model on the client's own training rows.
    rngs = jax.vmap(lambda k: jax.random.fold_in(k, _FINE_TUNING_STREAM))(
        client_keys(KEY, state.round, jnp.arange(NUM)))
    tune = jax.jit(lambda x, y, mask, rng: local_train(
        model_loss(MODEL.apply), optax.sgd(0.5), state.params, x, y, mask, rng, num_epochs=3,
        batch_size=4).params)
    logits = [MODEL.apply(tune(TRAIN.x[i], TRAIN.y[i], TRAIN.mask[i], rngs[i]), TEST.x[i])
              for i in range(NUM)]
    expected = manual_scores(logits, TEST, range(NUM))
    assert_metrics_close(tuned["fine_tuned"], expected)
    assert tuned["fine_tuned"]["loss"] < plain["loss"]
    # A zero learning rate leaves the global model as it is.
    frozen = make_evaluator(algorithm, TEST, KEY, train_clients=TRAIN,
                            fine_tuning=tuning._replace(optimizer=optax.sgd(0.0)))(state)
    assert_metrics_close(frozen["fine_tuned"], plain)


def test_personalised_algorithm_reports_personal_and_global_models_on_a_client_subset():
    algorithm = ditto(MODEL, optax.sgd(0.1), num_clients=NUM)
    state = moved(algorithm.init(jax.random.key(0)))
    rows = np.array([5, 1, 3])
    subset = type(TEST)(*(field[rows] for field in TEST))
    result = make_evaluator(algorithm, subset, KEY, client_ids=rows, chunk_size=2)(state)
    personal = [MODEL.apply(jax.tree.map(lambda leaf: leaf[i],
                                         state.client_states.personal_params), TEST.x[i])
                for i in rows]
    assert_metrics_close(without(result, "global"), manual_scores(personal, TEST, rows))
    shared = [MODEL.apply(state.params, TEST.x[i]) for i in rows]
    assert_metrics_close(result["global"], manual_scores(shared, TEST, rows))
    assert result["num_clients"] == 3


def test_chunking_does_not_change_the_result_and_fedamp_has_no_global_view():
    algorithm = fedamp(MODEL, optax.sgd(0.1), num_clients=NUM, sigma=2.0)
    state = moved(algorithm.init(jax.random.key(0)))
    whole = make_evaluator(algorithm, TEST, KEY)(state)
    assert_metrics_close(make_evaluator(algorithm, TEST, KEY, chunk_size=3)(state), whole,
                         rtol=1e-12)
    assert "global" not in whole
    with pytest.raises(ValueError, match="fine_tuning needs a global model, but FedAMPState "
                                         "has no params"):
        make_evaluator(algorithm, TEST, KEY, train_clients=TRAIN,
                       fine_tuning=FineTuning(MODEL, optax.sgd(0.1)))(state)


def test_bad_evaluator_arguments_are_named():
    algorithm = fedavg(MODEL, optax.sgd(0.1))
    tuning = FineTuning(MODEL, optax.sgd(0.1))
    with pytest.raises(ValueError, match="fine_tuning needs train_clients"):
        make_evaluator(algorithm, TEST, KEY, fine_tuning=tuning)
    short = type(TRAIN)(*(field[:3] for field in TRAIN))
    with pytest.raises(ValueError, match="train_clients has 3 clients and clients 7"):
        make_evaluator(algorithm, TEST, KEY, train_clients=short, fine_tuning=tuning)
    with pytest.raises(ValueError, match=r"client_ids has shape \(2,\); expected \(7,\)"):
        make_evaluator(algorithm, TEST, KEY, client_ids=[0, 1])
