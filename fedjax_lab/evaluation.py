"""Evaluation of an algorithm's `predict` on every client: pooled and per-client metrics.

Pooled accuracy counts every example once (sum of correct / sum of examples); the per-client
distribution (mean, std, min, 10th percentile of client accuracies) is what personalised FL papers
report and what a pooled number hides. Clients without examples are left out of the distribution.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab.core.types import Algorithm, ClientBatch, client_keys

PyTree = Any


def client_scores(logits: jax.Array, labels: jax.Array, mask: jax.Array):
    """Per-client (correct count, summed cross-entropy, example count), each `[C]`."""
    weight = mask.astype(logits.dtype)
    correct = jnp.sum((jnp.argmax(logits, -1) == labels) * weight, axis=1)
    losses = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels) * weight,
                     axis=1)
    return correct, losses, jnp.sum(weight, axis=1)


def summarize(correct: np.ndarray, loss_sums: np.ndarray, counts: np.ndarray) -> dict[str, float]:
    """Pooled accuracy and loss, and the distribution of per-client accuracy."""
    correct, loss_sums, counts = (np.asarray(a, np.float64) for a in (correct, loss_sums, counts))
    total = counts.sum()
    if total == 0:
        raise ValueError("evaluation data holds no examples")
    has_data = counts > 0
    accuracy = correct[has_data] / counts[has_data]
    return {
        "accuracy": float(correct.sum() / total),
        "loss": float(loss_sums.sum() / total),
        "client_accuracy_mean": float(accuracy.mean()),
        "client_accuracy_std": float(accuracy.std()),
        "client_accuracy_min": float(accuracy.min()),
        "client_accuracy_p10": float(np.percentile(accuracy, 10)),
        "num_clients": int(has_data.sum()),
        "num_examples": int(total),
    }


def make_evaluator(algorithm: Algorithm, clients, key: jax.Array, *, chunk_size: int = 256):
    """Returns `evaluate(state) -> dict` scoring `algorithm.predict` on all of `clients`.

    Args:
        algorithm: the algorithm whose `predict` is scored.
        clients: a `PaddedClients` stacked over the clients to evaluate (population order).
        key: the experiment key (personalised predictors may draw from client keys).
        chunk_size: clients per compiled call, which bounds evaluation memory.
    """
    num_clients = clients.y.shape[0]
    chunk_size = min(chunk_size, num_clients)

    @jax.jit
    def score_chunk(state, x, y, mask, num_examples, ids):
        batch = ClientBatch(x=x, y=y, mask=mask, num_examples=num_examples, client_ids=ids,
                            rng=client_keys(key, state.round, ids))
        return client_scores(algorithm.predict(state, batch), y, mask)

    def evaluate(state: PyTree) -> dict[str, float]:
        parts = []
        for start in range(0, num_clients, chunk_size):
            ids = np.arange(start, start + chunk_size)
            ids = np.minimum(ids, num_clients - 1)  # the last chunk repeats a client, dropped below
            take = lambda a: jnp.asarray(a[ids])
            scores = score_chunk(state, take(clients.x), take(clients.y), take(clients.mask),
                                 take(clients.num_examples), jnp.asarray(ids, jnp.int32))
            keep = min(chunk_size, num_clients - start)
            parts.append([np.asarray(s)[:keep] for s in scores])
        return summarize(*(np.concatenate(column) for column in zip(*parts)))

    return evaluate
