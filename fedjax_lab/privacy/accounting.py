"""Privacy accounting of DP-FedAvg and DP-FTRL with Google's `dp_accounting`: events, ε at δ, σ
for a target ε.

References:
    McMahan, Ramage, Talwar, Zhang. "Learning Differentially Private Recurrent Language Models."
    ICLR 2018, arXiv 1710.06963 (user-level DP, δ = N^-1.1, the moments accountant).
    Wang, Balle, Kasiviswanathan. "Subsampled Rényi Differential Privacy and Analytical Moments
    Accountant." AISTATS 2019, arXiv 1808.00087 (sampling without replacement).
    Andrew, Thakkar, McMahan, Ramaswamy. "Differentially Private Learning with Adaptive
    Clipping." NeurIPS 2021, arXiv 1905.03871 (the count's noise composed into one multiplier).
    Kairouz, McMahan, Song, Thakkar, Thakurta, Xu. "Practical and Private (Deep) Learning
    without Sampling or Shuffling." ICML 2021, arXiv 2103.00039 (DP-FTRL; Appendix D: restarts).

A round of DP-FedAvg releases one Gaussian mechanism on a random cohort: the sum of the sampled
clients' clipped deltas plus N(0, z²S²). What the accountant composes depends on how the cohort
was drawn, so the event is built from the sampling actually run:

- "poisson": each of N clients independently with probability q, truncated to the padded
  capacity C that fixed shapes need (`fedjax_lab.data.sampling.poisson_subsample`):
  `TruncatedSubsampledGaussianDpEvent(N, q, C, z)`, accounted with privacy loss distributions
  (PLD) under add-or-remove-one adjacency. With C = N nothing is truncated and the event is the
  plain `PoissonSampledDpEvent(q, Gaussian(z))`.
- "fixed": C of N clients uniformly without replacement (the runner's cohorts):
  `SampledWithoutReplacementDpEvent(N, C, Gaussian(z / 2))`, accounted with Rényi DP (RDP), the
  only analysis `dp_accounting` has of it, under replace-one adjacency.

Pitfall avoided: under replace-one, one client's clipped delta replaced by another's moves the sum
by up to 2S, not S, so the noise multiplier relative to that sensitivity is z / 2. Papers that
pass z itself (e.g. Andrew et al.'s Table 1 setting, ε = 5.0 at z = 0.669, 2231 of 10^6 clients,
4000 rounds) report the ε of sensitivity S; with z / 2 the same setting is ε = 306. Poisson
sampling under add-or-remove keeps sensitivity S, which is why it is the sampling of choice.

PLD's discretisation is pessimistic (ε stays an upper bound) and coarser than dp_accounting's
default, `PLD_DISCRETIZATION` = 1e-3 against 1e-4, because a run asks for ε at every evaluation
and a calibration for a dozen: on N = 1000, q = 0.05, C = 80, z = 1, δ = 1e-5, ε differed by
< 3e-4 (3.5499 either way at 100 rounds, 11.0032 against 11.0030 at 1000) at a tenth of the time.
The looseness grows with the rounds composed: for z = 3, q = 1e-3, δ = 10^-6.6 it was 0.214
against 0.140 (RDP: 0.200) at 10^4 rounds and 2.51 against 1.61 (RDP: 1.71) at 10^6, so long
horizons want `pld_discretization` = 1e-4.

DP-FTRL (`TreeAggregatedGaussian`) samples nothing: cohorts are epochs of R rounds, each client
in at most one of them, and the tree restarts every epoch. One epoch is
`SingleEpochTreeAggregationDpEvent(z, R)`, whose RDP is α ceil(log2(R + 1)) / (2z²) (a client's
leaf is in at most that many released nodes); its docstring names exactly this case, a record in
every tree but at most once in each, as that event wrapped in `SelfComposedDpEvent`, so t rounds
are E = t // R full epochs self-composed plus one tree of the t mod R rounds begun. The event is
RDP-only, under `REPLACE_SPECIAL` adjacency (a client's data replaced by the zero record,
Kairouz et al., Definition 1.1), where a clipped delta moves the sum by S, so z is passed as is.
Without sampling there is no amplification: on N = 1500, C = 50 (R = 30), z = 1, δ = N^-1.1 the
tree spent ε = 10.4 in one epoch and 25.5 in 100 rounds, fixed-size sampling 10.1 and 18.1.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

# dp_accounting is imported where it is used: it pulls in scipy.signal (1.5-3 s here), which a
# run without DP, and the command line's start, should not pay for.
if TYPE_CHECKING:
    import dp_accounting

SAMPLINGS = ("fixed", "poisson")
MECHANISMS = ("gaussian", "tree")
PLD_DISCRETIZATION = 1e-3
# The calibration's range of z: a target missed even at the largest is refused as unreachable
# rather than met with absurd noise; below the smallest, a round is barely private at all.
MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER = 0.1, 1e3


def default_delta(num_clients: int) -> float:
    """δ = N^-1.1, McMahan et al.'s choice: below 1/N, so releasing one client's data whole
    is not (ε, δ)-private."""
    return float(num_clients) ** -1.1


@dataclasses.dataclass(frozen=True)
class SampledGaussian:
    """One round of DP-FedAvg as the accountant sees it.

    Attributes:
        noise_multiplier: z, the round's (effective) noise std over the clip norm.
        num_clients: the population N.
        cohort_size: C, the cohort ("fixed") or its padded capacity ("poisson").
        sampling: "fixed" or "poisson".
        expected_cohort: qN, Poisson sampling's expected clients per round.
        pld_discretization: the PLD accountant's value discretisation interval.
    """

    noise_multiplier: float
    num_clients: int
    cohort_size: int
    sampling: str = "fixed"
    expected_cohort: float | None = None
    pld_discretization: float = PLD_DISCRETIZATION

    def __post_init__(self):
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling {self.sampling!r} is unknown; allowed: "
                             f"{', '.join(SAMPLINGS)}")
        if not 1 <= self.cohort_size <= self.num_clients:
            raise ValueError(f"cohort_size={self.cohort_size!r} is invalid; expected 1.."
                             f"{self.num_clients} (the number of clients)")
        if not self.noise_multiplier > 0:
            raise ValueError(f"noise_multiplier={self.noise_multiplier!r} is invalid; "
                             "expected z > 0")
        if self.sampling == "poisson" and not (
                self.expected_cohort is not None
                and 0 < self.expected_cohort <= self.cohort_size):
            raise ValueError(f"expected_cohort={self.expected_cohort!r} is invalid; Poisson "
                             f"sampling needs 0 < expected_cohort <= the capacity "
                             f"{self.cohort_size}")

    @property
    def sampling_rate(self) -> float:
        """q, the probability that a given client is in a round's cohort."""
        expected = self.cohort_size if self.sampling == "fixed" else self.expected_cohort
        return expected / self.num_clients

    @property
    def neighboring_relation(self) -> dp_accounting.NeighboringRelation:
        import dp_accounting
        if self.sampling == "fixed":
            return dp_accounting.NeighboringRelation.REPLACE_ONE
        return dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE

    @property
    def truncation_probability(self) -> float:
        """P(Binomial(N, q) > C): how often a Poisson cohort overflows its capacity (0 for
        fixed-size cohorts)."""
        from scipy import stats
        if self.sampling == "fixed":
            return 0.0
        return float(stats.binom.sf(self.cohort_size, self.num_clients, self.sampling_rate))

    def event(self) -> dp_accounting.DpEvent:
        """The `DpEvent` of one round."""
        import dp_accounting
        z = self.noise_multiplier
        if self.sampling == "fixed":
            return dp_accounting.SampledWithoutReplacementDpEvent(
                self.num_clients, self.cohort_size, dp_accounting.GaussianDpEvent(z / 2))
        if self.cohort_size == self.num_clients:
            return dp_accounting.PoissonSampledDpEvent(self.sampling_rate,
                                                       dp_accounting.GaussianDpEvent(z))
        return dp_accounting.TruncatedSubsampledGaussianDpEvent(
            self.num_clients, self.sampling_rate, self.cohort_size, z)

    def accountant(self) -> dp_accounting.PrivacyAccountant:
        """A fresh accountant that supports this event: RDP for "fixed", PLD for "poisson"."""
        from dp_accounting.pld import pld_privacy_accountant
        from dp_accounting.rdp import rdp_privacy_accountant
        if self.sampling == "fixed":
            return rdp_privacy_accountant.RdpAccountant(
                neighboring_relation=self.neighboring_relation)
        return pld_privacy_accountant.PLDAccountant(
            self.neighboring_relation, value_discretization_interval=self.pld_discretization)

    @property
    def cheap_per_round(self) -> bool:
        """Whether ε costs next to nothing per round count: RDP ("fixed") composes by a product,
        while each PLD ("poisson") round count is a composition of its own (0.5-0.8 s each on
        N = 1000, q = 0.05, C = 80, z = 1)."""
        return self.sampling == "fixed"

    def epsilon(self, rounds: int, delta: float) -> float:
        """ε after `rounds` rounds at `delta` (0 rounds spend nothing)."""
        return _epsilon(self, rounds, delta)

    def run_event(self, rounds: int) -> dp_accounting.DpEvent:
        """The `DpEvent` of `rounds` rounds."""
        import dp_accounting
        return dp_accounting.SelfComposedDpEvent(self.event(), rounds)

    def with_noise(self, noise_multiplier: float) -> "SampledGaussian":
        return dataclasses.replace(self, noise_multiplier=noise_multiplier)


@dataclasses.dataclass(frozen=True)
class TreeAggregatedGaussian:
    """DP-FTRL's rounds as the accountant sees them: a tree of Gaussian nodes per epoch.

    Attributes:
        noise_multiplier: z, each node's noise std over the clip norm.
        rounds_per_epoch: R, the rounds of one tree (each client in at most one of them).
    """

    noise_multiplier: float
    rounds_per_epoch: int

    # Nothing is sampled: every cohort is full, and every round count costs a product (RDP).
    truncation_probability = 0.0
    cheap_per_round = True

    def __post_init__(self):
        if not self.noise_multiplier > 0:
            raise ValueError(f"noise_multiplier={self.noise_multiplier!r} is invalid; "
                             "expected z > 0")
        if isinstance(self.rounds_per_epoch, bool) or not isinstance(
                self.rounds_per_epoch, int) or self.rounds_per_epoch < 1:
            raise ValueError(f"rounds_per_epoch={self.rounds_per_epoch!r} is invalid; "
                             "expected an integer >= 1")

    def run_event(self, rounds: int) -> dp_accounting.DpEvent:
        """The `DpEvent` of `rounds` rounds: the full epochs' trees, then the one begun."""
        import dp_accounting
        epochs, begun = divmod(int(rounds), self.rounds_per_epoch)
        tree = lambda steps: dp_accounting.SingleEpochTreeAggregationDpEvent(
            self.noise_multiplier, steps)
        # dp_accounting refuses a composition of zero events, so each part only when it ran.
        events = [dp_accounting.SelfComposedDpEvent(tree(self.rounds_per_epoch), epochs)] * (
            epochs > 0) + [tree(begun)] * (begun > 0)
        return dp_accounting.ComposedDpEvent(events)

    def accountant(self) -> dp_accounting.PrivacyAccountant:
        """A fresh RDP accountant, the one `dp_accounting` has for the tree."""
        import dp_accounting
        from dp_accounting.rdp import rdp_privacy_accountant
        return rdp_privacy_accountant.RdpAccountant(
            neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)

    def epsilon(self, rounds: int, delta: float) -> float:
        """ε after `rounds` rounds at `delta` (0 rounds spend nothing)."""
        return _epsilon(self, rounds, delta)

    def with_noise(self, noise_multiplier: float) -> "TreeAggregatedGaussian":
        return dataclasses.replace(self, noise_multiplier=noise_multiplier)


Mechanism = SampledGaussian | TreeAggregatedGaussian


@functools.lru_cache(maxsize=4096)
def _epsilon(mechanism: Mechanism, rounds: int, delta: float) -> float:
    # Cached: a run asks for the same rounds at every evaluation and when it checks its budget.
    check_delta(delta)
    if rounds == 0:
        return 0.0
    if isinstance(mechanism, TreeAggregatedGaussian):
        accountant = mechanism.accountant()
        accountant.compose(mechanism.run_event(rounds))
        return float(accountant.get_epsilon(delta))
    if mechanism.sampling == "fixed":
        # The accountant's own arithmetic (its RDP is count times the event's, then
        # compute_epsilon), with the event's RDP computed once for every round count.
        from dp_accounting.rdp import rdp_privacy_accountant
        orders, one_round = _one_round_rdp(mechanism)
        return float(rdp_privacy_accountant.compute_epsilon(orders, rounds * one_round, delta)[0])
    accountant = mechanism.accountant()
    accountant.compose(mechanism.event(), int(rounds))
    return float(accountant.get_epsilon(delta))


@functools.lru_cache(maxsize=64)
def _one_round_rdp(mechanism: SampledGaussian):
    accountant = mechanism.accountant()
    accountant.compose(mechanism.event())
    return accountant.orders, accountant.rdp


def check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta={delta!r} is invalid; expected 0 < delta < 1")


def calibrate_noise_multiplier(mechanism: Mechanism, target_epsilon: float, rounds: int,
                               delta: float, *, tolerance: float = 1e-3) -> float:
    """The smallest z (to a relative `tolerance`) whose `rounds` rounds of `mechanism` spend at
    most `target_epsilon` at `delta`, by `dp_accounting.calibrate_dp_mechanism`.

    The bracket is found from z = 1 by doubling or halving: PLD's cost grows as z shrinks (a
    round at z = 0.3 took 4 s on N = 1000, q = 0.05, 200 rounds, against 1.5 s at z = 1), so the
    search never starts at a tiny z. A target met even at MIN_NOISE_MULTIPLIER returns that; one
    missed even at MAX_NOISE_MULTIPLIER raises a ValueError naming it.
    """
    check_delta(delta)
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon={target_epsilon!r} is invalid; expected epsilon > 0")

    def within(noise):
        return mechanism.with_noise(noise).epsilon(rounds, delta) <= target_epsilon

    if not within(MAX_NOISE_MULTIPLIER):
        raise ValueError(f"target_epsilon={target_epsilon!r} is invalid; it cannot be reached "
                         f"in {rounds} rounds at delta={delta:g}: even noise_multiplier "
                         f"{MAX_NOISE_MULTIPLIER:g} spends more")
    low, high = 1.0, 1.0
    while not within(high):
        low, high = high, min(2 * high, MAX_NOISE_MULTIPLIER)
    if low == high:
        while within(low):
            if low <= MIN_NOISE_MULTIPLIER:
                return MIN_NOISE_MULTIPLIER
            high, low = low, max(low / 2, MIN_NOISE_MULTIPLIER)
    import dp_accounting
    noise = dp_accounting.calibrate_dp_mechanism(
        mechanism.accountant,
        lambda z: mechanism.with_noise(z).run_event(rounds),
        target_epsilon, delta, dp_accounting.ExplicitBracketInterval(low, high),
        tol=tolerance * low)
    # Brent's root may sit a tolerance below the budget's edge; step up until it is within.
    while not within(noise):
        noise += tolerance * low
    return float(noise)


def rounds_within(mechanism: Mechanism, budget: float, max_rounds: int,
                  delta: float) -> int:
    """The most rounds (<= max_rounds) whose ε at `delta` stays within `budget`; ε grows with the
    rounds, so a bisection finds it."""
    if mechanism.epsilon(max_rounds, delta) <= budget:
        return max_rounds
    low, high = 0, max_rounds  # ε(low) <= budget < ε(high)
    while high - low > 1:
        middle = (low + high) // 2
        if mechanism.epsilon(middle, delta) <= budget:
            low = middle
        else:
            high = middle
    return low

