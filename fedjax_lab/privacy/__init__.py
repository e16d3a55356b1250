"""User-level differential privacy: DP-FedAvg's and DP-FTRL's private aggregation, their
accounting, their options.

    aggregation   clip, sum, noise, fixed denominator; adaptive clipping; DP-FTRL's tree noise
    accounting    dp_accounting events for Poisson and fixed-size cohorts and for the tree's
                  epochs, ε at δ, σ for a target ε
    settings      `DPOptions` (the `dp` option group) and `plan_run` (a run's accounting)
"""

from fedjax_lab.privacy import accounting
from fedjax_lab.privacy.aggregation import (AdaptiveClipping, DPAggregator, DPAggregatorState,
                                            PrivateServerState, TreeAggregation,
                                            TreeAggregatorState, clip_by_global_norm,
                                            dp_aggregator, gaussian_noise, initial_metrics,
                                            tree_noise)
from fedjax_lab.privacy.settings import DPOptions, PrivateRun, plan_run, poisson_cohorts, resolve

__all__ = [
    "AdaptiveClipping", "DPAggregator", "DPAggregatorState", "DPOptions", "PrivateRun",
    "PrivateServerState", "TreeAggregation", "TreeAggregatorState", "accounting",
    "clip_by_global_norm", "dp_aggregator", "gaussian_noise", "initial_metrics", "plan_run",
    "poisson_cohorts", "resolve", "tree_noise",
]
