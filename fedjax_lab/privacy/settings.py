"""User-level differential privacy as an option group, and what a run makes of it.

`DPOptions` is nested as `dp` in the configs of the algorithms whose server aggregates model
deltas (FedAvg, FedProx, Ditto's global model, FedAvg-Meta; FedAdam and FedYogi are FedAvg with
`server.optimizer`), so `--algorithm.dp.clip 1 --algorithm.dp.noise_multiplier 1` makes any of
them DP-FedAvg (McMahan et al., ICLR 2018, arXiv 1710.06963) and `fedjax-lab list` shows the
options on exactly those. It is off unless `clip` is set. An algorithm uses it in two places:
its server aggregates with `aggregator()` (`fedjax_lab.privacy.aggregation`), and its builder
wraps it with `sampled(algorithm, data)`, which makes Poisson cohorts out of the runner's
uniform ones when `sampling` is "poisson".

`mechanism` "tree" makes it DP-FTRL instead (Kairouz et al., "Practical and Private (Deep)
Learning without Sampling or Shuffling", ICML 2021, arXiv 2103.00039): no sampling, the cohorts
are epochs of R = `rounds_per_epoch` rounds (default N // C) cut from a fresh permutation of the
clients, so each client takes part at most once per epoch (`sampled` names that schedule in
`Algorithm.cohorts`, which the runners draw), and the noise is a binary tree over each epoch's
rounds, restarted every epoch. When C does not divide N, the N - RC clients last in an epoch's
permutation sit it out (a different few each epoch) rather than fill a short cohort. Adaptive
clipping is refused with the tree: its count would need a tree and an accounting of its own.

A run also needs what the algorithm cannot know: the population N, the cohort size (or padded
capacity) C and the rounds T. `plan_run` takes them, calibrates z to `target_epsilon` when no z
is given (`dp_accounting.calibrate_dp_mechanism`), applies the budget (stop at the last round
within it, or warn) and returns a `PrivateRun` whose `epsilon(t)` the runner writes in every
evaluation. Every bad combination is an `OptionError` naming the option, before anything runs.
"""

import dataclasses
import functools
import warnings

import jax

from fedjax_lab.core.types import Algorithm, DataInfo, server_key
from fedjax_lab.data.sampling import EpochCohorts, poisson_subsample
from fedjax_lab.options import (OptionError, one_of, open_fraction, option, optional, positive,
                                positive_int)
from fedjax_lab.privacy import accounting
from fedjax_lab.privacy.aggregation import (AdaptiveClipping, DPAggregator, TreeAggregation,
                                            dp_aggregator)

BUDGET_POLICIES = ("stop", "warn")
# Sub-stream of the server key that draws the Poisson sample (the aggregation uses 0 and 1).
_POISSON_DRAW = 2
# Where the options sit in a run's config: errors name the full path.
PREFIX = "algorithm.dp."
# A Poisson cohort overflowing its capacity more often than this is worth a warning.
TRUNCATION_WARNING = 0.01


@dataclasses.dataclass(frozen=True)
class DPOptions:
    """User-level DP-FedAvg, or DP-FTRL with `mechanism` "tree"; off unless `clip` is set.
    Defaults are the papers': δ = N^-1.1 (McMahan et al.), quantile 0.5, η = 0.2 and σ_b =
    expected cohort / 20 (Andrew et al.), one tree per epoch of N // C rounds (Kairouz et al.)."""

    clip: float | None = option(None, "L2 norm S each client's model delta is clipped to (the "
                                "initial S with adaptive clipping); none = no DP",
                                optional(positive), sweepable=True)
    noise_multiplier: float | None = option(None, "z: noise std z S on the sum of clipped "
                                            "deltas; none = calibrated to target_epsilon",
                                            optional(positive), sweepable=True)
    target_epsilon: float | None = option(None, "epsilon budget at delta: calibrates z when it "
                                          "is none, else the run stops or warns (on_budget) "
                                          "once it is spent", optional(positive))
    delta: float | None = option(None, "delta; none = 1 / N^1.1", optional(open_fraction))
    mechanism: str = option("gaussian", "the noise: gaussian (fresh every round; DP-FedAvg) or "
                            "tree (DP-FTRL: tree-aggregated over each epoch's rounds, cohorts "
                            "an epoch schedule with each client at most once per epoch; RDP)",
                            one_of(*accounting.MECHANISMS))
    rounds_per_epoch: int | None = option(None, "tree: rounds per epoch, after which the tree "
                                          "restarts; none = N // run.cohort_size",
                                          optional(positive_int))
    sampling: str = option("fixed", "gaussian: cohorts as the accountant assumes them: fixed "
                           "(the run's cohort_size, uniformly; RDP, replace-one) or poisson "
                           "(each client with probability expected_cohort / N, padded to "
                           "cohort_size; PLD)", one_of(*accounting.SAMPLINGS))
    expected_cohort: float | None = option(None, "Poisson sampling's expected clients per round "
                                           "(the denominator); at most run.cohort_size",
                                           optional(positive))
    adaptive_quantile: float | None = option(None, "adaptive clipping: the quantile of update "
                                             "norms S tracks (Andrew et al.: 0.5); none = "
                                             "fixed S", optional(open_fraction), sweepable=True)
    clip_lr: float = option(0.2, "adaptive clipping's geometric learning rate", positive,
                            sweepable=True)
    count_noise: float | None = option(None, "adaptive clipping: std of the noise on the count "
                                       "of unclipped clients; none = expected cohort / 20",
                                       optional(positive), sweepable=True)
    on_budget: str = option("stop", "when target_epsilon is spent before the last round: stop "
                            "there, or warn and go on", one_of(*BUDGET_POLICIES))

    @property
    def enabled(self) -> bool:
        return self.clip is not None

    def check(self) -> None:
        defaults = DPOptions()
        if not self.enabled:
            changed = [field.name for field in dataclasses.fields(self)
                       if getattr(self, field.name) != getattr(defaults, field.name)]
            if changed:
                raise OptionError(changed[0], getattr(self, changed[0]),
                                  "DP is off until clip is set (the clip norm S)")
            return
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise OptionError("noise_multiplier", None, "DP needs a noise multiplier > 0, or a "
                              "target_epsilon to calibrate one")
        if self.mechanism == "tree":
            if self.sampling != defaults.sampling:
                raise OptionError("sampling", self.sampling, "the tree samples nothing: its "
                                  "cohorts are epochs, each client at most once per epoch")
            if self.adaptive_quantile is not None:
                raise OptionError("adaptive_quantile", self.adaptive_quantile, "adaptive "
                                  "clipping is not accounted with the tree; use a fixed clip")
        elif self.rounds_per_epoch is not None:
            raise OptionError("rounds_per_epoch", self.rounds_per_epoch, "only the tree "
                              "mechanism has epochs; set mechanism tree")
        if self.sampling == "poisson" and self.expected_cohort is None:
            raise OptionError("expected_cohort", None, "Poisson sampling needs the expected "
                              "number of clients per round")
        if self.sampling == "fixed" and self.expected_cohort is not None:
            raise OptionError("expected_cohort", self.expected_cohort, "only Poisson sampling "
                              "uses it; a fixed cohort's denominator is run.cohort_size")
        if self.adaptive_quantile is None:
            for name in ("clip_lr", "count_noise"):
                if getattr(self, name) != getattr(defaults, name):
                    raise OptionError(name, getattr(self, name), "only adaptive clipping uses "
                                      "it; set adaptive_quantile")
        if self.target_epsilon is None and self.on_budget != defaults.on_budget:
            raise OptionError("on_budget", self.on_budget, "there is no budget without "
                              "target_epsilon")

    def aggregator(self) -> DPAggregator | None:
        """The server's private aggregation, None when DP is off. z must be known (given, or
        filled in by `plan_run`)."""
        if not self.enabled:
            return None
        if self.noise_multiplier is None:
            raise OptionError(PREFIX + "noise_multiplier", None, "not calibrated: a run "
                              "calibrates it to target_epsilon (fedjax_lab.config.build); "
                              "elsewhere set it, or use privacy.plan_run")
        adaptive = None if self.adaptive_quantile is None else AdaptiveClipping(
            self.adaptive_quantile, self.clip_lr, self.count_noise)
        return dp_aggregator(self.clip, self.noise_multiplier, denominator=self.expected_cohort,
                             adaptive=adaptive, tree=self._tree())

    def sampled(self, algorithm: Algorithm, data: DataInfo) -> Algorithm:
        """`algorithm` whose cohorts are Poisson samples under "poisson" sampling (the others of
        each runner cohort become padded clients), or epochs under the tree; unchanged
        otherwise."""
        if not self.enabled:
            return algorithm
        if self.mechanism == "tree":
            return algorithm._replace(cohorts=EpochCohorts(self._tree().rounds_per_epoch))
        if self.sampling != "poisson":
            return algorithm
        return poisson_cohorts(algorithm, data.num_clients, self.expected_cohort)

    def _tree(self) -> TreeAggregation | None:
        if self.mechanism != "tree":
            return None
        if self.rounds_per_epoch is None:
            raise OptionError(PREFIX + "rounds_per_epoch", None, "not planned: a run sets it "
                              "to N // run.cohort_size (fedjax_lab.config.build); elsewhere "
                              "set it, or use privacy.plan_run")
        return TreeAggregation(self.rounds_per_epoch)


def poisson_cohorts(algorithm: Algorithm, num_clients: int, expected_cohort: float) -> Algorithm:
    """`algorithm` run on Poisson samples of rate expected_cohort / N drawn from each uniform
    cohort it is given (`fedjax_lab.data.sampling.poisson_subsample`)."""
    rate = expected_cohort / num_clients

    def round_fn(state, batch):
        key = jax.random.fold_in(server_key(batch), _POISSON_DRAW)
        return algorithm.round(state, poisson_subsample(batch, key, num_clients, rate))

    return algorithm._replace(round=round_fn)


@dataclasses.dataclass(frozen=True)
class PrivateRun:
    """A private run's accounting.

    Attributes:
        options: the `DPOptions` with z filled in (calibrated when it was not given).
        mechanism: one round as the accountant sees it.
        delta: the δ at which ε is reported.
        rounds: the rounds to run (fewer than asked when the budget stops the run).
    """

    options: DPOptions
    mechanism: accounting.Mechanism
    delta: float
    rounds: int

    def epsilon(self, rounds: int) -> float:
        """ε at `delta` after `rounds` rounds."""
        return self.mechanism.epsilon(rounds, self.delta)


@functools.lru_cache(maxsize=64)
def plan_run(options: DPOptions, *, num_clients: int, cohort_size: int,
             rounds: int) -> PrivateRun | None:
    """The accounting of `rounds` rounds of C = `cohort_size` clients out of N = `num_clients`;
    None when DP is off. Cached, so a config's build and its run calibrate once.

    Raises `OptionError` naming the option when the expected cohort exceeds the capacity, the
    count noise cannot carry z, an epoch of the tree cannot fit its rounds' distinct clients, or
    the target ε cannot be reached (or is spent before round 1).
    """
    if not options.enabled:
        return None
    if options.sampling == "poisson" and options.expected_cohort > cohort_size:
        raise OptionError(PREFIX + "expected_cohort", options.expected_cohort,
                          f"expected at most run.cohort_size ({cohort_size}), the padded "
                          "capacity of a Poisson cohort")
    delta = accounting.default_delta(num_clients) if options.delta is None else options.delta
    if options.mechanism == "tree":
        most = num_clients // cohort_size
        if options.rounds_per_epoch is not None and options.rounds_per_epoch > most:
            raise OptionError(PREFIX + "rounds_per_epoch", options.rounds_per_epoch,
                              f"at most {most}: an epoch holds each of the {num_clients} "
                              f"clients at most once, {cohort_size} (run.cohort_size) a round")
        options = dataclasses.replace(options, rounds_per_epoch=options.rounds_per_epoch or most)
        mechanism = accounting.TreeAggregatedGaussian(options.noise_multiplier or 1.0,
                                                      options.rounds_per_epoch)
    else:
        mechanism = accounting.SampledGaussian(
            options.noise_multiplier or 1.0, num_clients, cohort_size, options.sampling,
            options.expected_cohort)
    # Adaptive clipping's count noise takes part of the budget: z must stay below 2 sigma_b.
    max_noise = None
    if options.adaptive_quantile is not None:
        denominator = options.expected_cohort or cohort_size
        max_noise = 2 * (options.count_noise or denominator / 20)
    noise = options.noise_multiplier
    if noise is None:
        try:
            noise = accounting.calibrate_noise_multiplier(mechanism, options.target_epsilon,
                                                          rounds, delta)
        except ValueError as error:
            raise OptionError(PREFIX + "target_epsilon", options.target_epsilon,
                              str(error).partition("; ")[2] or str(error)) from None
    if max_noise is not None and not noise < max_noise:
        raise OptionError(PREFIX + "count_noise", options.count_noise,
                          f"adaptive clipping's count noise carries at most z < 2 sigma_b = "
                          f"{max_noise:g}, and z is {noise:g}; raise count_noise")
    mechanism = mechanism.with_noise(noise)
    if mechanism.truncation_probability > TRUNCATION_WARNING:
        warnings.warn(f"a Poisson cohort of expected size {options.expected_cohort:g} overflows "
                      f"run.cohort_size={cohort_size} in {mechanism.truncation_probability:.1%} of "
                      "rounds, which then keep a random cohort_size of it (accounted, but fewer "
                      "clients than the denominator assumes); D + 4 sqrt(D) makes it rare",
                      stacklevel=2)
    if options.target_epsilon is not None and options.noise_multiplier is not None:
        within = accounting.rounds_within(mechanism, options.target_epsilon, rounds, delta)
        if within < rounds:
            spent = (f"epsilon={options.target_epsilon:g} at delta={delta:g} is spent after "
                     f"round {within} of {rounds}")
            if options.on_budget == "warn":
                warnings.warn(f"{spent}; running on past the budget (on_budget='warn')",
                              stacklevel=2)
            elif within == 0:
                raise OptionError(PREFIX + "target_epsilon", options.target_epsilon,
                                  f"spent before the first round at noise_multiplier {noise:g}")
            else:
                warnings.warn(f"{spent}; the run stops there (on_budget='stop')", stacklevel=2)
                rounds = within
    return PrivateRun(dataclasses.replace(options, noise_multiplier=noise), mechanism, delta,
                      rounds)


def resolve(algorithm_options, *, num_clients: int, cohort_size: int, rounds: int):
    """(algorithm options with `dp.noise_multiplier` filled in, `PrivateRun` or None) for any
    algorithm's options; those without a `dp` group pass through."""
    options = getattr(algorithm_options, "dp", None)
    if not isinstance(options, DPOptions):
        return algorithm_options, None
    private = plan_run(options, num_clients=num_clients, cohort_size=cohort_size, rounds=rounds)
    if private is None:
        return algorithm_options, None
    return dataclasses.replace(algorithm_options, dp=private.options), private
