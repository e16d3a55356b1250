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
- torch (`--torch-python`): `benchmarks.torch_reference`'s PyTorch per-client loop of the same
  workload (the `cnn-*` and `cifar-50*` rows), run in that Python's environment.
- pfl (`--pfl-python`): pfl-research's own simulator on its CIFAR-10 benchmark
  (`benchmarks.pfl_reference`: `FederatedAveraging` on a `SimulatedBackend`, its `simple_cnn`
  in `PyTorchModel`), the reference of the `cifar-50*` rows, run in that Python's environment.

The `cifar-50*` rows are that benchmark (Granqvist et al., arXiv 2404.06430;
`configs/baseline.yaml` of its `image_classification`): the registry's `cifar_cnn` with its
dropout, 50 clients of 50 random 32x32x3 images, batch 10, one epoch (5 SGD steps), client
rate 0.1, plain averaging; one row per client execution strategy ("auto" records its pick).
torch and pfl live in environments of their own (never fedjax_lab's dependencies), so one
command records all three:

    python -m benchmarks.throughput [--workloads logreg-100 ...] [--repeats 10]
    python -m benchmarks.throughput --workloads cifar-50 cifar-50-sequential --repeats 5 \
        --scan-rounds 2 --torch-python /tmp/torchenv/bin/python --pfl-python /tmp/pflenv/bin/python
"""

import argparse
import contextlib
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import time
from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab.algorithms import fedavg
from fedjax_lab.core import ClientBatch, ClientExecution, client_keys, experiment_key, factored
from fedjax_lab.core.losses import model_loss
from fedjax_lab.models import Model, femnist_cnn, get_model, logistic_regression, mlp


class Workload(NamedTuple):
    name: str
    model: Model
    clients: int
    examples: int
    batch_size: int
    epochs: int
    execution: ClientExecution = ClientExecution()
    dense_update: str = "auto"
    learning_rate: float = 0.1
    reference: str | None = None   # the references' name of this workload, if they have it


def workloads() -> dict[str, Workload]:
    logreg = logistic_regression((60,), 10)
    perceptron = mlp((784,), 10, hidden=(200, 200))
    cnn = femnist_cnn((28, 28), 62)
    # 100 examples with batch 10 for two epochs is the "20 local steps".
    table = [Workload(f"logreg-{c}", logreg, c, 100, 10, 2) for c in (100, 1000, 10000)]
    table += [Workload(f"mlp-{c}", perceptron, c, 100, 10, 2) for c in (100, 1000, 10000)]
    table += [Workload(f"cnn-{c}", cnn, c, 200, 20, 1, reference=f"cnn-{c}") for c in (10, 100)]
    # The CNN without the factored dense update: clients still unrolled by "auto".
    table.append(Workload("cnn-10-per-client", cnn, 10, 200, 20, 1, dense_update="per_client"))
    cifar = get_model("cifar_cnn", (32, 32, 3), 10)
    table += [Workload("cifar-50" + ("" if strategy == "auto" else f"-{strategy}"), cifar, 50,
                       50, 10, 1, ClientExecution(strategy), reference="cifar-50")
              for strategy in ("auto", "sequential", "unrolled", "vmap")]
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
    def step(params, x, y, key):
        # The key is an argument, not a constant, so that a model's dropout masks are drawn at
        # run time as in a round rather than folded into the program.
        grads = jax.grad(loss)(params, x, y, jnp.ones(y.shape, bool), key)
        return jax.tree.map(lambda p, g: p - learning_rate * g, params, grads)

    return step


def loop_round_seconds(w: Workload, batch: ClientBatch, max_clients: int = 100) -> float:
    """A per-client Python loop, one dispatch per step, scaled from up to `max_clients`."""
    step = sgd_step(w.model)
    params = w.model.init(jax.random.key(0))
    timed_clients = min(w.clients, max_clients)
    x, y = np.asarray(batch.x[:timed_clients]), np.asarray(batch.y[:timed_clients])
    key = jax.random.key(0)
    jax.block_until_ready(step(params, x[0, :w.batch_size], y[0, :w.batch_size], key))
    start = time.perf_counter()
    models = []
    for c in range(timed_clients):
        local = params
        for _ in range(w.epochs):
            order = np.random.default_rng(c).permutation(w.examples)
            for s in range(0, w.examples, w.batch_size):
                idx = order[s:s + w.batch_size]
                local = step(local, x[c, idx], y[c, idx], jax.random.fold_in(key, s))
        models.append(local)
    mean = jax.tree.map(lambda *ws: sum(ws) / len(ws), *models)
    jax.block_until_ready(mean)
    return (time.perf_counter() - start) * w.clients / timed_clients


def ceiling_gflops(w: Workload, flops: float, repeats: int) -> float:
    examples = min(max(w.clients * w.batch_size, 1024), 8192)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(examples,) + w.model.feature_shape).astype(np.float32))
    y = jnp.asarray(rng.integers(0, w.model.num_classes, examples).astype(np.int32))
    seconds = timed(sgd_step(w.model), w.model.init(jax.random.key(0)), x, y,
                    jax.random.key(1), repeats=repeats)
    return 3 * flops * examples / seconds / 1e9


@contextlib.contextmanager
def recorded_resolutions():
    """Records what `ClientExecution.resolve` returns while a round is traced ("auto"'s pick)."""
    picks, resolve = [], ClientExecution._resolve_program

    def recording(self, client_fn, per_client):
        concrete, client = resolve(self, client_fn, per_client)
        picks.append(concrete)
        return concrete, client

    ClientExecution._resolve_program = recording
    try:
        yield picks
    finally:
        ClientExecution._resolve_program = resolve


def describe(execution: ClientExecution) -> str:
    if execution.strategy == "chunked":
        return f"chunked ({execution.chunk_size} per chunk, {execution.chunk_strategy})"
    return execution.strategy


def measure(w: Workload, repeats: int, scan_rounds: int = 10, references: bool = True) -> dict:
    client_optimizer = factored.sgd(w.learning_rate)
    factored_path = (w.dense_update != "per_client" and factored.unsupported_reason(
        w.model, client_optimizer, None) is None)
    algorithm = fedavg(w.model, client_optimizer, num_epochs=w.epochs,
                       batch_size=w.batch_size, execution=w.execution,
                       dense_update=w.dense_update)
    batch = client_batch(w)
    state = algorithm.init(jax.random.key(0))
    start = time.perf_counter()
    with recorded_resolutions() as picks:
        compiled = jax.jit(algorithm.round).lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start
    execution = w.execution.strategy
    if execution == "auto" and picks:
        execution = f"auto → {describe(picks[0])}"
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
        "workload": w.name, "execution": execution,
        "dense": "factored" if factored_path else "per-client",
        "round_s": round_seconds, "scan_round_s": scan_seconds, "compile_s": compile_seconds,
        "block_compile_s": block_compile_seconds,
        "steps_per_s": steps / round_seconds, "gflops": gflops,
        "memory_mib": (memory.argument_size_in_bytes + memory.output_size_in_bytes
                       + memory.temp_size_in_bytes) / 2**20,
        "temp_mib": memory.temp_size_in_bytes / 2**20,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "loop_round_s": loop_seconds, "speedup_vs_loop": loop_seconds / round_seconds,
        "ceiling_gflops": ceiling, "load": os.getloadavg()[0],
    }


def reference_output(python: str, module: str, arguments: list[str]) -> str:
    """Runs `python -m module arguments` from the repository root (another environment: torch
    and pfl are not fedjax_lab's dependencies) and echoes its header lines."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    output = subprocess.run([python, "-m", module, *arguments], check=True, capture_output=True,
                            text=True, cwd=root).stdout
    print("\n".join(line for line in output.splitlines() if line.startswith("#")), flush=True)
    return output


def check_same_workload(output: str, module: str, w: Workload) -> None:
    """Raises unless the reference's `# workload` line has our clients, data and training."""
    expected = (f"# workload {w.reference}: clients={w.clients} examples={w.examples} "
                f"batch={w.batch_size} ")
    line = next((line for line in output.splitlines() if line.startswith(expected)), None)
    if line is None or f"classes={w.model.num_classes} lr={w.learning_rate}" not in line:
        raise SystemExit(f"{module} runs another {w.reference} than {w.name}: expected a line "
                         f"starting {expected!r} with classes={w.model.num_classes} "
                         f"lr={w.learning_rate}; its output:\n{output}")


def torch_rounds(python: str, rows: list[Workload], repeats: int, threads: int) -> dict:
    """{reference name: median seconds per round} of `benchmarks.torch_reference`."""
    names = sorted({w.reference for w in rows if w.reference})
    if not names:
        return {}
    output = reference_output(python, "benchmarks.torch_reference", [
        "--workloads", *names, "--repeats", str(repeats), "--threads", str(threads)])
    for w in rows:
        if w.reference:
            check_same_workload(output, "benchmarks.torch_reference", w)
    rows_printed = re.findall(r"^\| (\S+) \| (\S+) \| (\S+) \|$", output, re.MULTILINE)
    return {name: float(median) for name, median, _ in rows_printed if name in names}


def pfl_rounds(python: str, rows: list[Workload], repeats: int, threads: int) -> dict:
    """{"cifar-50": median seconds per round} of `benchmarks.pfl_reference`, if a row needs it."""
    cifar = [w for w in rows if w.reference == "cifar-50"]
    if not cifar:
        return {}
    output = reference_output(python, "benchmarks.pfl_reference", [
        "--repeats", str(repeats), "--threads", str(threads)])
    for w in cifar:
        check_same_workload(output, "benchmarks.pfl_reference", w)
    summary = json.loads([line for line in output.splitlines() if '"pfl_round_s"' in line][-1])
    print(f"# pfl: median {summary['pfl_round_s']:.4g} s, best {summary['best_s']:.4g} s over "
          f"{summary['rounds']} rounds, load {summary['load']:.2f}", flush=True)
    return {"cifar-50": summary["pfl_round_s"]}


def cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def jaxlib_version() -> str:
    import jaxlib  # noqa: PLC0415 (only for its version)
    return getattr(jaxlib, "__version__", "?")


def main(argv=None) -> None:
    table = workloads()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+",
                        default=[n for n in table if n not in ("cnn-100", "mlp-10000")
                                 and not n.startswith("cifar-50")],
                        choices=list(table))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--scan-rounds", type=int, default=10,
                        help="rounds in the scanned block timed against per-round calls (0: skip)")
    parser.add_argument("--no-references", action="store_true",
                        help="skip the per-client loop and the ceiling (memory runs)")
    parser.add_argument("--torch-python", help="a Python with torch installed: adds "
                        "benchmarks.torch_reference's round of the cnn-* and cifar-50* rows")
    parser.add_argument("--pfl-python", help="a Python with pfl and torch installed: adds "
                        "benchmarks.pfl_reference's round of the cifar-50* rows")
    parser.add_argument("--reference-threads", type=int, default=2,
                        help="torch threads of the torch and pfl references")
    args = parser.parse_args(argv)
    rows = [table[name] for name in args.workloads]
    print(f"# {cpu_name()}, {os.cpu_count()} CPUs, {jax.device_count()} "
          f"{jax.default_backend()} device(s), python {platform.python_version()}, jax "
          f"{jax.__version__}, jaxlib {jaxlib_version()}, flax {flax.__version__}, optax "
          f"{optax.__version__}, numpy {np.__version__}; load "
          f"average at start {os.getloadavg()}", flush=True)
    # The references first, each alone on the machine, then ours.
    torch_seconds = (torch_rounds(args.torch_python, rows, args.repeats, args.reference_threads)
                     if args.torch_python else {})
    pfl_seconds = (pfl_rounds(args.pfl_python, rows, args.repeats, args.reference_threads)
                   if args.pfl_python else {})
    columns = ["workload", "execution", "dense", "round_s", "scan_round_s", "compile_s",
               "block_compile_s",
               "steps_per_s", "gflops", "ceiling_gflops", "memory_mib", "temp_mib",
               "peak_rss_gib", "loop_round_s", "speedup_vs_loop", "load"]
    if args.torch_python:
        columns += ["torch_round_s", "torch/ours"]
    if args.pfl_python:
        columns += ["pfl_round_s", "pfl/ours"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns), flush=True)
    for w in rows:
        row = measure(w, args.repeats, args.scan_rounds, not args.no_references)
        for name, seconds in (("torch", torch_seconds), ("pfl", pfl_seconds)):
            row[f"{name}_round_s"] = seconds.get(w.reference, math.nan)
            row[f"{name}/ours"] = row[f"{name}_round_s"] / row["round_s"]
        print("| " + " | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c])
                                for c in columns) + " |", flush=True)


if __name__ == "__main__":
    main()
