"""Next-token targets `[C, N, T]`: ignored targets and padded sequences count nowhere, and the
engine treats a sequence of T targets as T labelled predictions (float64, exact)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms import REGISTRY, fedavg
from fedjax_lab.core import ClientBatch, client_keys, experiment_key
from fedjax_lab.core.losses import IGNORE_LABEL, cross_entropy, model_loss
from fedjax_lab.core.types import DataInfo
from fedjax_lab.data.federated import ClientData, FederatedDataset
from fedjax_lab.data.stream import pack_clients
from fedjax_lab.evaluation import client_scores, summarize
from fedjax_lab.models.model import from_flax
from fedjax_lab.options import OptionError
from tests.common import assert_trees_equal

VOCABULARY = 7


class _Bigram(nn.Module):
    """Next-token logits `[B, T, V]` from the current token; `classify` keeps position 0 only,
    a classifier `[B, V]` with the same parameters."""

    classify: bool = False

    @nn.compact
    def __call__(self, x):
        logits = nn.Dense(VOCABULARY)(nn.Embed(VOCABULARY, 4)(x.astype(jnp.int32)))
        return logits[:, 0] if self.classify else logits


def _tokens(rng, n, length):
    ids = rng.integers(0, VOCABULARY, (n, length + 1))
    return ids[:, :-1].astype(np.float32), ids[:, 1:].astype(np.int32)


def test_token_loss_is_the_mean_over_counted_tokens():
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        logits = jnp.asarray(rng.normal(size=(3, 4, VOCABULARY)))
        labels = rng.integers(0, VOCABULARY, (3, 4))
        labels[0, 1] = labels[2, 3] = IGNORE_LABEL
        mask = np.array([True, False, True])
        counted = mask[:, None] & (labels != IGNORE_LABEL)
        log_p = jax.nn.log_softmax(logits)
        expected = -np.mean([log_p[b, t, labels[b, t]] for b, t in zip(*np.nonzero(counted))])
        np.testing.assert_allclose(cross_entropy(logits, jnp.asarray(labels), mask), expected,
                                   rtol=1e-14)


def test_ignored_targets_and_padded_sequences_never_reach_the_gradient():
    rng = np.random.default_rng(1)
    model = from_flax(_Bigram(), (5,), VOCABULARY)
    loss = model_loss(model.apply)
    with jax.enable_x64(True):
        params = jax.tree.map(lambda p: p.astype(jnp.float64), model.init(jax.random.key(0)))
        x, y = _tokens(rng, 3, 5)
        y[0, 2] = y[1, 4] = IGNORE_LABEL
        mask = np.array([True, True, False])
        reference = jax.grad(loss)(params, x, y, mask, None)
        # What sits behind an ignored target or in a padded sequence's targets is irrelevant.
        changed = y.copy()
        changed[2] = rng.integers(0, VOCABULARY, 5)
        assert_trees_equal(jax.grad(loss)(params, x, changed, mask, None), reference)
        counted = jax.grad(loss)(params, x, np.where(y == IGNORE_LABEL, 3, y), mask, None)
        assert not np.allclose(counted["Dense_0"]["bias"], reference["Dense_0"]["bias"])


def test_client_scores_count_tokens_and_perplexity_is_the_exponentiated_token_loss():
    logits = jnp.zeros((2, 3, 4, VOCABULARY)).at[..., 2].set(5.0)
    labels = np.full((2, 3, 4), 2, np.int32)
    labels[0, 0, :2] = IGNORE_LABEL
    labels[1, 1, :] = 3
    mask = np.array([[True, True, False], [True, True, True]])
    correct, loss_sums, counts = (np.asarray(s, np.float64)
                                  for s in client_scores(logits, labels, mask))
    np.testing.assert_array_equal(counts, [6, 12])
    np.testing.assert_array_equal(correct, [6, 8])
    result = summarize(correct, loss_sums, counts, per_client=True)
    assert result["num_examples"] == 18 and result["accuracy"] == 14 / 18
    np.testing.assert_allclose(result["perplexity"], np.exp(loss_sums.sum() / 18), rtol=1e-12)
    np.testing.assert_allclose(result["client_perplexities"], np.exp(loss_sums / counts),
                               rtol=1e-12)
    assert result["client_perplexity_worst10"] == max(result["client_perplexities"])


def test_sequence_clients_pad_and_gather_with_their_targets():
    rng = np.random.default_rng(2)
    pairs = [_tokens(rng, n, 3) for n in (2, 0, 3)]
    data = ClientData(tuple(p[0] for p in pairs), tuple(p[1] for p in pairs), ("a", "b", "c"))
    assert data.label_shape == (3,)
    padded = data.pad(multiple_of=2)
    assert padded.y.shape == (3, 4, 3) and padded.mask.sum() == 5
    x, y, mask, sizes = pack_clients(data).gather(np.array([2, 0]), 4)
    np.testing.assert_array_equal(y[0, :3], pairs[2][1])
    np.testing.assert_array_equal(y[1, :2], pairs[0][1])
    assert not y[1, 2:].any() and sizes.tolist() == [3, 2]


def test_ignore_label_is_a_sequence_target_only():
    rng = np.random.default_rng(3)
    x, y = _tokens(rng, 2, 3)
    y[0, 0] = IGNORE_LABEL
    data = ClientData((x,), (y,), ("a",))
    FederatedDataset("text", data, data, VOCABULARY)
    labels = ClientData((x,), (np.array([IGNORE_LABEL, 1], np.int32),), ("a",))
    with pytest.raises(ValueError, match=r"has label -1; expected labels in \[0, 7\)$"):
        FederatedDataset("classes", labels, labels, VOCABULARY)
    y[1, 2] = VOCABULARY
    with pytest.raises(ValueError, match=r"has label 7; expected labels in \[0, 7\) or -1"):
        FederatedDataset("text", ClientData((x,), (y,), ("a",)), data, VOCABULARY)


def test_length_one_sequences_train_as_classification_bit_for_bit():
    """FedAvg on next-token data with T = 1 is FedAvg on the same labels as classes: local
    batches, losses, aggregation and evaluation all see the same numbers."""
    rng = np.random.default_rng(4)
    sizes = [5, 3, 4]
    sequence_model = from_flax(_Bigram(), (1,), VOCABULARY)
    class_model = from_flax(_Bigram(classify=True), (1,), VOCABULARY)
    with jax.enable_x64(True):
        params = jax.tree.map(lambda p: p.astype(jnp.float64),
                              sequence_model.init(jax.random.key(0)))
        x = np.zeros((3, 5, 1), np.float64)
        y = np.zeros((3, 5), np.int32)
        mask = np.arange(5)[None] < np.array(sizes)[:, None]
        for i, n in enumerate(sizes):
            x[i, :n], y[i, :n, None] = _tokens(rng, n, 1)
        ids = jnp.arange(3, dtype=jnp.int32)
        batch = ClientBatch(jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask),
                            jnp.asarray(sizes, jnp.int32), ids,
                            client_keys(experiment_key(0), 0, ids))
        sequence_batch = batch._replace(y=batch.y[..., None])
        states = []
        for model, round_batch in ((class_model, batch), (sequence_model, sequence_batch)):
            algorithm = fedavg(model, optax.sgd(0.5), num_epochs=2, batch_size=2)
            state = algorithm.init(jax.random.key(0))._replace(params=params)
            state = jax.jit(algorithm.round)(state, round_batch)
            states.append(jax.jit(algorithm.round)(state, round_batch))
            scores = client_scores(algorithm.predict(states[-1], round_batch), round_batch.y,
                                   round_batch.mask)
            states[-1] = (states[-1].params, states[-1].metrics["train_loss"], scores)
        assert_trees_equal(*states)


def test_class_label_algorithms_refuse_next_token_data():
    info = DataInfo(num_clients=4, num_classes=VOCABULARY, feature_shape=(5,), max_examples=3,
                    label_shape=(5,))
    with pytest.raises(OptionError, match=r"data\.name.*next-token targets \(5,\).*'fedproto' "
                                          "needs one class label per example"):
        REGISTRY["fedproto"].check_labels("dialects", info)
    REGISTRY["fedavg"].check_labels("dialects", info)
    REGISTRY["fedproto"].check_labels("digits", info._replace(label_shape=()))
