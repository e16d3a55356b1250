"""Aggregation, client execution strategies, stragglers, key streams and client-state scatter."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common import assert_trees_close, float64_params, make_clients, small_model, stack_clients
from fedjax_lab.core import client_execution
from fedjax_lab.core.local_training import running_alone
from fedjax_lab.core import (ClientExecution, client_keys, client_weights, experiment_key,
                             gather_clients, local_train, model_loss, sample_stragglers,
                             scatter_clients, weighted_mean)
from fedjax_lab.data.sampling import sample_cohort
from fedjax_lab.models import get_model


def test_sample_weights_sum_to_one_and_empty_clients_weigh_zero():
    w = client_weights(jnp.array([10, 30, 0, 60]))
    np.testing.assert_allclose(w, [0.1, 0.3, 0.0, 0.6], rtol=1e-6)
    u = client_weights(jnp.array([10, 30, 0, 60]), weighting="uniform")
    np.testing.assert_allclose(u, [1 / 3, 1 / 3, 0.0, 1 / 3], rtol=1e-6)
    p = client_weights(jnp.array([10, 30, 0, 60]), participating=jnp.array([1, 0, 1, 1], bool))
    np.testing.assert_allclose(p, [10 / 70, 0.0, 0.0, 60 / 70], rtol=1e-6)
    np.testing.assert_array_equal(client_weights(jnp.array([5, 5]),
                                                 participating=jnp.zeros(2, bool)), [0, 0])
    with pytest.raises(ValueError, match="weighting 'size' is unknown; allowed: num_examples"):
        client_weights(jnp.array([1]), weighting="size")


def test_weighted_mean_of_identical_models_is_that_model():
    with jax.enable_x64(True):
        params = float64_params(small_model())
        stacked = jax.tree.map(lambda p: jnp.stack([p] * 4), params)
        mean = weighted_mean(stacked, client_weights(jnp.array([3, 1, 7, 2])))
        assert_trees_close(mean, params, rtol=1e-15, atol=1e-15)


STRATEGIES = [ClientExecution("chunked", 2), ClientExecution("chunked", 3),
              ClientExecution("chunked", 2, chunk_strategy="unrolled"),
              ClientExecution("sequential"), ClientExecution("unrolled"), ClientExecution("auto"),
              ClientExecution("auto", memory_budget=1)]


def _training_clients(model, params):
    xs, ys = make_clients([7, 3, 12, 5, 1], dtype=np.float64)
    batch = stack_clients(xs, ys)

    def client_fn(client):
        x, y, mask, rng = client
        return local_train(model_loss(model.apply), optax.sgd(0.2), params, x, y, mask, rng,
                           num_epochs=2, batch_size=3)

    return client_fn, (batch.x, batch.y, batch.mask, batch.rng), batch.num_examples


def _jitted_map(execution, client_fn):
    return jax.jit(lambda per_client: execution.map(client_fn, per_client))


@functools.cache
def _vmapped_float64_clients():
    """The float64 training clients' results under vmap: every strategy's reference."""
    with jax.enable_x64(True):
        model = small_model()
        client_fn, per_client, _ = _training_clients(model, float64_params(model))
        return _jitted_map(ClientExecution("vmap"), client_fn)(per_client)


@pytest.mark.parametrize("execution", STRATEGIES)
def test_every_strategy_equals_vmap(execution):
    # Jitted: eager execution is covered by the map-reduce test below.
    with jax.enable_x64(True):
        model = small_model()
        client_fn, per_client, _ = _training_clients(model, float64_params(model))
        assert_trees_close(_jitted_map(execution, client_fn)(per_client),
                           _vmapped_float64_clients())


@pytest.mark.parametrize("execution, modes", [
    (ClientExecution("vmap"), [False]), (ClientExecution("chunked", 2), [False]),
    (ClientExecution("unrolled"), [True]), (ClientExecution("sequential"), [True]),
    (ClientExecution("chunked", 2, chunk_strategy="unrolled"), [True]),
    (ClientExecution("auto"), [False]),
    # "auto" decides on the vmapped trace, then runs one client at a time from a trace alone.
    (ClientExecution("auto", memory_budget=1), [False, True])])
def test_the_client_program_runs_its_python_once_per_mode_whatever_the_cohort(execution, modes):
    model = small_model()
    client_fn, per_client, _ = _training_clients(model, model.init(jax.random.key(0)))
    calls = []

    def counted(client):
        calls.append(running_alone())
        return client_fn(client)

    jax.jit(lambda clients: execution.map(counted, clients)).trace(per_client)
    assert calls == modes


@pytest.mark.parametrize("execution", STRATEGIES + [ClientExecution("vmap")])
@pytest.mark.parametrize("jit", [False, True])
def test_map_reduce_is_the_weighted_mean_of_map(execution, jit):
    with jax.enable_x64(True):
        model = small_model()
        params = float64_params(model)
        client_fn, per_client, num_examples = _training_clients(model, params)
        weights = client_weights(num_examples)
        pair_fn = lambda client: (client_fn(client).params, client_fn(client).num_steps)
        reduce = lambda p, w: execution.map_reduce(pair_fn, p, w)
        total, steps = (jax.jit(reduce) if jit else reduce)(per_client, weights)
        stacked = _vmapped_float64_clients()
        assert_trees_close(total, weighted_mean(stacked.params, weights), rtol=1e-13, atol=1e-13)
        np.testing.assert_array_equal(steps, stacked.num_steps)


def test_auto_picks_by_backend_program_and_memory():
    model = small_model()
    client_fn, per_client, _ = _training_clients(model, model.init(jax.random.key(0)))
    assert ClientExecution().resolve(client_fn, per_client).strategy == "vmap"
    tight = ClientExecution(memory_budget=1).resolve(client_fn, per_client)
    assert (tight.strategy, tight.chunk_size) == ("chunked", 1)
    # Room for 4 of the 5 clients: two chunks of 3, not 4 and a last one repeating 3 clients.
    one = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype), per_client)
    outputs = jax.eval_shape(client_fn, one)
    client_bytes = client_execution.WORKING_SET_FACTOR * (client_execution.tree_bytes(one)
                                                          + client_execution.tree_bytes(outputs))
    four = ClientExecution(memory_budget=4 * client_bytes).resolve(client_fn, per_client)
    assert (four.strategy, four.chunk_size) == ("chunked", 3)

    def conv_fn(client):
        image = client[0][:4, :4].reshape(1, 4, 4, 1)
        return jax.lax.conv_general_dilated(image, jnp.ones((1, 1, 1, 1)), (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    conv = ClientExecution().resolve(conv_fn, per_client)
    assert conv.strategy == ("unrolled" if jax.default_backend() == "cpu" else "vmap")

    lstm = get_model("char_lstm", (5,), 5, hidden=4, layers=1)
    text_fn = lambda client: lstm.apply(lstm.init(jax.random.key(0)), client[0][:1])
    recurrent = ClientExecution().resolve(text_fn, per_client)
    assert recurrent.strategy == ("sequential" if jax.default_backend() == "cpu" else "vmap")
    # A loop without the model's mark is not a recurrence: local training's own step loop.
    assert ClientExecution().resolve(client_fn, per_client).strategy == "vmap"

    # A client whose update outgrows the bound runs alone on CPU.
    def large_update_fn(client):
        return jnp.zeros(client_execution.CPU_SEQUENTIAL_BYTES // 4 + 1) + jnp.sum(client[0])

    large = ClientExecution().resolve(large_update_fn, per_client)
    assert large.strategy == ("sequential" if jax.default_backend() == "cpu" else "vmap")


@pytest.mark.parametrize("strategy, skips", [("sequential", True), ("unrolled", True),
                                              ("vmap", False)])
def test_a_client_run_alone_skips_its_inactive_steps(strategy, skips):
    """Local training's inactive steps (a short client's padding) are a `cond`, which a client
    run unbatched keeps (the step is skipped) and vmap turns into a select (it is computed)."""
    model = small_model()
    client_fn, per_client, _ = _training_clients(model, model.init(jax.random.key(0)))
    program = jax.make_jaxpr(lambda p: ClientExecution(strategy).map(client_fn, p))(per_client)
    is_cond = lambda equation: equation.primitive.name == "cond"
    assert client_execution._jaxpr_has(program.jaxpr, is_cond) == skips


def test_execution_rejects_unknown_strategy_and_bad_chunks():
    with pytest.raises(ValueError, match="strategy 'pmap' is unknown; allowed: auto, vmap"):
        ClientExecution("pmap")
    with pytest.raises(ValueError, match="chunk_size=0 is invalid"):
        ClientExecution("chunked", 0)
    with pytest.raises(ValueError, match="chunk_strategy 'scan' is unknown"):
        ClientExecution("chunked", 2, chunk_strategy="scan")
    with pytest.raises(ValueError, match="memory_budget=0 is invalid"):
        ClientExecution(memory_budget=0)


def test_stragglers_count_epochs_and_determinism():
    key = experiment_key(0)
    for round_index in range(20):
        rngs = client_keys(key, round_index, jnp.arange(10))
        s = sample_stragglers(rngs, num_epochs=20, fraction=0.9)
        assert int(s.is_straggler.sum()) == 9
        epochs = np.asarray(s.epochs)
        assert np.all((epochs[s.is_straggler] >= 1) & (epochs[s.is_straggler] <= 19))
        assert np.all(epochs[~s.is_straggler] == 20)
        again = sample_stragglers(rngs, num_epochs=20, fraction=0.9)
        np.testing.assert_array_equal(s.epochs, again.epochs)
    assert int(sample_stragglers(rngs, num_epochs=5, fraction=0.25).is_straggler.sum()) == 2


@pytest.mark.parametrize("num_clients, fraction, active", [
    (3, 0.5, 2), (5, 0.5, 2), (10, 0.9, 1), (10, 0.25, 8), (7, 0.5, 4), (4, 0.0, 4), (4, 1.0, 0)])
def test_straggler_count_keeps_the_references_active_clients(num_clients, fraction, active):
    """FedProx's trainers keep round(C (1 - s)) clients active with Python 3's round (halves to
    even), so C = 3 and C = 5 at s = 0.5 both keep 2, where round(C s) stragglers would keep
    1 and 3."""
    assert active == round(num_clients * (1 - fraction))
    rngs = client_keys(experiment_key(0), 0, jnp.arange(num_clients))
    s = sample_stragglers(rngs, num_epochs=3, fraction=fraction)
    assert num_clients - int(s.is_straggler.sum()) == active


def test_straggler_set_and_epochs_are_spread_over_clients_and_range():
    key = experiment_key(1)
    hits = np.zeros(10)
    seen_epochs = set()
    for round_index in range(400):
        s = sample_stragglers(client_keys(key, round_index, jnp.arange(10)), num_epochs=4,
                              fraction=0.5)
        hits += np.asarray(s.is_straggler)
        seen_epochs |= set(np.asarray(s.epochs)[np.asarray(s.is_straggler)].tolist())
    np.testing.assert_allclose(hits / 400, 0.5, atol=0.1)
    assert seen_epochs == {1, 2, 3}


def test_straggler_arguments_are_validated():
    rngs = client_keys(experiment_key(0), 0, jnp.arange(4))
    with pytest.raises(ValueError, match="num_epochs >= 2"):
        sample_stragglers(rngs, num_epochs=1, fraction=0.5)
    with pytest.raises(ValueError, match="straggler fraction 1.5 is invalid"):
        sample_stragglers(rngs, num_epochs=3, fraction=1.5)


def test_scatter_leaves_unsampled_and_padded_clients_untouched():
    population = {"v": jnp.arange(12.0).reshape(6, 2), "count": jnp.zeros(6, jnp.int32)}
    ids = jnp.array([4, 1, 5])
    cohort = gather_clients(population, ids)
    np.testing.assert_array_equal(cohort["v"], [[8, 9], [2, 3], [10, 11]])
    new = {"v": -jnp.ones((3, 2)), "count": jnp.array([7, 8, 9], jnp.int32)}
    updated = jax.jit(scatter_clients)(population, ids, new, jnp.array([True, True, False]))
    np.testing.assert_array_equal(updated["count"], [0, 8, 0, 0, 7, 0])
    untouched = np.array([0, 2, 3, 5])
    np.testing.assert_array_equal(updated["v"][untouched], population["v"][untouched])
    np.testing.assert_array_equal(updated["v"][np.array([1, 4])], -np.ones((2, 2)))


def test_cohorts_are_pure_functions_of_seed_and_round():
    key = experiment_key(7)
    a = np.asarray(sample_cohort(key, 3, 100, 10))
    assert len(set(a.tolist())) == 10 and a.min() >= 0 and a.max() < 100
    np.testing.assert_array_equal(a, jax.jit(sample_cohort, static_argnums=(2, 3))(key, 3, 100, 10))
    assert not np.array_equal(a, sample_cohort(key, 4, 100, 10))
    assert not np.array_equal(a, sample_cohort(experiment_key(8), 3, 100, 10))
    with pytest.raises(ValueError, match=r"cohort_size=101 is invalid; expected an integer in 1"):
        sample_cohort(key, 0, 100, 101)


def test_client_keys_do_not_depend_on_cohort_composition():
    key = experiment_key(0)
    a = client_keys(key, 5, jnp.array([3, 9]))
    b = client_keys(key, 5, jnp.array([9, 1, 3]))
    np.testing.assert_array_equal(jax.random.key_data(a[0]), jax.random.key_data(b[2]))
    np.testing.assert_array_equal(jax.random.key_data(a[1]), jax.random.key_data(b[0]))
