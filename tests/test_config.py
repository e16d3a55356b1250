"""The nested run configuration: defaults, files, overrides, and what it refuses (no compiling)."""

import json

import pytest

from fedjax_lab import options
from fedjax_lab.algorithms import REGISTRY
from fedjax_lab.config import (Config, config_from_dict, config_from_sources, default_config,
                               load_config)
from fedjax_lab.options import OptionError


def test_the_default_config_is_the_default_job():
    config = default_config()
    assert (config.algorithm.name, config.data.name, config.model.name) == ("fedavg", "digits",
                                                                             "mlp")
    assert config.run.rounds == 200 and config.run.cohort_size == 10
    client = config.algorithm.options.client
    assert (client.lr, client.epochs, client.batch_size) == (0.05, 5, 10)


def test_a_split_algorithm_gets_a_split_model_by_default():
    for name, spec in REGISTRY.items():
        model = config_from_dict({"algorithm": {"name": name}}).model.name
        assert model == ("split_mlp" if spec.model_kind == "split" else "mlp"), name


def test_dict_round_trip_and_overrides_win_over_the_file(tmp_path):
    config = config_from_dict({"algorithm": {"name": "fedprox", "mu": 0.25},
                               "run": {"rounds": 7}})
    assert config_from_dict(json.loads(json.dumps(config.to_dict()))) == config
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config.to_dict()))
    assert load_config(str(path)) == config
    overridden = config_from_sources(str(path), {"algorithm": {"mu": 0.5}, "run": {"seed": 3}})
    assert overridden.algorithm.options.mu == 0.5 and overridden.run.seed == 3
    assert overridden.run.rounds == 7


def test_toml_files_are_read(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[algorithm]\nname = "fedavg"\nclient = { lr = 0.1, batch_size = 5 }\n'
                    '[model]\nname = "mlp"\nhidden = [32, 16]\n')
    config = load_config(str(path))
    assert config.algorithm.options.client.lr == 0.1
    assert config.algorithm.options.client.batch_size == 5
    assert config.model.options.hidden == (32, 16)


@pytest.mark.parametrize("mapping, path, expected", [
    ({"algorithm": {"name": "nope"}}, "algorithm.name", "unknown algorithm"),
    ({"algorithm": {"name": "fedavg", "mu": 1.0}}, "algorithm.mu", "unknown option"),
    ({"algorithm": {"name": "fedprox", "mu": "big"}}, "algorithm.mu", "expected float"),
    ({"algorithm": {"name": "fedprox", "mu": -1}}, "algorithm.mu", "expected a number >= 0"),
    ({"algorithm": {"client": {"epochs": 1.5}}}, "algorithm.client.epochs", "expected int"),
    ({"run": {"rounds": True}}, "run.rounds", "expected int"),
    ({"runs": {}}, "runs", "unknown section"),
    ({"algorithm": {"name": "fedproto"}, "model": {"name": "mlp"}}, "model.name",
     "needs a split model"),
])
def test_bad_values_are_refused_naming_the_option(mapping, path, expected):
    with pytest.raises(OptionError) as error:
        config_from_dict(mapping)
    assert error.value.path == path and expected in error.value.expected


def test_every_option_of_every_registered_config_is_documented():
    for spec in REGISTRY.values():
        for path, _, _, doc, _ in options.describe(spec.config):
            assert doc, f"{spec.name}: option {path} has no documentation"
    assert isinstance(default_config(), Config)
