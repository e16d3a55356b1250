"""Rounds per second of FedAvg with its clients sharded over 1, 2, 4 and 8 devices.

Each device count is a mesh over the first n of the visible devices; without accelerators the
script re-runs itself with `--xla_force_host_platform_device_count=8`, so the "devices" are
simulated CPU devices sharing the machine's cores (on 2 cores the numbers show the sharding's
overhead, not a speed-up). Two implementations of the "sharded" strategy are timed:

- shard_map: the library's (`ClientExecution("sharded")`): `shard_map` over the `clients` axis,
  a single-device strategy per shard, one psum for the weighted sum;
- gspmd: the alternative it was chosen against: `vmap` over the padded cohort with sharding
  constraints along `clients`, leaving the partitioning (and the reduction) to XLA's GSPMD.

A plain single-device `vmap` round is the baseline. Steady-state seconds per round are the median
of `--repeats` jitted rounds after a warm-up.

    python -m benchmarks.sharding [--repeats 10] [--json FILE]
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.core import ClientBatch, ClientExecution, client_keys, experiment_key, sharding
from fedjax_lab.models import logistic_regression, mlp

DEVICE_COUNTS = (1, 2, 4, 8)
# (name, model, clients, examples per client); batch 10 for two epochs: 20 local steps.
WORKLOADS = (("logreg-64", lambda: logistic_regression((60,), 10), 64, 100),
             ("mlp-32", lambda: mlp((64,), 10, hidden=(256, 256)), 32, 100))


class GspmdExecution(ClientExecution):
    """vmap with the cohort constrained along `clients`: XLA partitions it and the reduction."""

    def map_reduce(self, client_fn, per_client, weights):
        mesh = self.mesh
        num_clients = jax.tree.leaves(per_client)[0].shape[0]
        size = sharding.padded_size(num_clients, sharding.num_shards(mesh))
        along = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.CLIENTS))
        padded = jax.lax.with_sharding_constraint(sharding.pad_rows(per_client, size), along)
        summands, others = jax.vmap(client_fn)(padded)
        padded_weights = jax.lax.with_sharding_constraint(
            jnp.pad(weights, (0, size - num_clients)), along)
        total = jax.tree.map(lambda leaf: jnp.tensordot(padded_weights.astype(leaf.dtype), leaf,
                                                        axes=1), summands)
        return total, jax.tree.map(lambda leaf: leaf[:num_clients], others)


def client_batch(model, clients: int, examples: int, seed: int = 0) -> ClientBatch:
    rng = np.random.default_rng(seed)
    ids = jnp.arange(clients, dtype=jnp.int32)
    return ClientBatch(
        x=jnp.asarray(rng.normal(size=(clients, examples) + model.feature_shape), jnp.float32),
        y=jnp.asarray(rng.integers(0, 10, size=(clients, examples)), jnp.int32),
        mask=jnp.ones((clients, examples), bool),
        num_examples=jnp.full((clients,), examples, jnp.int32), client_ids=ids,
        rng=client_keys(experiment_key(seed), 0, ids))


def seconds_per_round(model, execution, batch, repeats: int) -> tuple[float, float]:
    """(compile + first round seconds, median steady-state seconds per round)."""
    algorithm = fedavg(model, optax.sgd(0.05), num_epochs=2, batch_size=10, execution=execution)
    round_fn = jax.jit(algorithm.round)
    state = algorithm.init(jax.random.key(0))
    start = time.perf_counter()
    state = jax.block_until_ready(round_fn(state, batch))
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state = jax.block_until_ready(round_fn(state, batch))
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def measure(repeats: int) -> list[dict]:
    rows = []
    for name, build, clients, examples in WORKLOADS:
        model = build()
        batch = client_batch(model, clients, examples)
        first, seconds = seconds_per_round(model, ClientExecution("vmap"), batch, repeats)
        rows.append(dict(workload=name, devices=1, strategy="vmap (no mesh)",
                         compile_s=first, round_s=seconds))
        for count in DEVICE_COUNTS:
            mesh = sharding.client_mesh(jax.devices()[:count])
            for label, execution in (("shard_map", ClientExecution("sharded", mesh=mesh)),
                                     ("gspmd", GspmdExecution("sharded", mesh=mesh))):
                first, seconds = seconds_per_round(model, execution, batch, repeats)
                rows.append(dict(workload=name, devices=count, strategy=label,
                                 compile_s=first, round_s=seconds))
                print(f"{name} devices={count} {label}: {seconds:.4f} s/round", file=sys.stderr)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default=None, help="results JSON file")
    args = parser.parse_args(argv)
    if jax.device_count() < max(DEVICE_COUNTS):
        if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
            sys.exit(f"need {max(DEVICE_COUNTS)} devices; {jax.device_count()} visible")
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_"
                                          f"platform_device_count={max(DEVICE_COUNTS)}").strip(),
                   JAX_PLATFORMS="cpu")
        sys.exit(subprocess.call([sys.executable, "-m", "benchmarks.sharding", *(argv or
                                                                                 sys.argv[1:])],
                                 env=env))
    rows = measure(args.repeats)
    print(f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print("| workload | devices | strategy | round s | rounds/s | compile + first round s |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['workload']} | {row['devices']} | {row['strategy']} | "
              f"{row['round_s']:.4f} | {1 / row['round_s']:.1f} | {row['compile_s']:.2f} |")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=2)


if __name__ == "__main__":
    main()
