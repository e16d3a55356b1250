"""The generated `dialects` text population and the data registry's default models."""

from collections import Counter

import numpy as np
import pytest

from fedjax_lab.data import REGISTRY, load_dataset
from fedjax_lab.data.dialects import (DIALECT_VOCABULARY, bayes_accuracies, dialect_chains,
                                      dialects, stationary_pairs)
from fedjax_lab.data.registry import DialectsConfig, H5Config, LeafConfig
from fedjax_lab.options import OptionError

V = len(DIALECT_VOCABULARY)


@pytest.fixture(scope="module")
def default():
    return load_dataset("dialects", seed=0)


def test_defaults_shapes_sizes_and_vocabulary(default):
    assert V == 30 and default.num_classes == 30 and default.name == "dialects"
    assert default.num_clients == 50 and default.feature_shape == (80,)
    assert default.train.label_shape == (80,)
    assert default.metadata["vocabulary"] == DIALECT_VOCABULARY
    sizes = default.train.num_examples + default.test.num_examples
    assert sizes.min() >= 2 and 30 <= sizes.mean() <= 50 and sizes.max() > 2 * sizes.min()
    assert 20 <= default.train.num_examples.mean() <= 40
    assert (default.test.num_examples >= 1).all()
    for x, y in zip(default.train.x + default.test.x, default.train.y + default.test.y):
        assert x.dtype == np.float32 and y.dtype == np.int32 and x.shape == y.shape
        assert y.min() >= 0 and y.max() < V
        # Next-character targets: y[:, t] is x[:, t + 1] within a sequence.
        np.testing.assert_array_equal(x[:, 1:], y[:, :-1])


def test_sequences_tile_one_stream_per_client():
    ds = dialects(3, sequence_length=5, mean_sequences=6, test_fraction=0.0, seed=1)
    for x, y in zip(ds.train.x, ds.train.y):
        # Sequence k + 1 starts with sequence k's last target (the split shuffles their order),
        # so the first inputs and the last targets agree up to the stream's two ends.
        firsts, lasts = Counter(x[:, 0].astype(int).tolist()), Counter(y[:, -1].tolist())
        assert sum((firsts - lasts).values()) <= 1 and sum((lasts - firsts).values()) <= 1


def test_deterministic_in_the_seed():
    a, b = dialects(6, seed=3), dialects(6, seed=3)
    c = dialects(6, seed=4)
    for one, two in zip(a.train.x + a.train.y + a.test.y, b.train.x + b.train.y + b.test.y):
        np.testing.assert_array_equal(one, two)
    assert a.metadata == b.metadata
    assert not np.array_equal(a.train.x[0][:1], c.train.x[0][:1]) or \
        a.train.num_examples.tolist() != c.train.num_examples.tolist()


def test_heterogeneity_zero_gives_every_client_the_same_chain():
    chains, _ = dialect_chains(8, 0.0, 3, 0.5, np.random.default_rng(0))
    np.testing.assert_array_equal(chains, np.broadcast_to(chains[:1], chains.shape))
    ds = dialects(8, heterogeneity=0.0, seed=0)
    accuracy = ds.metadata["bayes_accuracy"]
    assert accuracy["own_chain"] == pytest.approx(accuracy["average_chain"], abs=1e-12)
    varied, families = dialect_chains(8, 1.0, 3, 0.5, np.random.default_rng(0))
    assert not np.allclose(varied[0], varied[1]) and set(families) <= {0, 1, 2}
    # Clients of one family share part of their dialect: with family_share 1 they are equal.
    same, families = dialect_chains(8, 1.0, 2, 1.0, np.random.default_rng(0))
    first = np.flatnonzero(families == families[0])
    assert len(first) > 1
    np.testing.assert_allclose(same[first], np.broadcast_to(same[first[:1]], same[first].shape))


def test_personalisation_gap_at_the_defaults(default):
    accuracy = default.metadata["bayes_accuracy"]
    own, average = accuracy["own_chain"], accuracy["average_chain"]
    assert own == pytest.approx(0.428, abs=0.001) and average == pytest.approx(0.348, abs=0.001)
    assert own - average > 0.05
    assert (np.array(accuracy["own_chain_per_client"])
            >= np.array(accuracy["average_chain_per_client"]) - 1e-12).all()


def test_exact_bayes_accuracy_matches_the_test_tokens(default):
    # The exact expectation and the empirical argmax accuracy of the same chains agree.
    chains, _ = dialect_chains(50, 1.0, 4, 0.5, np.random.default_rng(0))
    own_choice = chains.argmax(-1)
    hits = total = 0
    for c, (x, y) in enumerate(zip(default.test.x, default.test.y)):
        x = x.astype(int)
        hits += (own_choice[c][x[:, :-1], x[:, 1:]] == y[:, 1:]).sum()
        total += y[:, 1:].size
    assert hits / total == pytest.approx(default.metadata["bayes_accuracy"]["own_chain"],
                                         abs=0.02)


def test_bayes_accuracies_hand_chain():
    # Two order-2 chains over 2 symbols that ignore the older character: client 0 repeats
    # with probability 0.9, client 1 alternates with probability 0.7. Both stationary
    # distributions are uniform.
    repeat = np.array([[0.9, 0.1], [0.1, 0.9]])
    chains = np.stack([np.broadcast_to(repeat, (2, 2, 2)),
                       np.broadcast_to(np.array([[0.3, 0.7], [0.7, 0.3]]), (2, 2, 2))])
    stationary = stationary_pairs(chains)
    np.testing.assert_allclose(stationary.sum((1, 2)), 1.0)
    np.testing.assert_allclose(stationary.sum(1), 0.5)
    own, average = bayes_accuracies(chains, stationary, np.array([3.0, 1.0]))
    np.testing.assert_allclose(own, [0.9, 0.7])
    # Pair frequencies: client 0 pi(a, a) = 0.45, pi(a, b != a) = 0.05; client 1 0.15 and 0.35.
    # Weighted 3:1, the pooled chain repeats after a repeated pair (3 * 0.45 * 0.9 > 0.15 * 0.7)
    # and alternates after an alternation (0.35 * 0.7 > 3 * 0.05 * 0.9): client 0 scores
    # 0.9 * 0.9 + 0.1 * 0.1 = 0.82, client 1 0.3 * 0.3 + 0.7 * 0.7 = 0.58.
    np.testing.assert_allclose(average, [0.82, 0.58])


def test_registry_config_validation_and_default_models(tmp_path):
    spec = REGISTRY["dialects"]
    assert spec.default_model(DialectsConfig()) == {"name": "char_lstm", "hidden": 64,
                                                    "layers": 1}
    small = load_dataset("dialects", DialectsConfig(num_clients=4, mean_sequences=3,
                                                    sequence_length=10), seed=2)
    assert small.num_clients == 4 and small.feature_shape == (10,)
    for name, value, expected in (("heterogeneity", -1.0, "expected a number >= 0"),
                                  ("family_share", 1.5, "expected a fraction in [0, 1]"),
                                  ("mean_sequences", 1.0, "expected a number >= 2"),
                                  ("test_fraction", 1.0, "expected a fraction in [0, 1)")):
        with pytest.raises(OptionError, match=rf"^data.{name}={value!r} is invalid; {expected}"
                                              .replace("[", r"\[").replace("(", r"\(")
                                              .replace(")", r"\)")):
            load_dataset("dialects", DialectsConfig(**{name: value}))
    leaf = REGISTRY["leaf"].default_model
    assert leaf(LeafConfig(dataset="shakespeare")) == "char_lstm"
    assert leaf(LeafConfig()) is None
    h5 = REGISTRY["tff_h5"].default_model
    assert h5(H5Config(dataset="shakespeare")) == "char_lstm"
    assert h5(H5Config(dataset="stackoverflow")) == "word_lstm"
    assert h5(H5Config()) is None
    assert REGISTRY["digits"].default_model(REGISTRY["digits"].config()) is None
