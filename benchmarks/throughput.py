"""Round throughput of the engine, against a per-client loop and the model's own ceiling.

For each workload it reports steady-state seconds per round (median over repeated rounds after a
warm-up, one jitted call per round), the same rounds as one `lax.scan` block (10 rounds by default), the
compile time of one round and of the block, client steps per second, achieved GFLOP/s (3x the
forward FLOPs that XLA's cost analysis counts per example, times the examples the active steps
process), XLA's memory analysis of the round (arguments + outputs + temporaries, and the
temporaries alone) and the process's peak resident memory so far. Clients train with
`factored.sgd` (plain SGD), so the CNN takes the factored dense update unless a workload says
otherwise. Reference points measured in the same run:

- loop: the same local training as a Python loop over clients and steps, one jitted dispatch per
  SGD step (how fedjax and the PyTorch simulators run clients); for large cohorts a subset of
  clients is timed and scaled linearly (the loop's cost is linear in clients by construction).
- ceiling: one jitted SGD step on one large batch of the model, in GFLOP/s.

    python -m benchmarks.throughput [--workloads logreg-100 ...] [--repeats 10]
"""

import argparse
import math
import platform
import resource
import statistics
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab.algorithms import fedavg
from fedjax_lab.core import ClientBatch, ClientExecution, client_keys, experiment_key, factored
from fedjax_lab.core.losses import model_loss
from fedjax_lab.models import Model, femnist_cnn, logistic_regression, mlp


class Workload(NamedTuple):
    name: str
    model: Model
    clients: int
    examples: int
    batch_size: int
    epochs: int
    execution: ClientExecution = ClientExecution()
    dense_update: str = "auto"


def workloads() -> dict[str, Workload]:
    logreg = logistic_regression((60,), 10)
    perceptron = mlp((784,), 10, hidden=(200, 200))
    cnn = femnist_cnn((28, 28), 62)
    # 100 examples with batch 10 for two epochs is the "20 local steps".
    table = [Workload(f"logreg-{c}", logreg, c, 100, 10, 2) for c in (100, 1000, 10000)]
    table += [Workload(f"mlp-{c}", perceptron, c, 100, 10, 2) for c in (100, 1000, 10000)]
    table += [Workload(f"cnn-{c}", cnn, c, 200, 20, 1) for c in (10, 100)]
    # The CNN without the factored dense update: clients still unrolled by "auto".
    table.append(Workload("cnn-10-per-client", cnn, 10, 200, 20, 1, dense_update="per_client"))
    return {w.name: w for w in table}


def client_batch(w: Workload, seed: int = 0) -> ClientBatch:
    """Random examples generated on the device one client at a time, so that a large cohort
    costs its own size in memory and no more (no host copy, no cohort-sized temporaries)."""
    ids = jnp.arange(w.clients, dtype=jnp.int32)

    def one_client(key):
        x_key, y_key = jax.random.split(key)
        return (jax.random.normal(x_key, (w.examples,) + w.model.feature_shape, jnp.float32),
                jax.random.randint(y_key, (w.examples,), 0, w.model.num_classes, jnp.int32))

    x, y = jax.jit(lambda keys: jax.lax.map(one_client, keys))(
        jax.random.split(jax.random.key(seed), w.clients))
    return ClientBatch(x=x, y=y, mask=jnp.ones((w.clients, w.examples), bool),
                       num_examples=jnp.full((w.clients,), w.examples, jnp.int32),
                       client_ids=ids, rng=client_keys(experiment_key(seed), 0, ids))


def forward_flops_per_example(model: Model) -> float:
    params = model.init(jax.random.key(0))
    x = jnp.zeros((64,) + model.feature_shape)
    cost = jax.jit(model.apply).lower(params, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"]) / 64


def timed(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sgd_step(model: Model, learning_rate: float = 0.1):
    loss = model_loss(model.apply)

    @jax.jit
    def step(params, x, y):
        grads = jax.grad(loss)(params, x, y, jnp.ones(y.shape, bool), None)
        return jax.tree.map(lambda p, g: p - learning_rate * g, params, grads)

    return step


def loop_round_seconds(w: Workload, batch: ClientBatch, max_clients: int = 100) -> float:
    """A per-client Python loop, one dispatch per step, scaled from up to `max_clients`."""
    step = sgd_step(w.model)
    params = w.model.init(jax.random.key(0))
    timed_clients = min(w.clients, max_clients)
    x, y = np.asarray(batch.x[:timed_clients]), np.asarray(batch.y[:timed_clients])
    jax.block_until_ready(step(params, x[0, :w.batch_size], y[0, :w.batch_size]))
    start = time.perf_counter()
    models = []
    for c in range(timed_clients):
        local = params
        for _ in range(w.epochs):
            order = np.random.default_rng(c).permutation(w.examples)
            for s in range(0, w.examples, w.batch_size):
                idx = order[s:s + w.batch_size]
                local = step(local, x[c, idx], y[c, idx])
        models.append(local)
    mean = jax.tree.map(lambda *ws: sum(ws) / len(ws), *models)
    jax.block_until_ready(mean)
    return (time.perf_counter() - start) * w.clients / timed_clients


def ceiling_gflops(w: Workload, flops: float, repeats: int) -> float:
    examples = min(max(w.clients * w.batch_size, 1024), 8192)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(examples,) + w.model.feature_shape).astype(np.float32))
    y = jnp.asarray(rng.integers(0, w.model.num_classes, examples).astype(np.int32))
    seconds = timed(sgd_step(w.model), w.model.init(jax.random.key(0)), x, y, repeats=repeats)
    return 3 * flops * examples / seconds / 1e9


def measure(w: Workload, repeats: int, scan_rounds: int = 10, references: bool = True) -> dict:
    client_optimizer = factored.sgd(0.1)
    factored_path = (w.dense_update != "per_client" and factored.unsupported_reason(
        w.model, client_optimizer, None) is None)
    algorithm = fedavg(w.model, client_optimizer, num_epochs=w.epochs,
                       batch_size=w.batch_size, execution=w.execution,
                       dense_update=w.dense_update)
    batch = client_batch(w)
    state = algorithm.init(jax.random.key(0))
    start = time.perf_counter()
    compiled = jax.jit(algorithm.round).lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    round_seconds = timed(compiled, state, batch, repeats=repeats)

    def block(state, batch):
        # Fresh client keys every round, as in a real run: with one batch reused, XLA would hoist
        # the per-epoch shuffles out of the loop and flatter the block.
        def one_round(state, round_index):
            keys = jax.vmap(lambda key: jax.random.fold_in(key, round_index))(batch.rng)
            return algorithm.round(state, batch._replace(rng=keys)), None

        return jax.lax.scan(one_round, state, jnp.arange(scan_rounds))[0]

    block_compile_seconds = scan_seconds = loop_seconds = ceiling = math.nan
    if scan_rounds:
        start = time.perf_counter()
        scanned = jax.jit(block).lower(state, batch).compile()
        block_compile_seconds = time.perf_counter() - start
        scan_seconds = timed(scanned, state, batch, repeats=max(2, repeats // 5)) / scan_rounds
    steps = w.clients * w.epochs * -(-w.examples // w.batch_size)
    flops = forward_flops_per_example(w.model)
    gflops = 3 * flops * w.clients * w.epochs * w.examples / round_seconds / 1e9
    if references:
        loop_seconds = loop_round_seconds(w, batch)
        ceiling = ceiling_gflops(w, flops, repeats)
    return {
        "workload": w.name, "execution": w.execution.strategy,
        "dense": "factored" if factored_path else "per-client",
        "round_s": round_seconds, "scan_round_s": scan_seconds, "compile_s": compile_seconds,
        "block_compile_s": block_compile_seconds,
        "steps_per_s": steps / round_seconds, "gflops": gflops,
        "memory_mib": (memory.argument_size_in_bytes + memory.output_size_in_bytes
                       + memory.temp_size_in_bytes) / 2**20,
        "temp_mib": memory.temp_size_in_bytes / 2**20,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "loop_round_s": loop_seconds, "speedup_vs_loop": loop_seconds / round_seconds,
        "ceiling_gflops": ceiling,
    }


def main(argv=None) -> None:
    table = workloads()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+",
                        default=[n for n in table if n not in ("cnn-100", "mlp-10000")],
                        choices=list(table))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--scan-rounds", type=int, default=10,
                        help="rounds in the scanned block timed against per-round calls (0: skip)")
    parser.add_argument("--no-references", action="store_true",
                        help="skip the per-client loop and the ceiling (memory runs)")
    args = parser.parse_args(argv)
    print(f"# {platform.processor() or platform.machine()}, {jax.device_count()} "
          f"{jax.default_backend()} device(s), jax {jax.__version__}, optax {optax.__version__}")
    columns = ["workload", "execution", "dense", "round_s", "scan_round_s", "compile_s",
               "block_compile_s",
               "steps_per_s", "gflops", "ceiling_gflops", "memory_mib", "temp_mib",
               "peak_rss_gib", "loop_round_s", "speedup_vs_loop"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for name in args.workloads:
        row = measure(table[name], args.repeats, args.scan_rounds, not args.no_references)
        print("| " + " | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c])
                                for c in columns) + " |", flush=True)


if __name__ == "__main__":
    main()
