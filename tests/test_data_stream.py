"""The pre-sampled client stream: cohorts from (seed, round), in-scan and host-fed alike."""

import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.compiled import as_traced, device_block, host_block
from fedjax_lab.core.types import Algorithm, experiment_key, init_key
from fedjax_lab.data import digits
from fedjax_lab.data.federated import ClientData
from fedjax_lab.data.sampling import (cohort_batch, cohort_schedule, sample_cohort,
                                      size_weighted_probabilities)
from fedjax_lab.data.stream import HostCohortStream, pack_clients, pack_partition
from fedjax_lab.models import logistic_regression


def test_uniform_cohorts_are_uniform_subsets_without_replacement():
    key = experiment_key(0)
    pairs = cohort_schedule(key, 20_000, 5, 2)
    assert (pairs[:, 0] < pairs[:, 1]).all()  # sorted and distinct
    counts = np.array([np.sum((pairs[:, 0] == a) & (pairs[:, 1] == b))
                       for a, b in itertools.combinations(range(5), 2)])
    # 10 subsets, 2,000 expected each; binomial std ~42, so 200 is a 4.7-sigma band.
    assert np.abs(counts - 2000).max() < 200, counts
    large = np.asarray(sample_cohort(key, 3, 1_000_000, 100))
    assert len(np.unique(large)) == 100 and large.min() >= 0 and large.max() < 1_000_000
    full = np.asarray(sample_cohort(key, 0, 7, 7))
    np.testing.assert_array_equal(full, np.arange(7))


def _scan_cohorts(key, num_rounds, num_clients, cohort_size, probabilities=None):
    """Cohorts as the in-scan path draws them: a traced round inside a jitted scan."""
    def body(round_index, _):
        ids = sample_cohort(key, round_index, num_clients, cohort_size, probabilities)
        return round_index + 1, ids

    return np.asarray(jax.jit(lambda: jax.lax.scan(body, jnp.int32(0), None,
                                                   length=num_rounds)[1])())


@pytest.mark.parametrize("weighted", [False, True])
def test_schedule_equals_in_scan_sampling(weighted):
    key = experiment_key(4)
    weights = size_weighted_probabilities(np.arange(1, 51)) if weighted else None
    schedule = cohort_schedule(key, 30, 50, 6, probabilities=weights)
    np.testing.assert_array_equal(schedule, _scan_cohorts(key, 30, 50, 6, weights))
    np.testing.assert_array_equal(schedule[10:], cohort_schedule(key, 20, 50, 6, start_round=10,
                                                                 probabilities=weights))
    assert not np.array_equal(schedule, cohort_schedule(experiment_key(5), 30, 50, 6,
                                                        probabilities=weights))


def test_size_weighted_sampling_follows_sizes():
    sizes = np.array([0, 1, 2, 3, 4, 10])
    weights = size_weighted_probabilities(sizes)
    np.testing.assert_allclose(weights, sizes / 20)
    single = cohort_schedule(experiment_key(1), 40_000, 6, 1, probabilities=weights)
    share = np.bincount(single[:, 0], minlength=6) / 40_000
    np.testing.assert_allclose(share, sizes / 20, atol=0.01)
    triples = cohort_schedule(experiment_key(1), 2000, 6, 3, probabilities=weights)
    assert 0 not in triples  # an empty client is never drawn
    assert (np.diff(triples, axis=1) > 0).all()
    with pytest.raises(ValueError, match=r"probabilities has 5 positive weights; a cohort of "
                                         r"cohort_size=6"):
        sample_cohort(experiment_key(0), 0, 6, 6, weights)
    with pytest.raises(ValueError, match=r"probabilities has shape \(5,\); expected \(6,\)"):
        cohort_schedule(experiment_key(0), 3, 6, 2, probabilities=weights[:5])
    with pytest.raises(ValueError, match=r"num_examples has shape"):
        size_weighted_probabilities(np.zeros(4))


class _Recorder(NamedTuple):
    round: jax.Array
    metrics: dict


def _recorder(cohort_size, uses_data):
    """An 'algorithm' that records its cohort: ids, key bits, and a checksum of its data."""
    def init(key):
        del key
        return _Recorder(jnp.int32(0), {"ids": jnp.zeros(cohort_size, jnp.int32),
                                        "keys": jnp.zeros((cohort_size, 2), jnp.uint32),
                                        "data": jnp.float32(0)})

    def round_fn(state, batch):
        data = jnp.sum(batch.x * batch.mask[..., None]) if uses_data else jnp.float32(0)
        return _Recorder(state.round + 1, {"ids": batch.client_ids,
                                           "keys": jax.random.key_data(batch.rng),
                                           "data": data})

    return Algorithm(init, round_fn, lambda state, batch: batch.x)


def test_client_stream_identical_across_algorithms_and_paths_differs_across_seeds():
    dataset = digits(40, partition="dirichlet", alpha=0.3, seed=0)
    population = jax.device_put(dataset.train.pad())

    def in_scan(algorithm, seed):
        run = device_block(as_traced(algorithm).build, 40, 5)
        _, metrics = run(algorithm.init(init_key(experiment_key(seed))), population,
                         experiment_key(seed), {}, 12)
        return jax.tree.map(np.asarray, metrics)

    first = in_scan(_recorder(5, uses_data=False), seed=3)
    second = in_scan(_recorder(5, uses_data=True), seed=3)
    np.testing.assert_array_equal(first["ids"], second["ids"])
    np.testing.assert_array_equal(first["keys"], second["keys"])
    np.testing.assert_array_equal(first["ids"], cohort_schedule(experiment_key(3), 12, 40, 5))
    other_seed = cohort_schedule(experiment_key(4), 12, 40, 5)
    assert (other_seed != first["ids"]).any(axis=1).all()  # every round's cohort differs

    stream = HostCohortStream(dataset.train, experiment_key(3), 5)
    recorder = _recorder(5, uses_data=True)
    run = host_block(as_traced(recorder).build)
    state, recorded = recorder.init(None), []
    for block in stream.blocks(0, 12, block_size=6):
        state, metrics = run(state, block, {})
        recorded.append(jax.tree.map(np.asarray, metrics))
    host = jax.tree.map(lambda *parts: np.concatenate(parts), *recorded)
    for field in ("ids", "keys", "data"):
        np.testing.assert_array_equal(host[field], second[field])


def test_host_stream_batches_equal_in_scan_batches_field_for_field():
    rng = np.random.default_rng(0)
    sizes = [3, 0, 7, 1, 5, 2, 9, 4]
    clients = ClientData(tuple(rng.normal(size=(n, 2, 3)) for n in sizes),
                         tuple(rng.integers(0, 4, n) for n in sizes),
                         tuple(f"c{i}" for i in range(8)))
    key, padded = experiment_key(9), clients.pad(multiple_of=4)
    weights = size_weighted_probabilities(sizes)
    for probabilities in (None, weights):
        stream = HostCohortStream(clients, key, 3, probabilities=probabilities, multiple_of=4,
                                  prefetch=1)
        batches = list(stream.rounds(5, 3))
        assert len(batches) == 3 and stream.padded_length == 12
        for t, batch in zip(range(5, 8), batches):
            ids = sample_cohort(key, t, 8, 3, probabilities)
            expected = cohort_batch(padded, ids, key, t)
            for field in ("x", "y", "mask", "num_examples", "client_ids"):
                got, want = np.asarray(getattr(batch, field)), np.asarray(getattr(expected, field))
                assert got.dtype == want.dtype and got.shape == want.shape, field
                np.testing.assert_array_equal(got, want, err_msg=field)
            np.testing.assert_array_equal(jax.random.key_data(batch.rng),
                                          jax.random.key_data(expected.rng))
    blocks = list(HostCohortStream(clients, key, 3).blocks(0, 7, block_size=3))
    assert [b.x.shape[0] for b in blocks] == [3, 3, 1] and blocks[0].x.shape[1:] == (3, 9, 2, 3)


def test_host_fed_fedavg_equals_in_scan_fedavg():
    dataset = digits(30, seed=1)
    algorithm = fedavg(logistic_regression(dataset.feature_shape, 10), optax.sgd(0.1),
                       num_epochs=1, batch_size=20)
    key = experiment_key(2)
    build = as_traced(algorithm).build
    in_scan, _ = device_block(build, 30, 4)(algorithm.init(init_key(key)),
                                            jax.device_put(dataset.train.pad()), key, {}, 4)
    host = algorithm.init(init_key(key))
    for block in HostCohortStream(dataset.train, key, 4).blocks(0, 4, block_size=2):
        host, _ = host_block(build)(host, block, {})
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 in_scan.params, host.params)


def test_packed_partition_shares_examples_and_prefetch_propagates_errors():
    x, y = np.arange(20.0).reshape(10, 2), np.arange(10) % 3
    packed = pack_partition(x, y, [np.array([4, 1]), np.array([], int), np.array([9, 0, 5])])
    assert packed.x is x and packed.num_examples.tolist() == [2, 0, 3]
    gx, gy, mask, n = packed.gather(np.array([2, 1, 0]), packed.padded_length())
    np.testing.assert_array_equal(gx[0, :, 0], [18, 0, 10])
    np.testing.assert_array_equal(gy[2], [1, 1, 0])
    np.testing.assert_array_equal(mask.sum(1), n)
    assert pack_clients(ClientData((x[:3],), (y[:3],), ("a",))).padded_length(4) == 4
    with pytest.raises(ValueError, match=r"parts index example 12; x and y hold 10"):
        pack_partition(x, y, [np.array([12])])

    stream = HostCohortStream(packed, experiment_key(0), 2)
    calls = []

    def failing_block(start, length):
        calls.append(start)
        if start == 2:
            raise RuntimeError("disk gone at round 2")
        return start

    stream.block = failing_block
    blocks = stream.blocks(0, 6, block_size=1)
    assert next(blocks) == 0 and next(blocks) == 1
    with pytest.raises(RuntimeError, match="disk gone at round 2"):
        next(blocks)
    early = stream.blocks(0, 2, block_size=1)
    assert next(early) == 0
    early.close()  # stops the worker; nothing left running
    with pytest.raises(ValueError, match=r"prefetch=0"):
        HostCohortStream(packed, experiment_key(0), 2, prefetch=0)
