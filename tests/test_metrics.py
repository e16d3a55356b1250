"""`core.metrics.initial_metrics`: an init's empty-cohort metrics as one program, equal to the
eager call and compiled once for every build of the same shapes."""

import chex
import jax
import jax.numpy as jnp

from common import small_model
from fedjax_lab import compiled
from fedjax_lab.algorithms import median_mean, scaffold
from fedjax_lab.core import experiment_key, init_key
from fedjax_lab.core.metrics import initial_metrics

MODEL = small_model()


def test_initial_metrics_equal_the_eager_call_with_static_options():
    params = MODEL.init(init_key(experiment_key(0)))
    for rule in ("sign", "median"):
        arguments = dict(rule=rule, learning_rate=0.1, step=params, weights=jnp.ones(3) / 3,
                         losses=jnp.array([0.5, 1.0, 2.0]), b=jnp.float32(0.2))
        # Non-empty arguments, so the check is not of zeros only.
        jitted = initial_metrics(median_mean._round_metrics, **arguments,
                                 static_argnames=("rule",))
        chex.assert_trees_all_equal(jitted, median_mean._round_metrics(**arguments))
    assert jitted["bytes_up"] > 0


def test_a_second_build_seed_and_rate_compile_nothing_in_init():
    """Each seed or rate of an experiment builds the algorithm afresh: its initial metrics must
    come from the first build's program, which a closure of the build would not."""
    first = scaffold.scaffold(MODEL, 0.1, num_clients=5).init(init_key(experiment_key(0)))
    before = compiled.compile_seconds()
    second = scaffold.scaffold(MODEL, 0.3, num_clients=5).init(init_key(experiment_key(1)))
    assert compiled.compile_seconds() == before
    chex.assert_trees_all_equal(first.metrics, second.metrics)
    assert jax.tree.structure(first) == jax.tree.structure(second)
