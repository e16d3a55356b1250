"""Logistic regression on `flax.linen.Dense` against the same model on `fedjax_lab.models.Dense`.

The throughput benchmark's logistic-regression workload (60 features, 10 classes, 100 examples
per client, batch 10, two epochs: 20 local steps; FedAvg with plain SGD at 0.1, "auto" client
execution) at `--clients` clients, once per layer class. The two models have the same parameters
(tests/test_dense.py) and compute the same round up to the float rounding of the kernel gradient,
which `models.Dense` sums as outer products instead of XLA:CPU's batched dot. Both rounds are
compiled in one process and timed alternately, `--repeats` rounds each after a warm-up, since
this machine's speed drifts between runs minutes apart.

    python -m benchmarks.dense_dropin [--clients 100 1000 10000] [--repeats 21]
"""

import argparse
import os
import time

import flax.linen as nn
import jax
import numpy as np

from benchmarks.throughput import Workload, client_batch, cpu_name
from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.core import factored
from fedjax_lab.models import Dense, from_flax

FEATURES, CLASSES, EXAMPLES, BATCH, EPOCHS = 60, 10, 100, 10, 2


class LogisticRegression(nn.Module):
    dense: type

    @nn.compact
    def __call__(self, x):
        return self.dense(CLASSES)(x.reshape(x.shape[0], -1))


def compiled_round(dense: type, clients: int):
    model = from_flax(LogisticRegression(dense), (FEATURES,), CLASSES)
    algorithm = fedavg(model, factored.sgd(0.1), num_epochs=EPOCHS, batch_size=BATCH)
    batch = client_batch(Workload("logreg", model, clients, EXAMPLES, BATCH, EPOCHS))
    state = algorithm.init(jax.random.key(0))
    start = time.perf_counter()
    compiled = jax.jit(algorithm.round).lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start
    jax.block_until_ready(compiled(state, batch))
    return compiled, state, batch, compile_seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args(argv)
    print(f"{cpu_name()}, {os.cpu_count()} CPUs, jax {jax.__version__}, backend "
          f"{jax.default_backend()}; logistic regression {FEATURES}->{CLASSES}, "
          f"{EPOCHS * EXAMPLES // BATCH} steps of {BATCH} examples per client")
    for clients in args.clients:
        rounds = {dense: compiled_round(dense, clients) for dense in (nn.Dense, Dense)}
        seconds = {dense: [] for dense in rounds}
        for _ in range(args.repeats):
            for dense, (compiled, state, batch, _) in rounds.items():
                start = time.perf_counter()
                jax.block_until_ready(compiled(state, batch))
                seconds[dense].append(time.perf_counter() - start)
        steps = clients * EPOCHS * EXAMPLES // BATCH
        for dense, times in seconds.items():
            median = float(np.median(times))
            print(f"{clients:6d} clients  {dense.__module__}.{dense.__name__:6s} round median "
                  f"{median:.4f} s (best {min(times):.4f})  {steps / median:.3g} client steps/s"
                  f"  compile {rounds[dense][3]:.2f} s  (load {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
