"""FedAvg against FedSGD: rounds to a target test accuracy on scikit-learn's digits.

Reference: McMahan, Moore, Ramage, Hampson, Agüera y Arcas. "Communication-Efficient Learning of
Deep Networks from Decentralized Data." AISTATS 2017, arXiv 1602.05629 (ALGORITHMS.md section 1).

Setting (section 1e): digits over 20 clients, IID or pathological non-IID (2 label-sorted shards
per client), MLP 64-32-10, 5 clients per round, sample-weighted averaging. FedAvg runs E = 5 epochs
of batch-10 SGD per round; FedSGD one full-batch gradient (E = 1, B = infinity). Both take their
client learning rate from the same grid: for each method and partition the rate with the fewest
rounds to the target (mean over seeds; a seed that never reaches it within --rounds counts as
--rounds + 1) is kept. Rounds to target = the first round whose pooled test accuracy reaches
TARGET (evaluated every round). Each run is the registry's `fedavg` with that local work and
rate. Claim: FedAvg needs several-fold fewer rounds than FedSGD, with a
smaller but still > 1 speed-up under the pathological partition. Seeds vary the partition, the
initial model, cohorts and shuffles.

    python -m experiments.fedavg_fedsgd [--rounds 200] [--seeds 0 1 2] [--output DIR]
"""

import os

import numpy as np

from experiments.claims import Check, Claim, Measured, print_claims, seeds_text
from experiments.common import (Method, band, experiment_parser, mean_std, parse_args, pyplot,
                                registry_method, save_figure, start, sweep, write_results)
from fedjax_lab.data import digits
from fedjax_lab.experiment import run_experiment
from fedjax_lab.models import mlp

TARGET = 0.9
# FedSGD's best rate was the top of (0.05, 0.2, 0.5) in a first run, so the grid goes on to 2.
SETTINGS = dict(num_clients=20, cohort_size=5, hidden=(64, 32),
                learning_rates=(0.05, 0.2, 0.5, 1.0, 2.0), target=TARGET)
# Each method's local work, as options of the registry's `fedavg` client training.
METHODS = {"fedavg": {"epochs": 5, "batch_size": 10}, "fedsgd": {"epochs": 1, "batch_size": None}}
PARTITIONS = {"iid": {}, "shards": {"shards_per_client": 2}}


def rate_grid(local: dict, learning_rates) -> list[Method]:
    """FedAvg with the local work `local` at each client learning rate, named by the rate."""
    return [registry_method(f"{rate:g}", "fedavg", client={"lr": rate, **local})
            for rate in learning_rates]


def rounds_to_target(curve: list[float], target: float) -> int | None:
    """The first round (1-based) whose accuracy reaches `target`, or None."""
    reached = np.flatnonzero(np.asarray(curve) >= target)
    return int(reached[0]) + 1 if reached.size else None


def _counted(reached: list, rounds: int) -> list[int]:
    """Rounds to target with a miss counted as rounds + 1 (a lower bound on the true count)."""
    return [value or rounds + 1 for value in reached]


def run(rounds: int = 200, seeds=(0, 1, 2), output: str = "results/fedavg_fedsgd",
        learning_rates=SETTINGS["learning_rates"], partitions=tuple(PARTITIONS)) -> dict:
    """Every (partition, method, learning rate, seed); writes results.json and fedavg_fedsgd.png.

    `learning_rates` and `partitions` (names in PARTITIONS) narrow the grid for smoke tests.
    """
    seeds, started = start(output, seeds)
    results = {"settings": {**SETTINGS, "learning_rates": list(learning_rates), "rounds": rounds,
                            "seeds": seeds, "methods": METHODS, "partitions": PARTITIONS,
                            "accuracy": "pooled test accuracy, evaluated every round",
                            "paper": "McMahan et al., AISTATS 2017, arXiv 1602.05629"},
               "partitions": {}}
    for partition in partitions:

        def run_seed(method, seed):
            data = digits(SETTINGS["num_clients"], partition=partition, seed=seed,
                          **PARTITIONS[partition])
            model = mlp(data.feature_shape, data.num_classes, hidden=SETTINGS["hidden"])
            result = run_experiment(method.build(model, data.info()), data, num_rounds=rounds,
                                    seed=seed, eval_every=1, cohort_size=SETTINGS["cohort_size"],
                                    progress=False, allow_divergence=True)
            curve = [e["test"]["accuracy"] for e in result.evaluations]
            return {"test_accuracy": curve, "rounds_to_target": rounds_to_target(curve, TARGET)}

        methods = {}
        for method, local in METHODS.items():
            by_rate = {rate: {"runs": runs, "mean_rounds_counted": float(np.mean(_counted(
                          [r["rounds_to_target"] for r in runs.values()], rounds)))}
                       for rate, runs in sweep(rate_grid(local, learning_rates), seeds,
                                               run_seed).items()}
            best = min(by_rate, key=lambda rate: by_rate[rate]["mean_rounds_counted"])
            best_runs = by_rate[best]["runs"].values()
            reached = [r["rounds_to_target"] for r in best_runs]
            counted = _counted(reached, rounds)
            methods[method] = {
                "learning_rates": by_rate, "best_learning_rate": float(best),
                "rounds_to_target": {"counted_mean": float(np.mean(counted)),
                                     "counted_std": float(np.std(counted)), "values": reached,
                                     "all_reached": None not in reached},
                "final_test_accuracy": mean_std([r["test_accuracy"][-1] for r in best_runs])}
        fedavg_rounds = methods["fedavg"]["rounds_to_target"]["counted_mean"]
        fedsgd_rounds = methods["fedsgd"]["rounds_to_target"]["counted_mean"]
        results["partitions"][partition] = {
            "methods": methods,
            # A lower bound when FedSGD misses the target in some seed (counted as rounds + 1).
            "speedup": fedsgd_rounds / fedavg_rounds,
            "fedsgd_reached_in_every_seed": methods["fedsgd"]["rounds_to_target"]["all_reached"]}
    write_results(output, results, started)
    plot(results, os.path.join(output, "fedavg_fedsgd.png"))
    return results


def plot(results: dict, path: str) -> None:
    """Test accuracy per round at each method's best rate (mean over seeds, min-max band)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results["partitions"]), figsize=(11, 4.2), sharey=True,
                             squeeze=False)
    for ax, (partition, entry) in zip(axes[0], results["partitions"].items()):
        for method, result in entry["methods"].items():
            rate = f"{result['best_learning_rate']:g}"
            curves = [r["test_accuracy"] for r in result["learning_rates"][rate]["runs"].values()]
            band(ax, np.arange(1, len(curves[0]) + 1), curves, f"{method} (lr {rate})")
        ax.axhline(TARGET, color="gray", linestyle="--", linewidth=1, label=f"target {TARGET}")
        ax.set(title=f"digits, {partition}: speed-up {entry['speedup']:.1f}x", xlabel="round",
               ylabel="test accuracy", ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path)




def measure_fedavg(results: dict) -> Measured:
    s, parts = results["settings"], results["partitions"]
    numbers = []
    for name, label in (("iid", "IID"), ("shards", "2 shards/client")):
        part = parts[name]
        rounds = {m: part["methods"][m]["rounds_to_target"] for m in ("fedavg", "fedsgd")}
        # A miss counts as rounds + 1, so a FedSGD miss makes the speed-up a lower bound.
        bound = "" if rounds["fedsgd"]["all_reached"] else "≥ "
        missed = "" if rounds["fedavg"]["all_reached"] else " (FedAvg missed in some seed)"
        numbers.append(f"{label}: rounds to {s['target']:g}: FedAvg "
                       f"{rounds['fedavg']['counted_mean']:.1f} ± "
                       f"{rounds['fedavg']['counted_std']:.1f}, FedSGD "
                       f"{rounds['fedsgd']['counted_mean']:.1f} ± "
                       f"{rounds['fedsgd']['counted_std']:.1f}; speed-up "
                       f"{bound}{part['speedup']:.1f}×{missed}")
    iid, shards = parts["iid"]["speedup"], parts["shards"]["speedup"]
    checks = [Check("IID speed-up ≥ 2", iid >= 2), Check("2-shard speed-up > 1", shards > 1),
              Check("2-shard speed-up < IID speed-up", shards < iid)]
    setting = (f"digits, {s['num_clients']} clients, IID or 2 label shards each, MLP 64-32-10, "
               f"{s['cohort_size']} per round; FedAvg E = 5, B = 10 vs FedSGD (one full-batch "
               f"gradient), best lr of {{{', '.join(f'{r:g}' for r in s['learning_rates'])}}} "
               f"each; {s['rounds']} rounds, {seeds_text(s)}; a seed missing the target counts "
               f"as {s['rounds'] + 1} rounds")
    return Measured(setting, numbers, checks)


CLAIMS = (
    Claim("FedAvg", "FedAvg (E = 5, B = 10) reaches a target accuracy in several-fold fewer "
          "rounds than FedSGD; the speed-up is smaller under pathological non-IID data but still "
          "> 1.",
          ("fedavg_fedsgd.png",), measure_fedavg),
)


def main(argv=None) -> None:
    parser = experiment_parser(__doc__, rounds=200, seeds=[0, 1, 2],
                               output="results/fedavg_fedsgd")
    args = parse_args(parser, argv)
    print_claims(CLAIMS, run(args.rounds, args.seeds, args.output))


if __name__ == "__main__":
    main()
