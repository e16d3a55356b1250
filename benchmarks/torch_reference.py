"""The PyTorch per-client loop behind issue 3's CNN targets, for a same-machine comparison.

How the PyTorch simulators (FedML, PFLlib, FL-bench) run a FedAvg round: for each client, load the
global weights, run its local SGD steps, collect the weights; then average. Same work as the
`cnn-10` and `cnn-100` rows of `benchmarks.throughput`: the FEMNIST CNN, 200 random 28x28
examples per client, batch 20, one epoch (10 steps), learning rate 0.1, float32.

Needs PyTorch, which fedjax_lab does not depend on (install it in a separate environment):

    python -m benchmarks.torch_reference [--clients 10 100] [--repeats 5] [--threads 2]
"""

import argparse
import statistics
import time

import torch
from torch import nn


def femnist_cnn(num_classes: int = 62) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(3136, 2048), nn.ReLU(), nn.Linear(2048, num_classes))


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
            loss_fn(model(x[index]), y[index]).backward()
            optimizer.step()
        for name, value in model.state_dict().items():
            total[name] += value
    return {name: value / len(data) for name, value in total.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = femnist_cnn()
    state = {name: value.clone() for name, value in model.state_dict().items()}
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| workload | torch_loop_round_s (median) | best |")
    print("|---|---|---|")
    for clients in args.clients:
        data = [(torch.randn(200, 1, 28, 28), torch.randint(0, 62, (200,)))
                for _ in range(clients)]
        fedavg_round(model, state, data, 0.1, 20)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fedavg_round(model, state, data, 0.1, 20)
            times.append(time.perf_counter() - start)
        print(f"| cnn-{clients} | {statistics.median(times):.4g} | {min(times):.4g} |",
              flush=True)


if __name__ == "__main__":
    main()
