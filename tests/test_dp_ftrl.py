"""DP-FTRL with tree aggregation (fedjax_lab/privacy, mechanism "tree"): the tree's noise, the
σ = 0 limit, the epoch schedule and its use by the runners, the accountant, the options."""

import dataclasses

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from common import (assert_trees_close, assert_trees_equal, float64_params, make_clients,
                    small_digits_config, small_model, stack_clients)
from fedjax_lab import config as run_config
from fedjax_lab.algorithms import fedavg
from fedjax_lab.cli import main
from fedjax_lab.core.types import server_key
from fedjax_lab.data.sampling import EpochCohorts, cohort_schedule
from fedjax_lab.experiment import run_experiment
from fedjax_lab.options import OptionError
from fedjax_lab.privacy import DPOptions, accounting, dp_aggregator, gaussian_noise, plan_run
from fedjax_lab.privacy import AdaptiveClipping, TreeAggregation, TreeAggregatorState
from fedjax_lab.privacy.aggregation import _TREE_NOISE

SIZES = [9, 4, 13, 6]


def reference_prefix_noise(epoch_key, k, like, std):
    """Prefix k's noise as the paper defines it: node (l, (k >> l) - 1) of every set bit l."""
    total = jax.tree.map(jnp.zeros_like, like)
    for level in range(k.bit_length()):
        if k >> level & 1:
            key = jax.random.fold_in(jax.random.fold_in(epoch_key, level), (k >> level) - 1)
            total = optax.tree.add(total, gaussian_noise(key, like, std))
    return total


# ---- the tree's noise ------------------------------------------------------------------------

def test_with_zero_deltas_the_model_moves_by_exactly_the_tree_prefix_noise():
    # Client lr 0 makes every delta exactly 0, so under server SGD(1) θ_t - θ_0 is minus the
    # released noise: within an epoch the tree's prefix noise, across a restart the last
    # epoch's full prefix plus the new one's.
    rounds_per_epoch, clip, z = 5, 0.5, 1.3
    with jax.enable_x64(True):
        xs, ys = make_clients(SIZES, dtype=np.float64)
        dp = dp_aggregator(clip, z, tree=TreeAggregation(rounds_per_epoch))
        algorithm = fedavg(small_model(), optax.sgd(0.0), num_epochs=1, batch_size=4, dp=dp)
        params = float64_params(small_model())
        state = algorithm.init(jax.random.key(0))._replace(params=params)
        round_fn = jax.jit(algorithm.round)
        std = z * clip / len(SIZES)
        finished_epochs = jax.tree.map(jnp.zeros_like, params)
        for t in range(7):
            batch = stack_clients(xs, ys, round_index=t)
            position = t % rounds_per_epoch
            if position == 0:
                epoch_key = jax.random.fold_in(server_key(batch), _TREE_NOISE)
            state = round_fn(state, batch)
            prefix = reference_prefix_noise(epoch_key, position + 1, params, std)
            moved = optax.tree.sub(params, state.params)
            assert_trees_close(moved, optax.tree.add(finished_epochs, prefix))
            if position == rounds_per_epoch - 1:
                finished_epochs = optax.tree.add(finished_epochs, prefix)
            assert isinstance(state.opt_state.aggregator, TreeAggregatorState)
            assert int(state.opt_state.aggregator.round) == int(state.round) == t + 1
            # Round k adds one node and retires as many as k has trailing zeros (k = 4: two).
            k = position + 1
            retired = (k & -k).bit_length() - 1
            assert float(state.metrics["dp_noise_std"]) == pytest.approx(
                std * np.sqrt(1 + retired), rel=1e-15)


@jax.jit
def prefix_noises(round_keys):
    """The tree's prefix noise after each round of zero deltas (1,000 x 20 coordinates)."""
    dp = dp_aggregator(1.0, 2.0, tree=TreeAggregation(8))
    deltas = {"w": jnp.zeros((4, 1000, 20))}

    def one_round(carry, key):
        state, total = carry
        mean, state, _ = dp.aggregate_stacked(deltas, jnp.ones(4, bool), state, key)
        total = optax.tree.add(total, mean)
        return (state, total), total["w"].ravel()

    _, totals = jax.lax.scan(one_round, (dp.init(), {"w": jnp.zeros((1000, 20))}), round_keys)
    return totals


def test_prefix_noise_variance_is_popcount_times_the_node_variance():
    # 20,000 coordinates per prefix: the sample variance's relative std is sqrt(2 / 20000) =
    # 1%, so 5% is five of them. R = 8 covers k = 1..8 (popcounts 1 1 2 1 2 2 3 1), then k = 1..4
    # of the next epoch.
    totals = np.asarray(prefix_noises(jax.random.split(jax.random.key(3), 12)), np.float64)
    node_variance = (2.0 * 1.0 / 4) ** 2
    epoch_start = np.zeros_like(totals[0])
    for t, total in enumerate(totals):
        k = t % 8 + 1
        if k == 1 and t > 0:
            epoch_start = totals[t - 1]
        variance = np.mean((total - epoch_start) ** 2)
        assert variance == pytest.approx(bin(k).count("1") * node_variance, rel=0.05), k


def test_nodes_are_shared_within_an_epoch_and_independent_across_epochs():
    totals = np.asarray(prefix_noises(jax.random.split(jax.random.key(3), 12)), np.float64)
    corr = lambda a, b: np.corrcoef(a, b)[0, 1]
    # Prefixes 2 = node(1, 0) and 3 = node(1, 0) + node(0, 2) share one of 1 and 2 nodes.
    assert corr(totals[1], totals[2]) == pytest.approx(2 ** -0.5, abs=0.02)
    # Prefix 4 = node(2, 0) shares nothing with prefixes 1..3, whose nodes it retires.
    assert abs(corr(totals[3], totals[2])) < 0.03
    # The second epoch's prefixes (totals minus the first epoch's) are independent of the first.
    second = totals[8:] - totals[7]
    assert all(abs(corr(second[i], totals[i])) < 0.03 for i in range(4))


def test_same_key_same_noise_and_another_key_other_noise():
    keys = jax.random.split(jax.random.key(3), 12)
    assert np.array_equal(prefix_noises(keys), prefix_noises(keys))
    assert not np.allclose(prefix_noises(keys), prefix_noises(jax.random.split(jax.random.key(4),
                                                                               12)))


def test_without_noise_dp_ftrl_is_dp_fedavg_bit_for_bit():
    # With z = 0 every node is exactly 0, so the tree adds exactly what the Gaussian adds
    # (zero) to the same clipped mean, and the server optimiser (here heavy-ball momentum,
    # DP-FTRLM) sees identical inputs. Through a runner the two differ only in their cohorts:
    # epochs against uniform draws.
    with jax.enable_x64(True):
        server_optimizer = optax.sgd(0.5, momentum=0.9)
        xs, ys = make_clients(SIZES, dtype=np.float64)
        params = float64_params(small_model())
        algorithms = [fedavg(small_model(), optax.sgd(0.1), num_epochs=1, batch_size=4,
                             server_optimizer=server_optimizer,
                             dp=dp_aggregator(0.3, 0.0, tree=tree))
                      for tree in (None, TreeAggregation(3))]
        states = [algorithm.init(jax.random.key(0))._replace(params=params)
                  for algorithm in algorithms]
        # One program for both rounds: half the compiling of two.
        both_rounds = jax.jit(lambda states, batch: [
            algorithm.round(state, batch) for algorithm, state in zip(algorithms, states)])
        for t in range(4):  # the tree restarts in round 4
            states = both_rounds(states, stack_clients(xs, ys, round_index=t))
            assert_trees_equal(states[1].params, states[0].params)
            assert_trees_equal(states[1].opt_state.optimizer, states[0].opt_state.optimizer)


# ---- the schedule ----------------------------------------------------------------------------

def test_epoch_cohorts_hold_each_client_at_most_once_per_epoch():
    key, num_clients, cohort_size = jax.random.key(5), 23, 4
    schedule = EpochCohorts(5)  # 5 x 4 = 20 of 23 clients per epoch
    ids = cohort_schedule(key, 15, num_clients, cohort_size, cohorts=schedule)
    assert np.array_equal(ids[7], np.asarray(schedule(key, 7, num_clients, cohort_size)))
    epochs = ids.reshape(3, 20)
    assert all(len(set(epoch)) == 20 for epoch in epochs)
    assert all((np.diff(row) > 0).all() for row in ids)  # sorted, distinct
    assert len({frozenset(epoch) for epoch in epochs[:, :4]}) == 3  # a new permutation each
    with pytest.raises(ValueError, match="rounds_per_epoch=6 is invalid"):
        EpochCohorts(6)(key, 0, num_clients, cohort_size)


def cohort_bits(algorithm):
    """`algorithm` whose metrics also hold its cohort as bits (populations of <= 30)."""

    def init(key):
        state = algorithm.init(key)
        return state._replace(metrics={**state.metrics, "cohort": jnp.zeros((), jnp.int32)})

    def round_fn(state, batch):
        state = algorithm.round(state, batch)
        return state._replace(metrics={**state.metrics,
                                       "cohort": jnp.sum(jnp.left_shift(1, batch.client_ids))})

    return algorithm._replace(init=init, round=round_fn)


@pytest.mark.parametrize("on_device", [True, False], ids=["device", "host-fed"])
def test_both_runners_draw_the_epoch_schedule(on_device):
    config = small_digits_config(**{"algorithm.dp.clip": 1.0,
                                    "algorithm.dp.noise_multiplier": 1.0,
                                    "algorithm.dp.mechanism": "tree"})
    algorithm, dataset, _ = run_config.build(config)
    result = run_experiment(cohort_bits(algorithm), dataset, num_rounds=6, cohort_size=4,
                            seed=0, eval_every=6, progress=False, population_on_device=on_device)
    cohorts = [row["cohort"] for row in result.history]
    expected = cohort_schedule(jax.random.key(0), 6, 8, 4, cohorts=EpochCohorts(2))
    assert cohorts == [int(np.sum(1 << row)) for row in expected]
    # 8 clients, 4 a round: each epoch of 2 rounds is the whole population, once.
    assert all(a & b == 0 and a | b == 255 for a, b in zip(cohorts[::2], cohorts[1::2]))


# ---- accounting ------------------------------------------------------------------------------

@pytest.mark.parametrize("z,rounds_per_epoch,rounds,delta", [
    (1.0, 10, 10, 1e-5), (0.7, 10, 35, 1e-6), (3.0, 100, 250, 1e-3), (1.5, 7, 1, 1e-5)])
def test_epsilon_equals_dp_accounting_called_directly(z, rounds_per_epoch, rounds, delta):
    # Appendix D's RDP of one tree, α ceil(log2(steps + 1)) / 2z², summed over the epochs run.
    epochs, begun = divmod(rounds, rounds_per_epoch)
    depth = epochs * np.ceil(np.log2(rounds_per_epoch + 1)) + np.ceil(np.log2(begun + 1))
    orders = rdp_privacy_accountant.RdpAccountant().orders
    by_hand = rdp_privacy_accountant.compute_epsilon(
        orders, np.asarray(orders) * depth / (2 * z ** 2), delta)[0]
    accountant = rdp_privacy_accountant.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    tree = lambda steps: dp_accounting.SingleEpochTreeAggregationDpEvent(z, steps)
    if epochs:
        accountant.compose(tree(rounds_per_epoch), epochs)
    if begun:
        accountant.compose(tree(begun))
    mechanism = accounting.TreeAggregatedGaussian(z, rounds_per_epoch)
    assert mechanism.epsilon(rounds, delta) == accountant.get_epsilon(delta)
    assert mechanism.epsilon(rounds, delta) == pytest.approx(by_hand, rel=1e-12)


def test_epsilon_grows_with_the_rounds_and_calibration_meets_the_target():
    mechanism = accounting.TreeAggregatedGaussian(1.0, 20)
    epsilons = [mechanism.epsilon(t, 1e-5) for t in range(0, 81)]
    assert epsilons[0] == 0 and all(np.diff(epsilons) >= 0)
    assert epsilons[40] < epsilons[41]  # a new epoch's first round costs a node
    private = plan_run(DPOptions(clip=1.0, mechanism="tree", target_epsilon=4.0, delta=1e-5),
                       num_clients=1000, cohort_size=50, rounds=100)
    z = private.options.noise_multiplier
    assert private.options.rounds_per_epoch == 20 and private.mechanism.rounds_per_epoch == 20
    assert private.epsilon(100) <= 4.0 < private.mechanism.with_noise(z * 0.997).epsilon(100,
                                                                                           1e-5)


# ---- options ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dp,path,expected", [
    ({"sampling": "poisson", "expected_cohort": 2.0}, "algorithm.dp.sampling",
     "the tree samples nothing"),
    ({"expected_cohort": 2.0}, "algorithm.dp.expected_cohort", "only Poisson sampling"),
    ({"adaptive_quantile": 0.5}, "algorithm.dp.adaptive_quantile", "not accounted with the tree"),
    ({"mechanism": "gaussian", "rounds_per_epoch": 3}, "algorithm.dp.rounds_per_epoch",
     "only the tree mechanism has epochs"),
    ({"rounds_per_epoch": 0}, "algorithm.dp.rounds_per_epoch", "a positive integer"),
    ({"mechanism": "laplace"}, "algorithm.dp.mechanism", "allowed: gaussian, tree"),
])
def test_bad_tree_options_are_one_line_errors_naming_the_option(dp, path, expected):
    options = {"clip": 1.0, "noise_multiplier": 1.0, "mechanism": "tree", **dp}
    with pytest.raises(OptionError) as error:
        run_config.config_from_dict({"algorithm": {"name": "fedavg", "dp": options},
                                     "run": {"cohort_size": 4}})
    assert error.value.path == path and expected in error.value.expected
    assert "\n" not in str(error.value)


def test_an_epoch_that_cannot_fit_its_rounds_and_an_unplanned_tree_are_refused():
    options = DPOptions(clip=1.0, noise_multiplier=1.0, mechanism="tree", rounds_per_epoch=26)
    with pytest.raises(OptionError) as error:
        plan_run(options, num_clients=100, cohort_size=4, rounds=10)
    assert error.value.path == "algorithm.dp.rounds_per_epoch"
    assert "at most 25" in error.value.expected
    with pytest.raises(OptionError, match="not planned"):
        dataclasses.replace(options, rounds_per_epoch=None).aggregator()
    with pytest.raises(ValueError, match="adaptive clipping with tree aggregation"):
        dp_aggregator(1.0, 1.0, adaptive=AdaptiveClipping(), tree=TreeAggregation(4))


def test_the_command_line_runs_dp_ftrl_and_prints_epsilon(tmp_path, capsys):
    assert main(["run", "--algorithm", "fedavg", "--algorithm.dp.clip", "1",
                 "--algorithm.dp.noise_multiplier", "1", "--algorithm.dp.mechanism", "tree",
                 "--algorithm.client.epochs", "1", "--model", "logistic", "--data.num_clients",
                 "8", "--cohort-size", "2", "--rounds", "4", "--eval-every", "2",
                 "--output", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().err
    private = plan_run(DPOptions(clip=1.0, noise_multiplier=1.0, mechanism="tree"),
                       num_clients=8, cohort_size=2, rounds=4)
    assert f"epsilon {private.epsilon(2):.4g}" in printed
    assert f"epsilon {private.epsilon(4):.4g}" in printed
