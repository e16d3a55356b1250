"""Clients sharded across devices (core/sharding.py, the "sharded" strategy, distributed.py).

The eight-device checks run in a subprocess with `--xla_force_host_platform_device_count=8`, so
every other test keeps one device: FedAvg, Ditto (stateful) and FedMeta-MAML (second order) give
the same state sharded over 8 devices as on one device, to float32 rounding (the cross-device
psum adds the shards' sums in another order; measured differences are about 1e-7, the bound is
1e-5), with a cohort of 10 that pads to 16; Ditto's population state stays sharded along
`clients`; the padded slots write no client state; per-host feeding assembles the same batches.
The two-process job over loopback (jax.distributed with the CPU backend's gloo collectives, four
simulated devices per process) is marked slow: `pytest -m slow tests/test_sharding.py`.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common import assert_trees_equal, make_clients, small_model, stack_clients
from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.core import ClientExecution, experiment_key, init_key
from fedjax_lab.core import sharding
from fedjax_lab.data import digits
from fedjax_lab.data.stream import HostCohortStream
from fedjax_lab.distributed import ProcessCohortStream, initialize, process_slice

TOLERANCE = 1e-5
COHORT = 10  # not a multiple of 8: the sharded strategy pads it to 16


def _max_difference(a, b) -> float:
    def difference(u, v):
        if jax.dtypes.issubdtype(u.dtype, jax.dtypes.prng_key):
            u, v = jax.random.key_data(u), jax.random.key_data(v)
        return float(np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64)),
                            initial=0.0))
    return max(jax.tree.leaves(jax.tree.map(difference, a, b)), default=0.0)


def _eight_device_checks() -> dict:
    """Runs in the subprocess; returns the measured differences and shardings."""
    from fedjax_lab.algorithms.ditto import ditto
    from fedjax_lab.algorithms.fedmeta import fedmeta
    from fedjax_lab.compiled import as_traced, host_block
    from fedjax_lab.experiment import run_experiment
    from fedjax_lab.models import logistic_regression

    mesh = sharding.client_mesh()
    model = small_model()
    xs, ys = make_clients([5, 9, 3, 12, 7, 8, 4, 10, 6, 11], seed=1)
    batch = stack_clients(xs, ys, 12, client_ids=[0, 2, 4, 6, 8, 10, 12, 14, 1, 3])
    builders = {
        "fedavg": lambda e: fedavg(model, optax.sgd(0.1), batch_size=4,
                                   execution=e),
        "fedmeta_maml": lambda e: fedmeta(model, optax.adam(0.01), variant="maml",
                                          execution=e),
    }
    out = {"devices": jax.device_count()}
    for name, build in builders.items():
        states = []
        for execution in (ClientExecution("vmap"), ClientExecution("sharded", mesh=mesh)):
            algorithm = build(execution)
            state, round_fn = algorithm.init(jax.random.key(0)), jax.jit(algorithm.round)
            for _ in range(2):
                state = round_fn(state, batch)
            states.append(state)
            if name == "fedavg" and execution.strategy == "vmap":
                states_of_fedavg = round_fn(algorithm.init(jax.random.key(0)), batch)
        out[name] = _max_difference(*states)
    # A (clients, model) mesh: clients along the first axis, the model axis left to XLA.
    algorithm = builders["fedavg"](ClientExecution(
        "sharded", mesh=sharding.client_mesh(model_axis_size=2)))
    out["fedavg_model_axis"] = _max_difference(
        states_of_fedavg, jax.jit(algorithm.round)(algorithm.init(jax.random.key(0)), batch))
    # "auto" nested inside a sharded client program runs locally instead of sharding again.
    nested = jax.jit(lambda x: ClientExecution().map(
        lambda rows: ClientExecution().map(lambda row: jnp.sum(2.0 * row), rows), x))
    rows = jnp.arange(48.0).reshape(8, 3, 2)
    out["nested_auto"] = _max_difference(nested(rows), jnp.sum(2.0 * rows, axis=2))

    dataset = digits(16, seed=0)
    logistic = logistic_regression(dataset.feature_shape, dataset.num_classes)
    build_ditto = lambda execution: ditto(logistic, optax.sgd(0.05), num_clients=16, lam=0.5,
                                          batch_size=8, execution=execution)
    # One device: the host-fed scan (the same cohorts and keys as run_experiment's in-scan path).
    stream = HostCohortStream(dataset.train, experiment_key(0), COHORT)
    reference = build_ditto(ClientExecution("vmap"))
    initial = reference.init(init_key(experiment_key(0)))
    one_device, _ = host_block(as_traced(reference).build)(jax.tree.map(jnp.copy, initial),
                                                           stream.block(0, 2), {})
    # Eight devices through run_experiment, where "auto" picks "sharded".
    result = run_experiment(build_ditto(ClientExecution()), dataset, num_rounds=2,
                            cohort_size=COHORT, eval_every=2, progress=False, mesh=mesh)
    out["ditto"] = _max_difference(one_device, result.state)
    leaves = jax.tree.leaves(result.state.client_states)
    out["ditto_specs"] = sorted({str(tuple(leaf.sharding.spec)) for leaf in leaves})
    out["ditto_shard_rows"] = sorted({s.data.shape[0] for leaf in leaves
                                      for s in leaf.addressable_shards})

    # Internal padding (10 -> 16) has weight 0 and writes no client state.
    sampled = set(np.asarray(stream.block(0, 2).client_ids).ravel().tolist())
    untouched = np.array([i for i in range(16) if i not in sampled])
    out["num_unsampled"] = len(untouched)
    out["unsampled_changed"] = _max_difference(
        jax.tree.map(lambda leaf: leaf[untouched], initial.client_states),
        jax.tree.map(lambda leaf: np.asarray(leaf)[untouched], result.state.client_states))

    # Host-fed blocks as global arrays: a cohort of 8 is sharded (one row per device), a cohort
    # of 10 is fed whole (replicated); both hold exactly the host stream's batches.
    for cohort in (8, COHORT):
        host = HostCohortStream(dataset.train, experiment_key(0), cohort)
        block = ProcessCohortStream(host, mesh).block(0, 2)
        expected = host.block(0, 2)
        out[f"feed_{cohort}_difference"] = _max_difference(expected, block)
        out[f"feed_{cohort}_spec"] = str(tuple(block.x.sharding.spec))
    return out


def _with_devices(count: int) -> str:
    """The suite's XLA flags (conftest.py) with `count` host devices."""
    return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"


@pytest.fixture(scope="module")
def eight_devices():
    env = dict(os.environ, XLA_FLAGS=_with_devices(8), JAX_PLATFORMS="cpu")
    here = os.path.dirname(os.path.abspath(__file__))
    completed = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=here,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_eight_devices_visible(eight_devices):
    assert eight_devices["devices"] == 8


@pytest.mark.parametrize("name", ["fedavg", "fedmeta_maml", "ditto"])
def test_sharded_equals_one_device(eight_devices, name):
    assert eight_devices[name] <= TOLERANCE


def test_model_axis_and_nested_auto(eight_devices):
    assert eight_devices["fedavg_model_axis"] <= TOLERANCE
    assert eight_devices["nested_auto"] == 0.0


def test_client_states_stay_sharded(eight_devices):
    assert eight_devices["ditto_specs"] == ["('clients',)"]
    assert eight_devices["ditto_shard_rows"] == [2]  # 16 clients over 8 devices


def test_padded_cohort_writes_no_state(eight_devices):
    assert eight_devices["num_unsampled"] > 0 and eight_devices["unsampled_changed"] == 0.0


def test_per_host_feeding_holds_the_host_streams_batches(eight_devices):
    assert eight_devices["feed_8_spec"] == "(None, 'clients')"
    assert eight_devices["feed_10_spec"] == "()"
    assert eight_devices["feed_8_difference"] == 0.0
    assert eight_devices["feed_10_difference"] == 0.0


def test_pad_rows_repeats_the_last_client():
    tree = {"a": jnp.arange(6).reshape(3, 2), "b": jnp.arange(3)}
    padded = sharding.pad_rows(tree, 5)
    np.testing.assert_array_equal(padded["a"], [[0, 1], [2, 3], [4, 5], [4, 5], [4, 5]])
    np.testing.assert_array_equal(padded["b"], [0, 1, 2, 2, 2])
    assert sharding.padded_size(10, 8) == 16 and sharding.padded_size(16, 8) == 16


@pytest.mark.parametrize("jitted", [False, True])
def test_sharded_on_one_device_is_vmap_bit_for_bit(jitted):
    model = small_model()
    xs, ys = make_clients([4, 7, 2], seed=3)
    batch = stack_clients(xs, ys)
    states = []
    for execution in (ClientExecution("vmap"),
                      ClientExecution("sharded", mesh=sharding.client_mesh(jax.devices()[:1]))):
        algorithm = fedavg(model, optax.sgd(0.1), batch_size=2, execution=execution)
        round_fn = jax.jit(algorithm.round) if jitted else algorithm.round
        states.append(round_fn(algorithm.init(jax.random.key(0)), batch))
    assert_trees_equal(*states)


def test_auto_stays_on_one_device_with_one_device():
    one = {"x": jnp.zeros((4, 3))}
    assert ClientExecution().resolve(lambda c: c["x"].sum(), one).strategy == "vmap"


def test_state_shardings_shard_only_divisible_client_states():
    from fedjax_lab.algorithms.ditto import DittoClientState, DittoState
    mesh = sharding.client_mesh()
    state = DittoState(jnp.zeros(3), (), jnp.zeros((), jnp.int32), {},
                       DittoClientState(jnp.zeros((4, 3)), jnp.zeros(4)))
    shardings = sharding.state_shardings(state, mesh)
    assert shardings.client_states.lam.spec == jax.sharding.PartitionSpec("clients")
    assert shardings.params.spec == jax.sharding.PartitionSpec()
    mesh_of_two = jax.sharding.Mesh(np.array(jax.devices() * 2, dtype=object), ("clients",))
    assert sharding.client_sharding(mesh_of_two, (3,)).spec == jax.sharding.PartitionSpec()


def test_process_stream_on_one_process_matches_the_host_stream():
    dataset = digits(12, seed=0)
    stream = HostCohortStream(dataset.train, experiment_key(2), 5)
    mesh = sharding.client_mesh()
    assert process_slice(5, mesh) == (0, 5)
    expected, got = stream.block(3, 2), ProcessCohortStream(stream, mesh).block(3, 2)
    assert_trees_equal(expected._replace(rng=jax.random.key_data(expected.rng)),
                       got._replace(rng=jax.random.key_data(got.rng)))


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="shard_strategy 'sharded'"):
        ClientExecution("sharded", shard_strategy="sharded")
    with pytest.raises(ValueError, match="chunk_size=None"):
        ClientExecution("sharded", shard_strategy="chunked")
    with pytest.raises(ValueError, match="no 'clients' axis"):
        ClientExecution("sharded", mesh=jax.sharding.Mesh(np.array(jax.devices()), ("x",)))
    with pytest.raises(ValueError, match="model_axis_size=3"):
        sharding.client_mesh(model_axis_size=3)
    with pytest.raises(ValueError, match="FEDJAX_PROCESS_ID"):
        initialize("localhost:1234", num_processes=2)


def test_initialize_without_settings_runs_locally(monkeypatch):
    for name in ("FEDJAX_COORDINATOR", "FEDJAX_NUM_PROCESSES", "FEDJAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert initialize() is False


def _multihost_run(feed: str) -> dict:
    """Runs in each process of the two-process job (and in the one-process reference)."""
    from fedjax_lab.algorithms.ditto import ditto
    from fedjax_lab.experiment import run_experiment
    from fedjax_lab.models import logistic_regression

    dataset = digits(16, seed=0)
    model = logistic_regression(dataset.feature_shape, dataset.num_classes)
    algorithm = ditto(model, optax.sgd(0.05), num_clients=16, lam=0.5, batch_size=8)
    result = run_experiment(algorithm, dataset, num_rounds=2, cohort_size=8, eval_every=2,
                            progress=False, population_on_device=feed == "device")
    return {"processes": jax.process_count(), "devices": jax.device_count(),
            "params": [np.asarray(leaf).tolist() for leaf in jax.tree.leaves(result.state.params)],
            "spec": str(tuple(result.state.client_states.lam.sharding.spec)),
            "train_loss": result.history[-1]["train_loss"]}


def _launch(feed: str, processes: int) -> list[dict]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=_with_devices(8 // processes))
    if processes > 1:
        env.update(FEDJAX_COORDINATOR=f"127.0.0.1:{port}", FEDJAX_NUM_PROCESSES=str(processes))
    jobs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "multihost", feed],
                             env=dict(env, FEDJAX_PROCESS_ID=str(i)) if processes > 1 else env,
                             cwd=here, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(processes)]
    outputs = [job.communicate(timeout=600) for job in jobs]
    for job, (_, stderr) in zip(jobs, outputs):
        assert job.returncode == 0, stderr[-3000:]
    return [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]


@pytest.mark.slow
@pytest.mark.parametrize("feed", ["device", "host"])
def test_two_processes_over_loopback_equal_one_process(feed):
    reference, = _launch(feed, 1)
    first, second = _launch(feed, 2)
    assert first["processes"] == second["processes"] == 2 and first["devices"] == 8
    assert first["params"] == second["params"]  # every host holds the same global model
    assert first["spec"] == "('clients',)"
    for got, expected in zip(first["params"], reference["params"]):
        np.testing.assert_allclose(got, expected, atol=TOLERANCE)
    assert abs(first["train_loss"] - reference["train_loss"]) <= TOLERANCE


if __name__ == "__main__":
    if sys.argv[1:2] == ["multihost"]:
        from fedjax_lab.distributed import initialize as start
        start()
        print(json.dumps(_multihost_run(sys.argv[2])))
    else:
        print(json.dumps(_eight_device_checks()))
