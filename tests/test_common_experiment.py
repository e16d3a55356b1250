"""The pieces every experiment shares (experiments/common.py) and the claims' verdict rule."""

import json

import chex
import numpy as np
import optax
import pytest

from experiments.claims import Check, Claim, Measured, print_claims
from experiments.common import (Method, choose, chosen, mean_std, registry_method, summarize,
                                summarize_by_method, sweep, write_results)
from fedjax_lab import compiled
from fedjax_lab.algorithms import fedavg
from fedjax_lab.data import digits
from fedjax_lab.experiment import run_experiment
from fedjax_lab.models import mlp
from fedjax_lab.options import OptionError


def test_sweep_runs_every_method_under_every_seed_and_summarizes_per_seed_numbers():
    methods = [Method("double", lambda seed: 2 * seed), Method("square", lambda seed: seed ** 2)]
    runs = sweep(methods, [1, 3], lambda method, seed: {"value": method.build(seed)})
    assert runs == {"double": {"1": {"value": 2}, "3": {"value": 6}},
                    "square": {"1": {"value": 1}, "3": {"value": 9}}}
    assert summarize(runs["square"].values(), ["value"]) == {
        "value": {"mean": 5.0, "std": 4.0, "min": 1.0, "max": 9.0}}
    by_seed = {"1": {"a": {"x": 1.0}}, "3": {"a": {"x": 2.0}}}
    assert summarize_by_method(by_seed, ["x"])["a"]["x"]["mean"] == 1.5


def test_mean_std_is_numpys_population_statistics():
    values = [0.5, 0.75, 0.9]
    stats = mean_std(values)
    assert stats["mean"] == pytest.approx(np.mean(values))
    assert stats["std"] == pytest.approx(np.std(values))  # ddof 0, as every recorded result
    assert json.loads(json.dumps(stats)) == stats


def test_choose_keeps_declared_order_and_refuses_unknown_names():
    assert choose("m", ["b", "a"], ("a", "b", "c")) == ("a", "b")
    assert choose("m", None, ("a", "b")) == ("a", "b")
    with pytest.raises(ValueError, match=r"m=\('z',\) is invalid; expected a non-empty subset"):
        choose("m", ["z"], ("a", "b"))
    with pytest.raises(ValueError, match=r"m=\(\) is invalid"):
        choose("m", [], ("a", "b"))
    methods = [Method("a", None), Method("b", None)]
    assert [m.name for m in chosen(methods, ["b"])] == ["b"]


def test_write_results_records_the_wall_time(tmp_path):
    results = write_results(str(tmp_path), {"settings": {}}, started=0.0)
    assert results["settings"]["wall_seconds"] > 0
    with open(tmp_path / "results.json") as f:
        assert json.load(f) == results


def test_a_registry_method_is_the_factory_call_it_declares():
    dataset = digits(6, partition="iid", seed=0)
    model = mlp(dataset.feature_shape, dataset.num_classes, hidden=(8,))
    method = registry_method("fedsgd", "fedavg",
                             client={"lr": 0.1, "epochs": 1, "batch_size": None})
    final = lambda algorithm: run_experiment(algorithm, dataset, num_rounds=2, cohort_size=3,
                                             seed=0, progress=False).state
    chex.assert_trees_all_equal(final(method.build(model, dataset.info())),
                                final(fedavg(model, optax.sgd(0.1), batch_size=None)))
    assert method.name == "fedsgd"
    with pytest.raises(OptionError, match="algorithm.client.epochs"):
        registry_method("bad", "fedavg", client={"epochs": 0})


def test_a_registry_methods_seeds_and_rate_grid_compile_once():
    """An experiment makes its model and method afresh per seed and rate; the second run of a
    structure must reuse the first's programs (nothing traced, lowered or compiled again)."""
    dataset = digits(6, partition="iid", seed=0)

    def run(learning_rate, seed):
        model = mlp(dataset.feature_shape, dataset.num_classes, hidden=(8,))
        method = registry_method(f"lr {learning_rate}", "fedavg", client={"lr": learning_rate})
        return run_experiment(method.build(model, dataset.info()), dataset, num_rounds=2,
                              cohort_size=3, seed=seed, eval_every=1, progress=False)

    first = run(0.1, seed=0)
    before = compiled.compile_seconds()
    second = run(0.3, seed=1)
    assert compiled.compile_seconds() == before
    assert second.evaluations[-1]["test"]["loss"] != first.evaluations[-1]["test"]["loss"]


def test_print_claims_shows_numbers_checks_and_verdict_and_names_what_a_partial_run_lacks(capsys):
    def measure(results):
        return Measured("setting", [f"accuracy {results['accuracy']}"],
                        [Check("better", True), Check("much better", False)])

    claims = [Claim("A", "claim", (), measure), Claim("B", "claim", (), lambda r: r["missing"])]
    print_claims(claims, {"accuracy": 0.9, "settings": {"wall_seconds": 1.0}})
    out = capsys.readouterr().out
    assert "A: reproduced partly (1/2)" in out and "accuracy 0.9" in out
    assert "✓ better" in out and "✗ much better" in out
    assert "B: not measured (this run has no 'missing')" in out
