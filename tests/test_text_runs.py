"""Text from the registries: algorithms run on next-token data unchanged, the text data sets
choose a text model, and the class-label algorithms refuse text by name."""

import numpy as np
import pytest

from fedjax_lab import algorithms
from fedjax_lab import config as run_config
from fedjax_lab.options import OptionError
from tests.common import run_config as make_config

# The algorithms the issue names run in the default suite; the rest of the registry is `slow`.
NAMED = ("fedavg", "fedprox", "ditto", "fedadam", "fedyogi")
SEQUENCE_ALGORITHMS = [name for name, spec in algorithms.REGISTRY.items()
                       if spec.class_labels_only is None and spec.model_kind == "any"]


def _text_config(algorithm: str, **dotted):
    options = {"algorithm.name": algorithm, "data.name": "dialects", "data.num_clients": 6,
               "data.sequence_length": 8, "data.mean_sequences": 6.0, "model.name": "bigram",
               "run.rounds": 2, "run.cohort_size": 3, "run.eval_every": 2}
    options.update(dotted)
    return make_config(**options)


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=() if name in NAMED else pytest.mark.slow)
    for name in SEQUENCE_ALGORITHMS])
def test_every_sequence_capable_algorithm_trains_on_text(name):
    config = _text_config(name)
    result = run_config.run(config, progress=False)
    final = result.summary["final"]["test"]
    dataset = run_config.load_data(config)
    counted = sum(int((y != -1).sum()) for y in dataset.test.y)
    assert result.summary["counted"] == "tokens" and final["num_examples"] == counted
    assert np.isfinite(result.summary["final_train_loss"])
    assert 0 <= final["accuracy"] <= 1 and final["perplexity"] > 1
    np.testing.assert_allclose(final["perplexity"], np.exp(final["loss"]), rtol=1e-12)


def test_the_registry_splits_into_sequence_and_class_label_algorithms():
    refused = {name for name, spec in algorithms.REGISTRY.items()
               if spec.class_labels_only is not None}
    assert refused == {"fedproto", "fedgkt", "fedgen", "moon"}
    assert set(NAMED) <= set(SEQUENCE_ALGORITHMS)


def test_text_data_sets_default_to_a_text_model():
    dialects = make_config(**{"data.name": "dialects"}).model
    assert dialects.name == "char_lstm" and (dialects.options.hidden, dialects.options.layers) \
        == (64, 1)
    # The run's own model options win over the data set's proposal.
    assert make_config(**{"data.name": "dialects", "model.hidden": 32}).model.options.hidden == 32
    assert make_config(**{"data.name": "leaf", "data.dataset": "shakespeare",
                          "data.data_dir": "leaf"}).model.options.hidden == 256
    assert make_config(**{"data.name": "tff_h5", "data.dataset": "stackoverflow",
                          "data.data_dir": "tff"}).model.name == "word_lstm"
    assert make_config(**{"data.name": "digits"}).model.name == "mlp"
    assert make_config(**{"data.name": "dialects", "model.name": "transformer"}).model.name \
        == "transformer"
    # An algorithm that needs a split model keeps its own default.
    assert make_config(**{"data.name": "dialects", "algorithm.name": "fedproto"}).model.name \
        == "split_mlp"


def test_a_class_label_algorithm_on_text_is_refused_before_anything_runs(tmp_path):
    config = _text_config("fedproto", **{"model.name": "split_mlp",
                                         "run.output": str(tmp_path / "run")})
    with pytest.raises(OptionError, match=r"data\.name.*'dialects'.*next-token targets \(8,\)"
                                          r".*'fedproto' needs one class label per example"):
        run_config.run(config, progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("config, message", [
    (lambda: _text_config("fedavg", **{"model.name": "mlp"}),
     r"model\.name='mlp'.*predicts one class per example, and data set 'dialects' has "
     r"next-token targets \(8,\)"),
    (lambda: make_config(**{"model.name": "bigram", "data.num_clients": 6, "run.cohort_size": 3}),
     r"model\.name='bigram'.*predicts next-token targets, and data set 'digits' has one "
     "class per example"),
])
def test_a_model_for_other_targets_is_refused_by_name(config, message):
    with pytest.raises(OptionError, match=message):
        run_config.run(config(), progress=False)
