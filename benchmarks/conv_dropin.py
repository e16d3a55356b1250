"""A user's conv net on `flax.linen.Conv` against the same net on `fedjax_lab.models.Conv`.

The net is what a user writes for 32x32x3 images: 3x3 conv 32, 3x3 conv 64 stride 2, 3x3 conv
64 stride 2 (ReLU after each), global average pooling, dense 10. The two variants differ only in
the convolution class, so they have the same parameters (tests/test_conv.py) and compute the
same round; the difference is the gradient's layout, which XLA:CPU runs slowly inside local
training's step loop (models/conv.py). Timed: one FedAvg round (the registry's, client SGD,
"auto" client execution) of `--clients` clients of 50 random images, batch 10, one epoch (5 local
steps each): compile time of the jitted round, then the median of `--repeats` rounds after one
warm-up round.

    python -m benchmarks.conv_dropin [--clients 10] [--repeats 3]
"""

import argparse
import dataclasses
import os
import time
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.throughput import cpu_name, timed
from fedjax_lab.algorithms import REGISTRY
from fedjax_lab.algorithms.spec import ClientTraining
from fedjax_lab.core import ClientBatch, ClientExecution, client_keys, experiment_key
from fedjax_lab.core.types import DataInfo
from fedjax_lab.models import Conv, from_flax

IMAGE = (32, 32, 3)
EXAMPLES, BATCH, CLASSES = 50, 10, 10


class UserCNN(nn.Module):
    conv: type

    @nn.compact
    def __call__(self, x):
        x = nn.relu(self.conv(32, (3, 3))(x))
        x = nn.relu(self.conv(64, (3, 3), strides=2)(x))
        x = nn.relu(self.conv(64, (3, 3), strides=2)(x))
        return nn.Dense(CLASSES)(x.mean(axis=(1, 2)))


def image_batch(clients: int, seed: int = 0) -> ClientBatch:
    rng = np.random.default_rng(seed)
    ids = jnp.arange(clients, dtype=jnp.int32)
    return ClientBatch(
        x=jnp.asarray(rng.normal(size=(clients, EXAMPLES) + IMAGE).astype(np.float32)),
        y=jnp.asarray(rng.integers(0, CLASSES, (clients, EXAMPLES)).astype(np.int32)),
        mask=jnp.ones((clients, EXAMPLES), bool),
        num_examples=jnp.full((clients,), EXAMPLES, jnp.int32), client_ids=ids,
        rng=client_keys(experiment_key(seed), 0, ids))


def measure(conv: type, clients: int, repeats: int) -> dict:
    spec = REGISTRY["fedavg"]
    config = dataclasses.replace(spec.config(), client=ClientTraining(lr=0.1, epochs=1,
                                                                      batch_size=BATCH))
    data = DataInfo(num_clients=clients, num_classes=CLASSES, feature_shape=IMAGE,
                    max_examples=EXAMPLES)
    algorithm = spec.build(config, from_flax(UserCNN(conv), IMAGE, CLASSES), data,
                           ClientExecution())
    batch, state = image_batch(clients), algorithm.init(jax.random.key(0))
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "auto"'s advice about nn.Conv: the point measured
        compiled = jax.jit(algorithm.round).lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start
    return {"conv": f"{conv.__module__}.{conv.__name__}", "round_s": timed(
        compiled, state, batch, repeats=repeats), "compile_s": compile_seconds,
        "load": os.getloadavg()[0]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"{cpu_name()}, {os.cpu_count()} CPUs, "
          f"jax {jax.__version__}, backend {jax.default_backend()}; {args.clients} clients x "
          f"{EXAMPLES // BATCH} steps of {BATCH} images {IMAGE}")
    for conv in (nn.Conv, Conv):
        row = measure(conv, args.clients, args.repeats)
        print(f"{row['conv']:32s} round {row['round_s']:.3f} s  compile {row['compile_s']:.1f} s"
              f"  (load {row['load']:.2f})")


if __name__ == "__main__":
    main()
