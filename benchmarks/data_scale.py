"""Partitions and samples a 1,000,000-client synthetic population: time and peak host memory.

    python -m benchmarks.data_scale [--clients 1000000] [--examples 10000000] [--output F.json]

Stages, each timed in wall seconds (`time.perf_counter`; JAX work waited for with
`block_until_ready`) and in CPU seconds of the process (`time.process_time`, all threads), which
is the fairer figure on a shared machine:
  generate    x ~ N(0, I) float32 [n, d], y = argmax(x W) over 10 classes (W ~ N(0, 1))
  partitions  iid; Dirichlet(0.1) label skew with >= 2 examples per client; label-sorted shards
              (2 per client); 2 classes per client; lognormal quantity skew (sigma = 1)
  pack        the Dirichlet partition as `PackedClients` (offsets and an index; x not copied)
  schedule    `cohort_schedule` for --rounds rounds of --cohort clients, uniform and weighted by
              size (the pre-sampled client stream of the in-scan path)
  stream      `HostCohortStream.blocks`: those rounds gathered, padded to the population's
              n_max, keyed and put on the device, prefetched, consumed with block_until_ready
Memory: the process's peak resident set (`ru_maxrss`) at the end, and the resident set after
each stage (/proc/self/status VmRSS). Targets (issue 4): under 4 GiB, partition + sample under a
minute. The results JSON is written atomically.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import jax
import numpy as np

from fedjax_lab.core.types import experiment_key
from fedjax_lab.data.partition import dirichlet_partition, iid_partition, quantity_skew_partition
from fedjax_lab.data.pathological import class_partition, shard_partition
from fedjax_lab.data.sampling import cohort_schedule, size_weighted_probabilities
from fedjax_lab.data.stream import HostCohortStream, pack_partition
from fedjax_lab.experiment import write_json_atomic

GIB = 2 ** 30


def _rss_gib() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024 / GIB


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def synthetic_population(num_examples: int, dim: int, num_classes: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_examples, dim), dtype=np.float32)
    weights = rng.standard_normal((dim, num_classes)).astype(np.float32)
    y = np.empty(num_examples, np.int32)
    for start in range(0, num_examples, 1_000_000):  # bounded temporaries
        y[start:start + 1_000_000] = np.argmax(x[start:start + 1_000_000] @ weights, axis=1)
    return x, y


def run(num_clients: int, num_examples: int, dim: int, rounds: int, cohort: int,
        block: int, seed: int) -> dict:
    timings, cpu, rss = {}, {}, {}

    def stage(name, fn):
        start, start_cpu = time.perf_counter(), time.process_time()
        value = fn()
        timings[name] = time.perf_counter() - start
        cpu[name] = time.process_time() - start_cpu
        rss[name] = _rss_gib()
        print(f"{name:<24} {timings[name]:8.2f} s wall {cpu[name]:8.2f} s cpu   "
              f"rss {rss[name]:.2f} GiB", flush=True)
        return value

    x, y = stage("generate", lambda: synthetic_population(num_examples, dim, 10, seed))
    stage("partition_iid", lambda: iid_partition(num_examples, num_clients, seed))
    parts = stage("partition_dirichlet_0.1",
                  lambda: dirichlet_partition(y, num_clients, 0.1, seed, 2))
    stage("partition_shards_2", lambda: shard_partition(y, num_clients, seed, 2))
    stage("partition_classes_2", lambda: class_partition(y, num_clients, 2, seed))
    stage("partition_quantity_1.0", lambda: quantity_skew_partition(num_examples, num_clients,
                                                                     seed, 1.0))
    packed = stage("pack", lambda: pack_partition(x, y, parts))
    del parts
    key = experiment_key(seed)
    weights = size_weighted_probabilities(packed.num_examples)
    uniform = stage("schedule_uniform",
                    lambda: cohort_schedule(key, rounds, num_clients, cohort))
    stage("schedule_size_weighted",
          lambda: cohort_schedule(key, rounds, num_clients, cohort, probabilities=weights))
    stream = HostCohortStream(packed, key, cohort)

    def consume():
        first_ids = None
        for batch in stream.blocks(0, rounds, block):
            jax.block_until_ready(batch)
            first_ids = np.asarray(batch.client_ids) if first_ids is None else first_ids
        return first_ids

    first_ids = stage("stream_host", consume)
    assert np.array_equal(first_ids, uniform[:block]), "host stream differs from the schedule"
    core = timings["partition_dirichlet_0.1"] + timings["schedule_uniform"]
    result = {
        "clients": num_clients, "examples": num_examples, "features": dim, "rounds": rounds,
        "cohort_size": cohort, "block_rounds": block, "seed": seed,
        "padded_length": stream.padded_length, "seconds": timings, "cpu_seconds": cpu,
        "rss_gib": rss,
        "peak_rss_gib": _peak_gib(), "dirichlet_plus_uniform_schedule_seconds": core,
        "total_seconds": sum(timings.values()),
        "versions": {"python": platform.python_version(), "numpy": np.__version__,
                     "jax": jax.__version__},
    }
    print(f"{'peak rss':<24} {result['peak_rss_gib']:8.2f} GiB")
    print(f"{'partition+sample':<24} {core:8.2f} s (Dirichlet 0.1 + uniform schedule)")
    print(f"{'total':<24} {result['total_seconds']:8.2f} s; padded length "
          f"{stream.padded_length}")
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1_000_000)
    parser.add_argument("--examples", type=int, default=10_000_000)
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--cohort", type=int, default=100)
    parser.add_argument("--block", type=int, default=10, help="rounds per streamed block")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="results JSON path")
    args = parser.parse_args(argv)
    result = run(args.clients, args.examples, args.features, args.rounds, args.cohort,
                 args.block, args.seed)
    if args.output:
        write_json_atomic(args.output, result)
    else:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
