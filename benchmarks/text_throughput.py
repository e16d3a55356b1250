"""Round throughput of FedAvg on the text models, against PyTorch's per-client loop, in one run.

Workloads (issue 18's Performance section), random token sequences generated once:

- `char-10`: the Shakespeare character model (`char_lstm`: Embed(80, 8), LSTM(256) x 2,
  Dense(80)), 10 clients of 50 sequences of 80 characters, batch 10 (5 local steps), 1 epoch,
  client SGD at rate 1.
- `so-10`: the Stack Overflow next-word model of Reddi et al. (`word_lstm`: Embed(10004, 96),
  LSTM(670), Dense(96), Dense(10004)), 10 clients of 48 sequences of 20 words, batch 16 (Reddi
  et al.'s client batch; 3 local steps), 1 epoch, client SGD at rate 0.3.

FedAvg is built from the algorithm registry (`REGISTRY["fedavg"]`, plain averaging on the
server) with each client execution strategy in turn; "auto" is timed as well and its pick is
recorded (read from `ClientExecution.resolve` while the round is traced). Per strategy: compile
time of one jitted round, then the median of `--repeats` rounds after one warm-up round.

The PyTorch side is `benchmarks.torch_reference` (same workloads, `nn.LSTM`, a Python loop
over clients and SGD steps, then the average), run as a subprocess of a separate environment
that has torch, because fedjax_lab does not depend on it:

    python -m benchmarks.text_throughput --torch-python /tmp/torchenv/bin/python \
        [--workloads char-10 so-10] [--strategies auto vmap sequential unrolled] [--repeats 3]
"""

import argparse
import dataclasses
import os
import platform
import re
import subprocess
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.throughput import describe, recorded_resolutions, timed
from fedjax_lab.algorithms import REGISTRY
from fedjax_lab.algorithms.spec import ClientTraining
from fedjax_lab.core import ClientBatch, ClientExecution, client_keys, experiment_key
from fedjax_lab.core.types import DataInfo
from fedjax_lab.models import get_model


class TextWorkload(NamedTuple):
    name: str
    model: str
    clients: int
    sequences: int
    length: int
    vocab: int
    batch_size: int
    learning_rate: float


WORKLOADS = {w.name: w for w in (
    TextWorkload("char-10", "char_lstm", 10, 50, 80, 80, 10, 1.0),
    TextWorkload("so-10", "word_lstm", 10, 48, 20, 10004, 16, 0.3),
)}
STRATEGIES = {
    "auto": ClientExecution(),
    "vmap": ClientExecution("vmap"),
    "sequential": ClientExecution("sequential"),
    "unrolled": ClientExecution("unrolled"),
    "chunked-5": ClientExecution("chunked", 5),
}


def token_batch(w: TextWorkload, seed: int = 0) -> ClientBatch:
    """Random next-token data: x float32 ids [C, N, T], y int32 targets [C, N, T]."""
    rng = np.random.default_rng(seed)
    shape = (w.clients, w.sequences, w.length)
    ids = jnp.arange(w.clients, dtype=jnp.int32)
    return ClientBatch(x=jnp.asarray(rng.integers(0, w.vocab, shape).astype(np.float32)),
                       y=jnp.asarray(rng.integers(0, w.vocab, shape).astype(np.int32)),
                       mask=jnp.ones(shape[:2], bool),
                       num_examples=jnp.full((w.clients,), w.sequences, jnp.int32),
                       client_ids=ids, rng=client_keys(experiment_key(seed), 0, ids))


def build_fedavg(w: TextWorkload, execution: ClientExecution):
    spec = REGISTRY["fedavg"]
    config = dataclasses.replace(spec.config(), client=ClientTraining(
        lr=w.learning_rate, epochs=1, batch_size=w.batch_size))
    model = get_model(w.model, (w.length,), w.vocab)
    data = DataInfo(num_clients=w.clients, num_classes=w.vocab, feature_shape=(w.length,),
                    max_examples=w.sequences, label_shape=(w.length,))
    return spec.build(config, model, data, execution)


def measure(w: TextWorkload, strategy: str, repeats: int) -> dict:
    algorithm = build_fedavg(w, STRATEGIES[strategy])
    batch = token_batch(w)
    state = algorithm.init(jax.random.key(0))
    start = time.perf_counter()
    with recorded_resolutions() as picks:
        compiled = jax.jit(algorithm.round).lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start
    loss = float(np.mean(np.asarray(compiled(state, batch).metrics["train_loss"])))
    round_seconds = timed(compiled, state, batch, repeats=repeats)
    pick = describe(picks[0]) if picks else "?"
    return {"workload": w.name, "strategy": strategy if strategy != "auto" else f"auto → {pick}",
            "round_s": round_seconds, "compile_s": compile_seconds, "loss": loss,
            "load": os.getloadavg()[0]}


def torch_rounds(python: str, names: list[str], repeats: int, threads: int) -> dict[str, str]:
    """Runs `benchmarks.torch_reference` in `python`'s environment; checks its workloads' shapes
    against ours; returns {workload: "median / best"}."""
    command = [python, "-m", "benchmarks.torch_reference", "--workloads", *names,
               "--repeats", str(repeats), "--threads", str(threads)]
    output = subprocess.run(command, check=True, capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout
    print("\n".join(line for line in output.splitlines() if line.startswith("#")), flush=True)
    for name in names:
        w = WORKLOADS[name]
        expected = (f"# workload {name}: clients={w.clients} examples={w.sequences} "
                    f"batch={w.batch_size} shape={w.length} classes={w.vocab} "
                    f"lr={w.learning_rate}")
        if expected not in output:
            raise SystemExit(f"benchmarks.torch_reference runs another {name} than ours; "
                             f"expected the line {expected!r} in its output:\n{output}")
    rows = re.findall(r"^\| (\S+) \| (\S+) \| (\S+) \|$", output, re.MULTILINE)
    return {name: (float(median), float(best)) for name, median, best in rows
            if name in names}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--strategies", nargs="+", default=["auto", "vmap", "sequential", "unrolled"],
                        choices=list(STRATEGIES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-python", help="a Python with torch installed; omitted: no "
                        "PyTorch column")
    parser.add_argument("--torch-threads", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{jax.device_count()} {jax.default_backend()} device(s), python "
          f"{platform.python_version()}, jax {jax.__version__}, optax {optax.__version__}, "
          f"numpy {np.__version__}; load average at start {os.getloadavg()}", flush=True)
    reference = {}
    if args.torch_python:
        reference = torch_rounds(args.torch_python, args.workloads, args.repeats,
                                 args.torch_threads)
    columns = ["workload", "strategy", "round_s", "compile_s", "loss", "load",
               "torch_round_s", "torch/jax"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns), flush=True)
    for name in args.workloads:
        torch_median = reference.get(name, (float("nan"),))[0]
        for strategy in args.strategies:
            row = measure(WORKLOADS[name], strategy, args.repeats)
            row["torch_round_s"] = torch_median
            row["torch/jax"] = torch_median / row["round_s"]
            print("| " + " | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c])
                                    for c in columns) + " |", flush=True)


if __name__ == "__main__":
    main()
