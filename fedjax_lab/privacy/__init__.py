"""User-level differential privacy: DP-FedAvg's private aggregation, its accounting, its options.

    aggregation   clip, sum, noise, fixed denominator; adaptive clipping (pure, jit-able)
    accounting    dp_accounting events for Poisson and fixed-size cohorts, ε at δ, σ for a target ε
    settings      `DPOptions` (the `dp` option group) and `plan_run` (a run's accounting)
"""

from fedjax_lab.privacy import accounting
from fedjax_lab.privacy.aggregation import (AdaptiveClipping, DPAggregator, DPAggregatorState,
                                            PrivateServerState, clip_by_global_norm,
                                            dp_aggregator, gaussian_noise, initial_metrics)
from fedjax_lab.privacy.settings import DPOptions, PrivateRun, plan_run, poisson_cohorts, resolve

__all__ = [
    "AdaptiveClipping", "DPAggregator", "DPAggregatorState", "DPOptions", "PrivateRun",
    "PrivateServerState", "accounting", "clip_by_global_norm", "dp_aggregator", "gaussian_noise",
    "initial_metrics", "plan_run", "poisson_cohorts", "resolve",
]
