"""DP accounting and options (fedjax_lab/privacy/accounting.py, settings.py): ε equals
dp_accounting called directly, events follow the sampling, calibration, budgets, bad input."""

import dataclasses
import subprocess
import sys
import warnings

import dp_accounting
import jax
import numpy as np
import optax
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from common import make_clients, small_digits_config, small_model, stack_clients
from fedjax_lab import config as run_config
from fedjax_lab.algorithms import REGISTRY, fedavg
from fedjax_lab.core import robust
from fedjax_lab.core.types import DataInfo
from fedjax_lab.options import OptionError, describe
from fedjax_lab.privacy import DPOptions, accounting, dp_aggregator, plan_run

FIXED = accounting.SampledGaussian(1.0, num_clients=1000, cohort_size=50)
POISSON = accounting.SampledGaussian(1.5, num_clients=1000, cohort_size=80, sampling="poisson",
                                     expected_cohort=50.0)


def direct_epsilon(accountant, event, rounds, delta):
    accountant.compose(event, rounds)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("rounds,delta", [(1, 1e-5), (40, 1e-5), (40, 1e-3)])
def test_epsilon_equals_dp_accounting_called_directly(rounds, delta):
    fixed = direct_epsilon(
        rdp_privacy_accountant.RdpAccountant(
            neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE),
        dp_accounting.SampledWithoutReplacementDpEvent(1000, 50,
                                                       dp_accounting.GaussianDpEvent(0.5)),
        rounds, delta)
    assert FIXED.epsilon(rounds, delta) == fixed
    poisson = direct_epsilon(
        pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3),
        dp_accounting.TruncatedSubsampledGaussianDpEvent(1000, 0.05, 80, 1.5), rounds, delta)
    assert POISSON.epsilon(rounds, delta) == poisson


def test_the_event_follows_the_sampling():
    assert FIXED.event() == dp_accounting.SampledWithoutReplacementDpEvent(
        1000, 50, dp_accounting.GaussianDpEvent(0.5))  # replace-one: sensitivity 2S
    assert FIXED.neighboring_relation == dp_accounting.NeighboringRelation.REPLACE_ONE
    assert POISSON.event() == dp_accounting.TruncatedSubsampledGaussianDpEvent(1000, 0.05, 80,
                                                                               1.5)
    assert POISSON.neighboring_relation == dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    whole = dataclasses.replace(POISSON, cohort_size=1000)  # nothing is ever truncated
    assert whole.event() == dp_accounting.PoissonSampledDpEvent(
        0.05, dp_accounting.GaussianDpEvent(1.5))
    assert POISSON.sampling_rate == FIXED.sampling_rate == 0.05
    assert 0 < POISSON.truncation_probability < 1e-4 and FIXED.truncation_probability == 0


@pytest.mark.parametrize("mechanism", [FIXED, POISSON], ids=["fixed", "poisson"])
def test_epsilon_grows_with_the_rounds(mechanism):
    epsilons = [mechanism.epsilon(rounds, 1e-5) for rounds in (0, 1, 10, 100)]
    assert epsilons[0] == 0 and all(a < b for a, b in zip(epsilons, epsilons[1:]))


def test_calibration_meets_the_target_with_the_least_noise():
    z = accounting.calibrate_noise_multiplier(POISSON, 3.0, 20, 1e-5, tolerance=1e-2)
    assert POISSON.with_noise(z).epsilon(20, 1e-5) <= 3.0
    assert POISSON.with_noise(z * 0.97).epsilon(20, 1e-5) > 3.0


def test_an_unreachable_target_is_refused_naming_it():
    with pytest.raises(ValueError, match="target_epsilon=0.01 is invalid; it cannot be reached"):
        accounting.calibrate_noise_multiplier(FIXED, 0.01, 10, 1e-5)


def test_rounds_within_a_budget_are_the_last_rounds_that_fit():
    budget = FIXED.epsilon(30, 1e-5)
    assert accounting.rounds_within(FIXED, budget, 100, 1e-5) == 30
    assert accounting.rounds_within(FIXED, budget, 20, 1e-5) == 20


# ---- options ---------------------------------------------------------------------------------

def dp_config(algorithm="fedavg", **dp):
    return {"algorithm": {"name": algorithm, "dp": dp}, "run": {"cohort_size": 4}}


@pytest.mark.parametrize("dp,path,expected", [
    ({"clip": 0.0, "noise_multiplier": 1.0}, "algorithm.dp.clip", "expected a number > 0"),
    ({"clip": -1.0, "noise_multiplier": 1.0}, "algorithm.dp.clip", "> 0"),
    ({"clip": 1.0, "noise_multiplier": 0.0}, "algorithm.dp.noise_multiplier", "> 0"),
    ({"clip": 1.0, "noise_multiplier": -2.0}, "algorithm.dp.noise_multiplier", "> 0"),
    ({"clip": 1.0}, "algorithm.dp.noise_multiplier", "or a target_epsilon"),
    ({"noise_multiplier": 1.0}, "algorithm.dp.noise_multiplier", "DP is off until clip"),
    ({"clip": 1.0, "noise_multiplier": 1.0, "delta": 1.0}, "algorithm.dp.delta",
     "strictly between 0 and 1"),
    ({"clip": 1.0, "noise_multiplier": 1.0, "delta": 0.0}, "algorithm.dp.delta", "between"),
    ({"clip": 1.0, "target_epsilon": -1.0}, "algorithm.dp.target_epsilon", "> 0"),
    ({"clip": 1.0, "noise_multiplier": 1.0, "sampling": "poisson"},
     "algorithm.dp.expected_cohort", "Poisson sampling needs"),
    ({"clip": 1.0, "noise_multiplier": 1.0, "expected_cohort": 3.0},
     "algorithm.dp.expected_cohort", "only Poisson sampling"),
    ({"clip": 1.0, "noise_multiplier": 1.0, "clip_lr": 0.5}, "algorithm.dp.clip_lr",
     "only adaptive clipping"),
    ({"clip": 1.0, "noise_multiplier": 1.0, "on_budget": "warn"}, "algorithm.dp.on_budget",
     "no budget"),
    ({"clip": 1.0, "noise_multiplier": 1.0, "sampling": "laplace"}, "algorithm.dp.sampling",
     "allowed: fixed, poisson"),
])
def test_bad_dp_options_are_one_line_errors_naming_the_option(dp, path, expected):
    with pytest.raises(OptionError) as error:
        run_config.config_from_dict(dp_config(**dp))
    assert error.value.path == path and expected in error.value.expected
    assert "\n" not in str(error.value)


def test_dp_is_refused_where_it_cannot_compose():
    with pytest.raises(OptionError) as error:  # FedAMP shares no model delta to clip
        run_config.config_from_dict(dp_config("fedamp", clip=1.0, noise_multiplier=1.0))
    assert error.value.path == "algorithm.dp"
    with pytest.raises(OptionError) as error:
        run_config.config_from_dict({"algorithm": {"name": "fedavg", "dense_update": "factored",
                                                   "dp": {"clip": 1.0, "noise_multiplier": 1.0}}})
    assert error.value.path == "algorithm.dense_update"
    with pytest.raises(ValueError, match="sensitivity bound holds for the clipped sum"):
        fedavg(small_model(), optax.sgd(0.1), aggregator=robust.coordinate_median,
               dp=dp_aggregator(1.0, 1.0))


def test_the_dp_options_are_listed_on_the_algorithms_that_compose_with_it():
    private = {name for name, spec in REGISTRY.items()
               if any(path.startswith("dp.") for path, *_ in describe(spec.config))}
    assert private == {"fedavg", "fedprox", "ditto", "fedavg_meta", "fedavgm", "fedadagrad",
                       "fedadam", "fedyogi"}


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "ditto", "fedavg_meta", "fedadam"])
def test_every_private_builder_draws_poisson_cohorts(name):
    spec = REGISTRY[name]
    defaults = spec.config()
    options = dataclasses.replace(
        defaults, client=dataclasses.replace(defaults.client, epochs=1), dp=DPOptions(
            clip=1.0, noise_multiplier=1.0, sampling="poisson", expected_cohort=2.0))
    xs, ys = make_clients([5] * 8)
    info = DataInfo(num_clients=100, num_classes=3, feature_shape=(5,), max_examples=5)
    algorithm = spec.build(options, small_model(), info)
    state = jax.jit(algorithm.round)(algorithm.init(jax.random.key(0)), stack_clients(xs, ys))
    # 2 clients expected of 100; all 8 of the runner's cohort would train without the draw.
    assert int(state.metrics["participants"]) < 8


# ---- a run's accounting ----------------------------------------------------------------------

def plan(**dp):
    return plan_run(DPOptions(clip=1.0, **dp), num_clients=1000, cohort_size=50, rounds=100)


def test_a_run_calibrates_its_noise_to_the_target_epsilon():
    private = plan(target_epsilon=5.0, delta=1e-5)
    assert private.options.noise_multiplier == private.mechanism.noise_multiplier
    assert private.epsilon(100) <= 5.0 and private.rounds == 100
    assert plan_run(DPOptions(), num_clients=1000, cohort_size=50, rounds=100) is None


def test_a_spent_budget_stops_the_run_or_warns():
    budget = FIXED.epsilon(40, 1e-5) * (1 + 1e-9)
    with pytest.warns(UserWarning, match="spent after round 40 of 100; the run stops there"):
        assert plan(noise_multiplier=1.0, target_epsilon=budget, delta=1e-5).rounds == 40
    with pytest.warns(UserWarning, match="running on past the budget"):
        assert plan(noise_multiplier=1.0, target_epsilon=budget, delta=1e-5,
                    on_budget="warn").rounds == 100


@pytest.mark.parametrize("dp,path,expected", [
    ({"noise_multiplier": 1.0, "sampling": "poisson", "expected_cohort": 60.0},
     "algorithm.dp.expected_cohort", "at most run.cohort_size (50)"),
    ({"noise_multiplier": 1.0, "adaptive_quantile": 0.5, "count_noise": 0.4},
     "algorithm.dp.count_noise", "z < 2 sigma_b = 0.8"),
    ({"target_epsilon": 0.01, "delta": 1e-5}, "algorithm.dp.target_epsilon",
     "it cannot be reached in 100 rounds"),
    ({"noise_multiplier": 0.1, "target_epsilon": 0.5, "delta": 1e-5},
     "algorithm.dp.target_epsilon", "spent before the first round"),
])
def test_a_run_that_cannot_keep_its_promise_is_refused(dp, path, expected):
    with pytest.raises(OptionError) as error:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan(**dp)
    assert error.value.path == path and expected in error.value.expected


def test_default_delta_is_n_to_the_minus_1_1():
    assert plan(noise_multiplier=1.0).delta == pytest.approx(1000 ** -1.1, rel=1e-15)
    np.testing.assert_allclose(accounting.default_delta(10 ** 6), 10 ** -6.6, rtol=1e-12)


@pytest.mark.parametrize("sampling, rows_with_epsilon", [
    ({}, [1, 2, 3, 4, 5]),
    ({"algorithm.dp.sampling": "poisson", "algorithm.dp.expected_cohort": 2.0}, [2, 4, 5])],
    ids=["fixed", "poisson"])
def test_a_private_run_calibrates_and_records_epsilon_in_every_evaluation(sampling,
                                                                           rows_with_epsilon):
    # Metrics rows carry ε every round under RDP, at the evaluated rounds under PLD. A target
    # that calibrates z near 1 (PLD's cost grows as z shrinks: calibrating Poisson's took 2.4 s
    # at ε = 0.5, z = 1.13, and 5.8 s at ε = 2, z = 0.66).
    config = small_digits_config(**{"algorithm.dp.clip": 1.0, "algorithm.dp.target_epsilon": 0.5,
                                    **sampling})
    result = run_config.run(config, progress=False)
    private = plan_run(config.algorithm.options.dp, num_clients=8, cohort_size=4, rounds=5)
    assert [e["round"] for e in result.evaluations] == [2, 4, 5]
    assert [e["epsilon"] for e in result.evaluations] == [private.epsilon(t) for t in (2, 4, 5)]
    assert [row["round"] for row in result.history if "epsilon" in row] == rows_with_epsilon
    assert all(row["epsilon"] == private.epsilon(row["round"])
               for row in result.history if "epsilon" in row)
    assert result.evaluations[0]["epsilon"] < result.evaluations[-1]["epsilon"] <= 0.5
    assert result.summary["final"]["delta"] == pytest.approx(8 ** -1.1)
    denominator = private.options.expected_cohort or 4  # the fixed-denominator estimator's
    assert result.history[-1]["dp_noise_std"] == pytest.approx(
        private.options.noise_multiplier * 1.0 / denominator)


def test_a_poisson_cohort_that_often_overflows_its_capacity_warns():
    options = DPOptions(clip=1.0, noise_multiplier=1.0, sampling="poisson", expected_cohort=10.0)
    with pytest.warns(UserWarning, match="overflows run.cohort_size=12 in 20.4% of rounds"):
        private = plan_run(options, num_clients=200, cohort_size=12, rounds=5)
    assert private.mechanism.truncation_probability == pytest.approx(0.2035, abs=1e-4)


def test_the_command_line_starts_without_importing_dp_accounting():
    # dp_accounting pulls in scipy.signal (seconds of start-up); a run without DP never needs it.
    code = ("import sys, fedjax_lab.cli, fedjax_lab.config, fedjax_lab.privacy; "
            "sys.exit('dp_accounting' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
