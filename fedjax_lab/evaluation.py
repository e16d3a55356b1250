"""Evaluation of an algorithm on every client: pooled and per-client metrics, personalised views.

Pooled accuracy counts every example once (sum of correct / sum of examples); the per-client
distribution (mean, std, min, 10th percentile, deciles, and the mean of the worst 10% of
clients) is what personalised FL papers report and what a pooled number hides. Clients without
examples are left out of the distribution.

One evaluation reports up to four views of the same clients' test data:
- the top-level keys score `algorithm.predict`: each client's own model for a personalised
  algorithm (Ditto, FedAMP), the global model for a global one (FedAvg);
- "global" scores `algorithm.predict_global`, the shared model of a personalised algorithm that
  trains one (Ditto's w, which equals FedAvg's);
- "fine_tuned" (with `fine_tuning` and the clients' training data) first fine-tunes the state's
  global `params` on each client's own training examples, then predicts: "after local
  fine-tuning", the FedAvg+FT baseline a personalised algorithm should beat;
- "adapted" (with the clients' training data, for an algorithm with `adapted_predict`:
  meta-learning) lets each client adapt on its training examples and scores its test examples,
  so adaptation never sees the examples it is scored on.

`make_adapted_evaluator` scores the adapted view alone on clients given at each call, e.g. unseen
clients' support and query sets (FedMeta's evaluation), compiling once for every seed.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab.compiled import (TracedAlgorithm, as_run_axis, as_traced, only_run,
                                 per_structure)
from fedjax_lab.core.client_execution import ClientExecution
from fedjax_lab.core.local_training import local_train
from fedjax_lab.core.losses import cross_entropies, model_loss
from fedjax_lab.core.types import Algorithm, ClientBatch, client_keys

PyTree = Any
# Sub-stream of the evaluation client keys for fine-tuning shuffles.
_FINE_TUNING_STREAM = 7


class FineTuning(NamedTuple):
    """Local fine-tuning of the global model before it predicts (plain local SGD from w).

    Attributes:
        model: the `(init, apply)` model the state's `params` belong to.
        optimizer: optax optimiser of fine-tuning, e.g. the client optimiser of training.
        num_epochs: epochs over the client's training examples.
        batch_size: examples per step; None is the full batch.
        execution: how clients run.
    """

    model: Any
    optimizer: optax.GradientTransformation
    num_epochs: int = 1
    batch_size: int | None = 10
    execution: ClientExecution = ClientExecution()


def client_scores(logits: jax.Array, labels: jax.Array, mask: jax.Array):
    """Per-client (correct count, summed cross-entropy, count), each `[C]`: counts of examples,
    or of counted tokens for sequence targets (`labels [C, N, T]`; ignored targets and padded
    examples count nowhere)."""
    losses, weight = cross_entropies(logits, labels, mask)
    weight = weight.astype(logits.dtype)
    summed = lambda values: jnp.sum((values * weight).reshape(values.shape[0], -1), axis=1)
    return (summed(jnp.argmax(logits, -1) == labels), summed(losses), summed(weight))


def summarize(correct: np.ndarray, loss_sums: np.ndarray, counts: np.ndarray, *,
              per_client: bool = False) -> dict:
    """Pooled accuracy, loss and perplexity, and the distribution of per-client accuracy.

    For sequence targets every count is of tokens: `accuracy` is token accuracy, `loss` the mean
    cross-entropy per token and `perplexity` its exponential, all over the counted tokens
    (`num_examples` then counts tokens). `client_accuracy_deciles` lists the 10th, 20th, ...,
    90th percentiles; `client_accuracy_worst10` is the mean accuracy of the worst ceil(10%) of
    clients (q-FFL's and Ditto's fairness metric); `client_perplexity_mean` and
    `client_perplexity_worst10` are the same for each client's own perplexity. With
    `per_client`, `client_accuracies` and `client_perplexities` also list every client's value in
    row order (None for a client without examples), which is what `fedjax-lab plot` draws.
    """
    correct, loss_sums, counts = (np.asarray(a, np.float64) for a in (correct, loss_sums, counts))
    total = counts.sum()
    if total == 0:
        raise ValueError("evaluation data holds no examples")
    has_data = counts > 0
    accuracy = correct[has_data] / counts[has_data]
    num_worst = int(np.ceil(0.1 * accuracy.size))
    worst = np.sort(accuracy)[:num_worst]
    with np.errstate(over="ignore"):
        perplexity = np.exp(loss_sums[has_data] / counts[has_data])
        pooled_perplexity = np.exp(loss_sums.sum() / total)
    result = {
        "accuracy": float(correct.sum() / total),
        "loss": float(loss_sums.sum() / total),
        "perplexity": float(pooled_perplexity),
        "client_accuracy_mean": float(accuracy.mean()),
        "client_accuracy_std": float(accuracy.std()),
        "client_accuracy_min": float(accuracy.min()),
        "client_accuracy_p10": float(np.percentile(accuracy, 10)),
        "client_accuracy_deciles": [float(q) for q in np.percentile(accuracy, range(10, 100, 10))],
        "client_accuracy_worst10": float(worst.mean()),
        "client_perplexity_mean": float(perplexity.mean()),
        "client_perplexity_worst10": float(np.sort(perplexity)[-num_worst:].mean()),
        "num_clients": int(has_data.sum()),
        "num_examples": int(total),
    }
    if per_client:
        result["client_accuracies"] = [float(c / n) if n > 0 else None
                                       for c, n in zip(correct, counts)]
        with np.errstate(over="ignore"):
            result["client_perplexities"] = [float(np.exp(l / n)) if n > 0 else None
                                             for l, n in zip(loss_sums, counts)]
    return result


def fine_tuned_predict(fine_tuning: FineTuning, params: PyTree, train: ClientBatch,
                       test: ClientBatch) -> jax.Array:
    """Logits `[C, N, classes]` on `test` after each client fine-tunes `params` on `train`.

    Row i of `train` and of `test` must be the same client; fine-tuning draws its shuffles from
    `train.rng`.
    """
    loss = model_loss(fine_tuning.model.apply)

    def client_fn(client):
        x, y, mask, rng, x_test = client
        tuned = local_train(loss, fine_tuning.optimizer, params, x, y, mask, rng,
                            num_epochs=fine_tuning.num_epochs,
                            batch_size=fine_tuning.batch_size).params
        return fine_tuning.model.apply(tuned, x_test)

    return fine_tuning.execution.map(client_fn, (train.x, train.y, train.mask, train.rng, test.x))


def adapted_scores(algorithm: Algorithm, state: PyTree, train: ClientBatch,
                   test: ClientBatch):
    """`client_scores` of `test` after each client adapts on the same row of `train`; an
    algorithm without `adapted_predict` is scored as `predict` on `test` (no adaptation)."""
    if algorithm.adapted_predict is None:
        logits = algorithm.predict(state, test)
    else:
        logits = algorithm.adapted_predict(state, train, test)
    return client_scores(logits, test.y, test.mask)


def has_adapted_view(traced: TracedAlgorithm) -> bool:
    """Whether the algorithm adapts before predicting (has `adapted_predict`)."""
    return traced.build(traced.hyperparameters).adapted_predict is not None


@per_structure
def chunk_scorer(build, fine_tuning: FineTuning | None, adapted: bool):
    """`score_chunk(state, rows, chunk_ids, key, hyperparameters) -> {view: client_scores}`, not
    jitted (an evaluator jits it, a sweep jits its `vmap`); `rows` holds the test clients' arrays
    and, for the fine-tuned and adapted views, their training arrays."""

    def score_chunk(state, rows, chunk_ids, key, hyperparameters):
        algorithm = build(hyperparameters)
        rng = client_keys(key, state.round, chunk_ids)
        test = _as_batch(rows[0], chunk_ids, rng)
        scores = {"personal": client_scores(algorithm.predict(state, test), test.y, test.mask)}
        if algorithm.predict_global is not None:
            scores["global"] = client_scores(algorithm.predict_global(state, test), test.y,
                                             test.mask)
        if fine_tuning is not None:
            tuning_rng = jax.vmap(lambda k: jax.random.fold_in(k, _FINE_TUNING_STREAM))(rng)
            train = _as_batch(rows[1], chunk_ids, tuning_rng)
            logits = fine_tuned_predict(fine_tuning, state.params, train, test)
            scores["fine_tuned"] = client_scores(logits, test.y, test.mask)
        if adapted:
            scores["adapted"] = adapted_scores(algorithm, state,
                                               _as_batch(rows[1], chunk_ids, rng), test)
        return scores

    return score_chunk


@per_structure
def _jitted_chunk_scorer(build, fine_tuning: FineTuning | None, adapted: bool):
    return jax.jit(chunk_scorer(build, fine_tuning, adapted))


def summarize_views(scores: dict, *, per_client: bool = False) -> dict:
    """An evaluation from `chunk_scorer`'s joined scores: `predict`'s view at the top level,
    the other views under their names."""
    scores = dict(scores)
    result = summarize(*scores.pop("personal"), per_client=per_client)
    result.update({view: summarize(*view_scores, per_client=per_client)
                   for view, view_scores in scores.items()})
    return result


def make_evaluator(algorithm: Algorithm | TracedAlgorithm, clients, key: jax.Array, *, chunk_size: int = 256,
                   client_ids=None, train_clients=None, fine_tuning: FineTuning | None = None):
    """Returns `evaluate(state, per_client=False) -> dict` scoring `algorithm` on all of `clients`.

    `per_client=True` adds each view's `client_accuracies` (one entry per row of `clients`).

    Args:
        algorithm: the algorithm; `predict` gives the top-level keys, `predict_global` (if set)
            the "global" entry, `adapted_predict` (if set, with `train_clients`) the "adapted"
            entry.
        clients: a `PaddedClients` stacked over the clients to evaluate.
        key: the experiment key (personalised predictors may draw from client keys).
        chunk_size: clients per compiled call, which bounds evaluation memory.
        client_ids: the population index of each row of `clients` (default 0, 1, ...); pass it to
            evaluate a subset, e.g. the benign clients only.
        train_clients: the same clients' training data, row for row; `fine_tuning` and the
            "adapted" view train on it.
        fine_tuning: adds the "fine_tuned" entry: the state's `params` fine-tuned on each
            client's training data, then scored on its test data.
    """
    num_clients = clients.y.shape[0]
    ids = np.arange(num_clients) if client_ids is None else np.asarray(client_ids)
    if ids.shape != (num_clients,):
        raise ValueError(f"client_ids has shape {ids.shape}; expected ({num_clients},), one id "
                         "per row of clients")
    if fine_tuning is not None and train_clients is None:
        raise ValueError("fine_tuning needs train_clients (each client's training data)")
    if train_clients is not None and train_clients.y.shape[0] != num_clients:
        raise ValueError(f"train_clients has {train_clients.y.shape[0]} clients and clients "
                         f"{num_clients}; expected the same clients, row for row")
    traced = as_traced(algorithm)
    adapted = train_clients is not None and has_adapted_view(traced)
    sources = (clients,) if fine_tuning is None and not adapted else (clients, train_clients)
    score_chunk = _jitted_chunk_scorer(traced.build, fine_tuning, adapted)

    def evaluate(state: PyTree, *, per_client: bool = False) -> dict:
        if fine_tuning is not None and not hasattr(state, "params"):
            raise ValueError(f"fine_tuning needs a global model, but {type(state).__name__} "
                             "has no params")
        joined = _scores_in_chunks(
            lambda rows, chunk_ids: score_chunk(state, rows, chunk_ids, key,
                                                traced.hyperparameters),
            sources, ids, chunk_size)
        return summarize_views(joined, per_client=per_client)

    return evaluate


@per_structure
def _sweep_chunk_scorer(build, adapted: bool):
    return jax.jit(jax.vmap(chunk_scorer(build, None, adapted), in_axes=(0, None, None, 0, 0)))


def make_sweep_evaluator(traced: TracedAlgorithm, clients, *, train_clients=None,
                         chunk_size: int = 256):
    """`make_evaluator` for a sweep's runs stacked along a leading run axis: returns
    `evaluate(states, keys, hyperparameters, per_client=False) -> [evaluation per run]`, where
    `keys` are the runs' experiment keys and `hyperparameters` the traced values, both `[P]`.
    Each run's evaluation is the one `make_evaluator` gives it alone."""
    adapted = train_clients is not None and has_adapted_view(traced)
    sources = (clients, train_clients) if adapted else (clients,)
    score_chunk = _sweep_chunk_scorer(traced.build, adapted)
    score_alone = _jitted_chunk_scorer(traced.build, None, adapted)
    ids = np.arange(clients.y.shape[0])

    def evaluate(states, keys, hyperparameters, *, per_client: bool = False) -> list[dict]:
        runs = len(np.asarray(jax.random.key_data(keys)))
        if runs == 1:  # by the single run's own program, so that the two agree bit for bit
            state, key, values = only_run((states, keys, hyperparameters))
            score = lambda rows, chunk_ids: as_run_axis(
                score_alone(state, rows, chunk_ids, key, values))
        else:
            score = lambda rows, chunk_ids: score_chunk(states, rows, chunk_ids, keys,
                                                        hyperparameters)
        joined = _scores_in_chunks(score, sources, ids, chunk_size, client_axis=1)
        return [summarize_views(jax.tree.map(lambda s: s[run], joined), per_client=per_client)
                for run in range(runs)]

    return evaluate


@per_structure
def _adapted_scorer(algorithm: Algorithm):
    @jax.jit
    def score_chunk(state, rows, chunk_ids, key):
        rng = client_keys(key, state.round, chunk_ids)
        query, support = (_as_batch(part, chunk_ids, rng) for part in rows)
        return adapted_scores(algorithm, state, support, query)

    return score_chunk


def make_adapted_evaluator(algorithm: Algorithm, *, chunk_size: int = 256):
    """Returns `evaluate(state, support_clients, query_clients, key) -> dict`.

    `evaluate` adapts each client on its support row and scores its query row (`adapted_scores`:
    an algorithm without `adapted_predict` is scored as `predict` on the query rows, the FedAvg
    baseline). The clients and the key are arguments, so it compiles once per array shape and
    serves every seed and round.

    `evaluate`'s arguments: `support_clients` and `query_clients` are `PaddedClients` over the
    same clients in the same order (unseen clients' support and query sets, or each client's
    train and test split); `key` is the experiment key (client keys as in `make_evaluator`).
    It returns `summarize` of the query rows: pooled accuracy and the per-client distribution.
    """

    score_chunk = _adapted_scorer(algorithm)

    def evaluate(state, support_clients, query_clients, key: jax.Array) -> dict:
        num_clients = query_clients.y.shape[0]
        if support_clients.y.shape[0] != num_clients:
            raise ValueError(f"support_clients has {support_clients.y.shape[0]} clients and "
                             f"query_clients {num_clients}; expected the same clients")
        scores = _scores_in_chunks(
            lambda rows, chunk_ids: score_chunk(state, rows, chunk_ids, key),
            (query_clients, support_clients), np.arange(num_clients), chunk_size)
        return summarize(*scores)

    return evaluate


def _as_batch(rows, client_ids, rng) -> ClientBatch:
    return ClientBatch(x=rows[0], y=rows[1], mask=rows[2], num_examples=rows[3],
                       client_ids=client_ids, rng=rng)


def _scores_in_chunks(score_chunk, sources, ids: np.ndarray, chunk_size: int,
                      client_axis: int = 0):
    """`score_chunk(rows, chunk_ids)` over every row of `sources` (`PaddedClients` sharing their
    rows) in chunks of `chunk_size` clients, joined along `client_axis` (1 under a sweep's run
    axis) as numpy arrays."""
    num_clients = len(ids)
    chunk_size = min(chunk_size, num_clients)
    parts = []
    for start in range(0, num_clients, chunk_size):
        # The last chunk repeats its final row to keep one compiled shape; dropped below.
        rows_index = np.minimum(np.arange(start, start + chunk_size), num_clients - 1)
        rows = tuple(tuple(jnp.asarray(field[rows_index]) for field in source)
                     for source in sources)
        scores = score_chunk(rows, jnp.asarray(ids[rows_index], jnp.int32))
        keep = np.arange(min(chunk_size, num_clients - start))
        parts.append(jax.tree.map(lambda s: np.take(np.asarray(s), keep, client_axis), scores))
    return jax.tree.map(lambda *chunks: np.concatenate(chunks, client_axis), *parts)
