"""The PyTorch per-client loops behind the CNN and text targets, for a same-machine comparison.

How the PyTorch simulators (FedML, PFLlib, FL-bench) run a FedAvg round: for each client, load the
global weights, run its local SGD steps, collect the weights; then average. Workloads:

- `cnn-10`, `cnn-100`: the `cnn-*` rows of `benchmarks.throughput`: the FEMNIST CNN, 200 random
  28x28 examples per client, batch 20, one epoch (10 steps), learning rate 0.1, float32.
- `cifar-50`: the `cifar-50*` rows of `benchmarks.throughput`, pfl-research's CIFAR-10 benchmark
  (`benchmarks.pfl_reference` runs it through pfl itself): its `simple_cnn` (two 3x3 VALID
  convolutions, max-pool, dropout 0.25, dense 128, dropout 0.5; Glorot-uniform weights, dropout
  on in training), 50 clients of 50 random 32x32x3 images, batch 10, one epoch (5 steps),
  learning rate 0.1.
- `char-10`, `so-10`: the rows of `benchmarks.text_throughput` (which runs this script in a
  PyTorch environment and checks that the shapes printed on the `# workload` lines are its own):
  the Shakespeare character LSTM (Embedding(80, 8), LSTM(256) x 2, Linear(80)) and the Stack
  Overflow LSTM of Reddi et al. (Embedding(10004, 96), LSTM(670), Linear(96), Linear(10004)) on
  random token sequences, loss the mean token cross-entropy. `nn.LSTM` has two bias vectors
  where fedjax_lab's LSTM has one (the same function; 4H more parameters).

Needs PyTorch, which fedjax_lab does not depend on (install it in a separate environment):

    python -m benchmarks.torch_reference [--workloads cnn-10 cnn-100 cifar-50] [--repeats 5] \
        [--threads 2]
"""

import argparse
import statistics
import time
from typing import Callable, NamedTuple

import torch
from torch import nn


class Workload(NamedTuple):
    build: Callable[[], nn.Module]
    clients: int
    examples: int
    batch_size: int
    learning_rate: float
    example_shape: tuple[int, ...]   # an image, or a sequence length
    classes: int                     # label classes, or the vocabulary
    tokens: bool                     # token sequences with next-token targets


def femnist_cnn(num_classes: int = 62) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(3136, 2048), nn.ReLU(), nn.Linear(2048, num_classes))


def cifar_cnn(num_classes: int = 10) -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Dropout(0.25), nn.Flatten(), nn.Linear(12544, 128), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(128, num_classes))
    for layer in model:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(layer.weight)  # pfl-research's initialisation
    return model


class CharLSTM(nn.Module):
    def __init__(self, vocab_size: int = 80, embed: int = 8, hidden: int = 256, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=layers, batch_first=True)
        self.out = nn.Linear(hidden, vocab_size)

    def forward(self, x):
        return self.out(self.lstm(self.embed(x))[0])


class WordLSTM(nn.Module):
    def __init__(self, vocab_size: int = 10004, embed: int = 96, hidden: int = 670,
                 projection: int = 96):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.projection = nn.Linear(hidden, projection)
        self.out = nn.Linear(projection, vocab_size)

    def forward(self, x):
        return self.out(self.projection(self.lstm(self.embed(x))[0]))


WORKLOADS = {
    "cnn-10": Workload(femnist_cnn, 10, 200, 20, 0.1, (1, 28, 28), 62, False),
    "cnn-100": Workload(femnist_cnn, 100, 200, 20, 0.1, (1, 28, 28), 62, False),
    "cifar-50": Workload(cifar_cnn, 50, 50, 10, 0.1, (3, 32, 32), 10, False),
    "char-10": Workload(CharLSTM, 10, 50, 10, 1.0, (80,), 80, True),
    "so-10": Workload(WordLSTM, 10, 48, 16, 0.3, (20,), 10004, True),
}


def fedavg_round(model: nn.Module, global_state: dict, data, learning_rate: float,
                 batch_size: int) -> dict:
    loss_fn = nn.CrossEntropyLoss()
    total = {name: torch.zeros_like(value) for name, value in global_state.items()}
    for x, y in data:
        model.load_state_dict(global_state)
        optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate)
        order = torch.randperm(x.shape[0])
        for start in range(0, x.shape[0], batch_size):
            index = order[start:start + batch_size]
            optimizer.zero_grad()
            logits = model(x[index])
            # Sequences: the mean over every token of the batch.
            loss_fn(logits.reshape(-1, logits.shape[-1]), y[index].reshape(-1)).backward()
            optimizer.step()
        for name, value in model.state_dict().items():
            total[name] += value
    return {name: value / len(data) for name, value in total.items()}


def client_data(w: Workload):
    if w.tokens:
        return [(torch.randint(0, w.classes, (w.examples,) + w.example_shape),
                 torch.randint(0, w.classes, (w.examples,) + w.example_shape))
                for _ in range(w.clients)]
    return [(torch.randn((w.examples,) + w.example_shape),
             torch.randint(0, w.classes, (w.examples,))) for _ in range(w.clients)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=["cnn-10", "cnn-100"],
                        choices=list(WORKLOADS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.workloads:
        w = WORKLOADS[name]
        print(f"# workload {name}: clients={w.clients} examples={w.examples} "
              f"batch={w.batch_size} shape={'x'.join(map(str, w.example_shape))} "
              f"classes={w.classes} lr={w.learning_rate}")
    print("| workload | torch_loop_round_s (median) | best |")
    print("|---|---|---|", flush=True)
    for name in args.workloads:
        w = WORKLOADS[name]
        torch.manual_seed(0)
        model = w.build()
        state = {key: value.clone() for key, value in model.state_dict().items()}
        data = client_data(w)
        fedavg_round(model, state, data, w.learning_rate, w.batch_size)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fedavg_round(model, state, data, w.learning_rate, w.batch_size)
            times.append(time.perf_counter() - start)
        print(f"| {name} | {statistics.median(times):.4g} | {min(times):.4g} |", flush=True)


if __name__ == "__main__":
    main()
