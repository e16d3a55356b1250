"""pfl-research's CIFAR-10 benchmark round, run with pfl's own simulation API, for a same-machine
comparison with fedjax_lab.

pfl-research (Granqvist et al., "pfl-research: simulation framework for accelerating research in
Private Federated Learning", arXiv 2404.06430) is the fastest published FL simulator; this script
times its FedAvg round on the workload of its `benchmarks/image_classification` (configuration
`configs/baseline.yaml`, model `benchmarks/model/pytorch/cnn.py: simple_cnn`), built the way its
`pytorch/train.py` builds it:

- data: 1,000 users of 50 images each (`mean_datapoints_per_user: 50`, constant), random
  32x32x3 float32 images and labels in 0..9 instead of CIFAR-10 (the round's cost does not
  depend on the pixels), held as torch tensors as the benchmark holds them; a `FederatedDataset`
  whose user sampler draws users uniformly at random (`get_user_sampler("random", ...)`);
- model: `simple_cnn` (conv 3->32 3x3 VALID, ReLU, conv 32->64 3x3 VALID, ReLU, max-pool 2,
  dropout 0.25, dense 12544->128, ReLU, dropout 0.5, dense 128->10; Glorot-uniform weights;
  1.63 M parameters; images arrive channels-last and are transposed in the model, as there),
  wrapped in pfl's `PyTorchModel` with `torch.optim.SGD` as the local optimiser and
  `torch.optim.SGD(lr=1.0)` as the central one (plain averaging);
- algorithm: `FederatedAveraging` on a `SimulatedBackend` with the benchmark's postprocessors
  (`WeightByUser`, no local and no central privacy), cohort 50, `NNTrainHyperParams` with one
  local epoch, local batch 10 (5 SGD steps per user) and local learning rate 0.1.

Timing: wall seconds of each central iteration (sampling the cohort, local training, the
postprocessors, the aggregation and the central update), read from a callback at the end of
each iteration. pfl evaluates each user before and after training in iterations that are a
multiple of `evaluation_frequency`, and iteration 0 always is one; the benchmark evaluates every
10th. Here only the warm-up iteration 0 evaluates, so the timed rounds are training rounds, as
fedjax_lab's are. pfl's per-iteration metric report (printed to stdout by its platform) goes to
stderr, so stdout is: header lines starting with "#", then one JSON line per round, then one
JSON line with the median.

Needs pfl and PyTorch, which fedjax_lab does not depend on; install them in an environment of
their own (the CPU wheel of torch is enough):

    python3 -m venv /tmp/pflenv && /tmp/pflenv/bin/pip install 'pfl[pytorch]'
    /tmp/pflenv/bin/python -m benchmarks.pfl_reference [--repeats 5] [--warmup 1] [--threads 2]

`python -m benchmarks.throughput --pfl-python /tmp/pflenv/bin/python --workloads cifar-50` runs
this beside fedjax_lab's round of the same workload and prints both in one table.
"""

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import pfl
import torch
from pfl.aggregate.simulate import SimulatedBackend
from pfl.aggregate.weighting import WeightByUser
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
from pfl.callback.base import TrainingProcessCallback
from pfl.data.dataset import Dataset
from pfl.data.federated_dataset import FederatedDataset
from pfl.data.sampling import get_user_sampler
from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
from pfl.metrics import Metrics, Weighted
from pfl.model.pytorch import PyTorchModel
from pfl.privacy import CentrallyAppliedPrivacyMechanism, NoPrivacy
from torch import nn

WORKLOAD = "cifar-50"
IMAGE_SHAPE = (32, 32, 3)
CLASSES = 10
# configs/baseline.yaml of pfl-research's image_classification benchmark.
USERS = 1000
EXAMPLES_PER_USER = 50
COHORT = 50
LOCAL_EPOCHS = 1
LOCAL_BATCH = 10
LOCAL_LEARNING_RATE = 0.1
CENTRAL_LEARNING_RATE = 1.0


class SimpleCNN(nn.Module):
    """pfl-research's `simple_cnn`, with the `loss` and `metrics` methods `PyTorchModel` calls."""

    def __init__(self, image_shape=IMAGE_SHAPE, num_classes: int = CLASSES):
        super().__init__()
        height, _, channels = image_shape
        pooled = (height - 4) // 2
        self.layers = nn.Sequential(
            nn.Conv2d(channels, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(),
            nn.MaxPool2d(2), nn.Dropout(0.25), nn.Flatten(),
            nn.Linear(pooled * pooled * 64, 128), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(128, num_classes))
        for layer in self.layers:
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                # The benchmark's choice, to match its TF2 model's Keras defaults.
                nn.init.xavier_uniform_(layer.weight)

    def forward(self, images):
        # The benchmark's data are channels-last; torch's convolutions want channels first.
        return self.layers(images.permute(0, 3, 1, 2))

    def loss(self, images, labels, eval: bool = False):  # noqa: A002 (pfl's keyword)
        self.train(not eval)
        return nn.functional.cross_entropy(self(images), labels)

    @torch.no_grad()
    def metrics(self, images, labels, eval: bool = True):  # noqa: A002
        self.train(not eval)
        logits = self(images)
        return {"loss": Weighted(nn.functional.cross_entropy(logits, labels, reduction="sum")
                                 .item(), len(labels)),
                "accuracy": Weighted((logits.argmax(-1) == labels).sum().item(), len(labels))}


def federated_dataset(users: int, examples: int, seed: int) -> FederatedDataset:
    """Random users held as torch tensors, each user a view into one array (no copies)."""
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(
        rng.standard_normal((users, examples) + IMAGE_SHAPE, dtype=np.float32))
    labels = torch.from_numpy(rng.integers(0, CLASSES, (users, examples)))
    return FederatedDataset(
        lambda user: Dataset(raw_data=[images[user], labels[user]], user_id=user),
        get_user_sampler("random", list(range(users))))


class RoundTimer(TrainingProcessCallback):
    """Wall seconds of each central iteration, printed as a JSON line as it ends."""

    def __init__(self, warmup: int, out):
        self.warmup, self.out, self.seconds = warmup, out, []

    def on_train_begin(self, *, model) -> Metrics:
        self.started = time.perf_counter()
        return Metrics()

    def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
        now = time.perf_counter()
        self.seconds.append(now - self.started)
        print(json.dumps({"workload": WORKLOAD, "round": central_iteration,
                          "warmup": central_iteration < self.warmup,
                          "round_s": self.seconds[-1], "load": os.getloadavg()[0]}),
              file=self.out, flush=True)
        self.started = now
        return False, Metrics()


def run_rounds(args) -> list[float]:
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)  # pfl's random user sampler draws from numpy's global state
    data = federated_dataset(args.users, args.examples, args.seed)
    network = SimpleCNN()
    model = PyTorchModel(model=network, local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.SGD(network.parameters(),
                                                           CENTRAL_LEARNING_RATE))
    backend = SimulatedBackend(
        training_data=data, val_data=data,
        postprocessors=[WeightByUser(), NoPrivacy(), CentrallyAppliedPrivacyMechanism(NoPrivacy())])
    rounds = args.warmup + args.repeats
    algorithm_params = NNAlgorithmParams(
        central_num_iterations=rounds,
        evaluation_frequency=rounds,  # evaluates in iteration 0 only: a warm-up round
        train_cohort_size=args.cohort, val_cohort_size=0)
    train_params = NNTrainHyperParams(local_learning_rate=LOCAL_LEARNING_RATE,
                                      local_num_epochs=LOCAL_EPOCHS,
                                      local_batch_size=LOCAL_BATCH)
    timer = RoundTimer(args.warmup, sys.stdout)
    with contextlib.redirect_stdout(sys.stderr):
        FederatedAveraging().run(algorithm_params=algorithm_params, backend=backend,
                                 model=model, model_train_params=train_params,
                                 model_eval_params=NNEvalHyperParams(local_batch_size=10000),
                                 callbacks=[timer])
    return timer.seconds[args.warmup:]


def cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed rounds first (at least 1: iteration 0 evaluates)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--users", type=int, default=USERS)
    parser.add_argument("--examples", type=int, default=EXAMPLES_PER_USER)
    parser.add_argument("--cohort", type=int, default=COHORT)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.repeats < 1:
        parser.error("--warmup and --repeats must be at least 1")
    torch.set_num_threads(args.threads)
    print(f"# {cpu_name()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), pfl "
          f"{pfl.__version__}, numpy {np.__version__}; load average at start "
          f"{os.getloadavg()}")
    print(f"# workload {WORKLOAD}: clients={args.cohort} examples={args.examples} "
          f"batch={LOCAL_BATCH} shape={'x'.join(map(str, IMAGE_SHAPE))} classes={CLASSES} "
          f"lr={LOCAL_LEARNING_RATE} users={args.users}", flush=True)
    seconds = run_rounds(args)
    print(json.dumps({"workload": WORKLOAD, "pfl_round_s": statistics.median(seconds),
                      "best_s": min(seconds), "rounds": len(seconds),
                      "load": os.getloadavg()[0]}), flush=True)


if __name__ == "__main__":
    main()
