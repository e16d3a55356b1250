"""How a FedAvg round's cost grows with the cohort and with the clients' data, per client
execution strategy, and whether "auto" picks the fastest one.

    python -m benchmarks.scaling [--models logreg mlp cnn] [--repeats 3] [--max-seconds 30]
                                 [--cohorts 200 500]

Each row is `benchmarks.throughput.measure` of one workload (random data generated on the device,
plain SGD clients, batch 10 (20 for the CNN), the throughput workloads' epochs) under one
`ClientExecution`: seconds per round (median of `--repeats` jitted rounds after a warm-up) and
XLA's memory analysis of the round (arguments + outputs + temporaries). The candidates are every
strategy that can run the cohort on one device: "vmap", "chunked" (100 clients per chunk for the
dense models, above 100 clients; chunks of 10 unrolled for the CNN, "auto"'s own pick there), "sequential" and,
for the CNN, "unrolled" (one program holding every client, so compile time grows with the
cohort; up to 50 clients). A strategy whose round took more than `--max-seconds` is not
measured again at a larger cohort of that model. `--cohorts` replaces the table's rows by a
growing cohort of those sizes at each model's usual data (the CNN's 200 and 500 clients, whose
rounds take minutes, are measured this way rather than by default). Then one line per setting: "auto"'s pick, the
fastest candidate, and auto's time over the fastest's.
"""

import argparse
import os

from benchmarks.throughput import Workload, cpu_name, measure
from fedjax_lab.core import ClientExecution
from fedjax_lab.models import femnist_cnn, logistic_regression, mlp

DENSE_CHUNK = 100
UNROLLED_LIMIT = 50


def settings(models, cohorts=None) -> list[tuple[str, object, int, int, int, int]]:
    """(label, model, clients, examples, batch, epochs): the cohort grows at fixed data, then the
    data at a fixed cohort; or, with `cohorts`, those cohorts at the fixed data only."""
    table = {
        "logreg": (logistic_regression((60,), 10), 10, 2,
                   [(c, 100) for c in (10, 100, 1000, 10000)] + [(1000, 50), (1000, 400)]),
        "mlp": (mlp((784,), 10, hidden=(200, 200)), 10, 2,
                [(c, 100) for c in (10, 100, 1000)] + [(100, 50), (100, 400)]),
        "cnn": (femnist_cnn((28, 28), 62), 20, 1,
                [(c, 200) for c in (10, 50, 100)] + [(10, 100), (10, 400)]),
    }
    if cohorts:
        table = {name: (model, batch, epochs, [(c, sizes[0][1]) for c in cohorts])
                 for name, (model, batch, epochs, sizes) in table.items()}
    return [(name, model, clients, examples, batch, epochs)
            for name in models for model, batch, epochs, sizes in [table[name]]
            for clients, examples in sizes]


def candidates(name: str, clients: int) -> list[ClientExecution]:
    if name == "cnn":
        chosen = [ClientExecution("chunked", 10, chunk_strategy="unrolled"),
                  ClientExecution("sequential")]
        if clients <= UNROLLED_LIMIT:
            chosen.append(ClientExecution("unrolled"))
        if clients <= 10:
            chosen.append(ClientExecution("vmap"))
        return chosen
    chunked = [ClientExecution("chunked", DENSE_CHUNK)] if clients > DENSE_CHUNK else []
    return [ClientExecution("vmap"), *chunked, ClientExecution("sequential")]


def label(execution: ClientExecution) -> str:
    if execution.strategy == "chunked":
        return f"chunked {execution.chunk_size} ({execution.chunk_strategy})"
    return execution.strategy


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["logreg", "mlp", "cnn"],
                        choices=["logreg", "mlp", "cnn"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=30.0)
    parser.add_argument("--cohorts", type=int, nargs="+",
                        help="cohort sizes to measure instead of the table's rows")
    args = parser.parse_args(argv)
    print(f"# {cpu_name()}, {os.cpu_count()} CPUs; load average at start {os.getloadavg()}",
          flush=True)
    print("| model | clients | examples | execution | round s | compile s | XLA MiB |")
    print("|---|---|---|---|---|---|---|", flush=True)
    too_slow: set[tuple[str, str]] = set()
    verdicts = []
    for name, model, clients, examples, batch, epochs in settings(args.models, args.cohorts):
        times = {}
        for execution in [ClientExecution()] + candidates(name, clients):
            if (name, label(execution)) in too_slow:
                continue
            w = Workload(f"{name}-{clients}", model, clients, examples, batch, epochs, execution)
            row = measure(w, args.repeats, scan_rounds=0, references=False)
            print(f"| {name} | {clients} | {examples} | {row['execution']} | "
                  f"{row['round_s']:.4g} | {row['compile_s']:.3g} | {row['memory_mib']:.4g} |",
                  flush=True)
            if execution.strategy == "auto":
                auto = row
            else:
                times[label(execution)] = row["round_s"]
                if row["round_s"] > args.max_seconds:
                    too_slow.add((name, label(execution)))
        fastest = min(times, key=times.get)
        verdicts.append(f"| {name} | {clients} | {examples} | {auto['execution']} | {fastest} | "
                        f"{auto['round_s'] / times[fastest]:.2f} |")
    print("\n| model | clients | examples | auto's pick | fastest candidate | auto / fastest |")
    print("|---|---|---|---|---|---|")
    print("\n".join(verdicts), flush=True)


if __name__ == "__main__":
    main()
