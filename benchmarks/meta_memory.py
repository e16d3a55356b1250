"""Peak memory and time per round of FedMeta's MAML (1 and 5 inner steps) against FOMAML, with
and without rematerialisation of the inner loop, and with chunked client execution.

    python -m benchmarks.meta_memory [--repeats 15] [--output benchmarks/META_MEMORY.md]

Workload: one jitted `fedmeta` round (Adam server step) over C = 8 clients, each with 512
examples of 64 features (support 256, query 256), MLP 64-256-256-10, float32.

Each configuration runs in a fresh subprocess and reports two memory measures:
  - XLA's compiled memory analysis of the round (`jax.jit(round).lower(...).compile()
    .memory_analysis()`): `temp` is the scratch the program allocates for intermediate values
    (the activations kept for the meta-backward pass live here), `arguments` and `outputs` its
    input and output buffers. This is the program's own peak, independent of the host process.
  - the process's peak resident set (`resource.getrusage(...).ru_maxrss`) after compiling and
    running the rounds, next to the resident set just before compiling; it includes Python, the
    JAX runtime and the XLA compiler, so it bounds the whole job rather than the round.
Time per round is measured separately, in one process holding every configuration compiled:
`repeats` passes over all configurations in turn (round robin, one warm-up each), every round
waited for with `block_until_ready`, so load from other jobs on the shared machine falls on all
configurations alike; median and minimum, with the load average recorded beside them.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

CLIENTS, EXAMPLES, FEATURES, HIDDEN, CLASSES = 8, 512, 64, (256, 256), 10
CONFIGS = {
    "maml_k1": dict(variant="maml", num_inner_steps=1, remat=False),
    "maml_k1_remat": dict(variant="maml", num_inner_steps=1, remat=True),
    "maml_k5": dict(variant="maml", num_inner_steps=5, remat=False),
    "maml_k5_remat": dict(variant="maml", num_inner_steps=5, remat=True),
    "fomaml_k1": dict(variant="fomaml", num_inner_steps=1, remat=False),
    "fomaml_k1_remat": dict(variant="fomaml", num_inner_steps=1, remat=True),
    "fomaml_k5": dict(variant="fomaml", num_inner_steps=5, remat=False),
    "fomaml_k5_remat": dict(variant="fomaml", num_inner_steps=5, remat=True),
    "maml_k5_chunk2": dict(variant="maml", num_inner_steps=5, remat=False, chunk_size=2),
    "maml_k5_remat_chunk2": dict(variant="maml", num_inner_steps=5, remat=True, chunk_size=2),
}
MIB = 2 ** 20


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def build(name: str):
    """(jitted round, initial state, batch) of one configuration."""
    import jax
    import jax.numpy as jnp
    import optax

    from fedjax_lab.algorithms.fedmeta import fedmeta
    from fedjax_lab.core import ClientBatch, ClientExecution, client_keys, experiment_key
    from fedjax_lab.models import mlp

    options = dict(CONFIGS[name])
    chunk_size = options.pop("chunk_size", None)
    execution = ClientExecution("chunked", chunk_size) if chunk_size else ClientExecution()
    rng = np.random.default_rng(0)
    ids = jnp.arange(CLIENTS, dtype=jnp.int32)
    batch = ClientBatch(
        x=jnp.asarray(rng.normal(size=(CLIENTS, EXAMPLES, FEATURES)), jnp.float32),
        y=jnp.asarray(rng.integers(0, CLASSES, size=(CLIENTS, EXAMPLES)), jnp.int32),
        mask=jnp.ones((CLIENTS, EXAMPLES), bool),
        num_examples=jnp.full((CLIENTS,), EXAMPLES, jnp.int32), client_ids=ids,
        rng=client_keys(experiment_key(0), 0, ids))
    model = mlp((FEATURES,), CLASSES, hidden=HIDDEN)
    algorithm = fedmeta(model, optax.adam(1e-3), inner_lr=0.1, support_fraction=0.5,
                        execution=execution, **options)
    return jax.jit(algorithm.round), jax.block_until_ready(algorithm.init(jax.random.key(0))), batch


def measure_memory(name: str) -> dict:
    """Compiles one configuration and runs two rounds in this process (call it in a fresh one)."""
    import jax

    round_fn, state, batch = build(name)
    rss_before = _rss_mib()
    start = time.perf_counter()
    compiled = round_fn.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    for _ in range(2):
        state = jax.block_until_ready(compiled(state, batch))
    return {
        "config": name, **CONFIGS[name],
        "temp_mib": analysis.temp_size_in_bytes / MIB,
        "argument_mib": analysis.argument_size_in_bytes / MIB,
        "output_mib": analysis.output_size_in_bytes / MIB,
        "alias_mib": analysis.alias_size_in_bytes / MIB,
        "rss_before_compile_mib": rss_before,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "compile_seconds": compile_seconds,
        "finite": bool(np.isfinite(float(state.metrics["train_loss"]))),
    }


def measure_times(repeats: int) -> dict[str, list[float]]:
    """Seconds per round of every configuration, measured round robin in this process."""
    import jax

    programs = {}
    for name in CONFIGS:
        round_fn, state, batch = build(name)
        compiled = round_fn.lower(state, batch).compile()
        programs[name] = [compiled, jax.block_until_ready(compiled(state, batch)), batch]
    seconds = {name: [] for name in CONFIGS}
    for _ in range(repeats):
        for name, program in programs.items():
            compiled, state, batch = program
            start = time.perf_counter()
            program[1] = jax.block_until_ready(compiled(state, batch))
            seconds[name].append(time.perf_counter() - start)
    return seconds


def machine() -> dict:
    model_name = platform.processor() or "unknown"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model_name = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                          if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    import jax

    return {"cpu": model_name, "cores": os.cpu_count(), "jax": jax.__version__,
            "backend": jax.default_backend(),
            "date": datetime.date.today().isoformat()}


def markdown(results: list[dict], info: dict) -> str:
    lines = [
        "# FedMeta memory and time per round: MAML vs FOMAML, rematerialisation, chunking",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores (shared with other jobs; load average "
        f"{info['load_before']} before, {info['load_after']} after), XLA:{info['backend']}; "
        f"jax {info['jax']}; {info['date']}. Produced by `python -m benchmarks.meta_memory`.",
        "",
        f"Workload: one jitted `fedmeta` round, {CLIENTS} clients x {EXAMPLES} examples "
        f"(support {EXAMPLES // 2}, query {EXAMPLES // 2}), {FEATURES} features, MLP "
        f"{FEATURES}-{'-'.join(map(str, HIDDEN))}-{CLASSES}, float32, Adam server step. "
        "K = inner steps; chunk 2 = `ClientExecution(\"chunked\", 2)`, otherwise vmap.",
        "",
        "Memory measures: **XLA temp** is the compiled round's scratch for intermediate values "
        "(`compile().memory_analysis().temp_size_in_bytes`; the activations kept for the "
        "meta-backward pass live here); arguments and outputs add "
        f"{results[0]['argument_mib']:.1f} MiB and {results[0]['output_mib']:.1f} MiB in every "
        "row. **Peak RSS** is the fresh subprocess's `ru_maxrss` (Python, JAX runtime and XLA "
        "compiler included), beside its resident set just before compiling. Time: median "
        f"(min) of {len(results[0]['round_seconds'])} rounds per configuration, taken round "
        "robin over all configurations in one process after a warm-up each.",
        "",
        "| config | variant | K | remat | chunk | XLA temp MiB | RSS before compile MiB "
        "| peak RSS MiB | s/round median (min) | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['config']} | {r['variant']} | {r['num_inner_steps']} | "
            f"{'yes' if r['remat'] else 'no'} | {r.get('chunk_size') or '-'} | "
            f"{r['temp_mib']:.1f} | {r['rss_before_compile_mib']:.0f} | {r['peak_rss_mib']:.0f} | "
            f"{r['round_seconds_median']:.3f} ({r['round_seconds_min']:.3f}) | "
            f"{r['compile_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--output", default=None, help="markdown file for the table")
    parser.add_argument("--json", default=None, help="results JSON file")
    parser.add_argument("--child", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats} is invalid; expected a positive integer")
    if args.child:
        print(json.dumps(measure_memory(args.child)))
        return
    info = {**machine(), "load_before": " ".join(f"{x:.1f}" for x in os.getloadavg())}
    results = []
    for name in CONFIGS:
        child = subprocess.run([sys.executable, "-m", "benchmarks.meta_memory", "--child", name],
                               capture_output=True, text=True, check=True)
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(f"{name}: XLA temp {results[-1]['temp_mib']:.1f} MiB", file=sys.stderr)
    for result, seconds in zip(results, measure_times(args.repeats).values()):
        result.update(round_seconds_median=float(np.median(seconds)),
                      round_seconds_min=float(np.min(seconds)), round_seconds=seconds)
    info["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    table = markdown(results, info)
    print(table)
    if args.output:
        with open(args.output + ".tmp", "w") as out:
            out.write(table)
        os.replace(args.output + ".tmp", args.output)
    if args.json:
        from fedjax_lab.experiment import write_json_atomic

        write_json_atomic(args.json, {"machine": info, "results": results})


if __name__ == "__main__":
    main()
