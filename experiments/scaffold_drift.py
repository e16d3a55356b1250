"""SCAFFOLD against client drift: rounds to a target training loss under label skew and IID.

Reference: Karimireddy, Kale, Mohri, Reddi, Stich, Suresh. "SCAFFOLD: Stochastic Controlled
Averaging for Federated Learning." ICML 2020, arXiv 1910.06378 (Section 7: logistic regression
on EMNIST). The claim tested, as this experiment was asked to test it (ALGORITHMS.md has no
SCAFFOLD section, and the paper's figures were not re-read offline): under strong label skew with
many local steps SCAFFOLD reaches a target training loss in fewer rounds than FedAvg and FedProx
(client drift); on IID data the three coincide (no drift to correct).

Setting: scikit-learn's digits over 50 clients, two partitions drawn once (data seed 0):
pathological label skew (2 label-sorted shards per client, so 1-2 classes each; McMahan et al.)
and IID; every client holds 28 training examples. Multinomial logistic regression (64 -> 10),
10 clients per round (20%), E = 20 local epochs of batch-10 SGD (60 steps per client per round:
the regime where drift matters). Methods, all registry configs run under the same seeds (so the
same cohorts and shuffles): FedAvg, FedProx (mu from MU_GRID, the best per partition kept) and
SCAFFOLD (option II, eta_g = 1). Every method uses one client rate, tuned once for FedAvg on the
label-skewed partition from LR_GRID (fewest rounds to the first target, mean over seeds; ties by
final training loss) and recorded in results.json. All three weight clients by examples (the
paper's SCAFFOLD averages uniformly; the clients here are of equal size, so the two coincide).

Measured: the global model's mean loss over all training examples after every round; rounds to
each of TARGETS = the first round at or below it (a seed that never reaches it counts as
rounds + 1, a lower bound); final test accuracy (pooled over the clients' test splits). Mean ±
std over seeds; the seeds vary the initial model, cohorts and shuffles, not the data. Each
method's seeds and grid values run as one compiled program: whole runs `vmap`ped over a leading
run axis (`fedjax_lab.stacked.StackedRuns`, as `fedjax_lab.sweep` runs them; the client rate and
mu are traced arguments), one round per call so that the training loss can be evaluated after
every round, which `fedjax_lab.sweep` does not do. A stacked run equals its config run alone by
`fedjax_lab.experiment.run_experiment` to float32 rounding (checked by hand: training losses
within 2e-8 relative, accuracies equal).

History (so that the choices are not read as tuned to pass): a pilot at rates 0.03-1 picked the
first target; the first full run used LR_GRID (0.1, 0.3, 1, 3) and MU_GRID (0.01, 0.1, 1). Both
best values fell on the grids' edges (FedAvg at 3; FedProx at 0.01, where it took 33.7 rounds on
the shards and 5.3 on IID against FedAvg's 19.7 and 4.0, failing the IID rule), so both grids
were extended (FedAvg's best, 3, is now inside; FedProx's best stays the smallest mu, as it must
where FedAvg, its mu = 0 limit, beats it). The second target was then added because the IID
curves part below ~0.15.

    python -m experiments.scaffold_drift [--rounds 100] [--seeds 0 1 2] [--output DIR]
"""

import os

import jax
import numpy as np

from experiments.claims import Check, Claim, Measured, pm, print_claims, seeds_text
from experiments.common import (band, experiment_parser, mean_std, parse_args, pyplot,
                                save_figure, start, write_results)
from fedjax_lab import config as run_config
from fedjax_lab.stacked import StackedRuns

SETTINGS = dict(num_clients=50, cohort_size=10, epochs=20, batch_size=10, data_seed=0,
                model="logistic")
PARTITIONS = {"shards": {"partition": "shards", "shards_per_client": 2},
              "iid": {"partition": "iid"}}
LR_GRID = (0.3, 1.0, 3.0, 10.0)
MU_GRID = (0.001, 0.01, 0.1, 1.0)
# Rounds are counted to each of these global training losses. The first (from a pilot at rates
# 0.03-1: a loss every method reached on both partitions) tunes the rate and mu; the second,
# stricter one was added after a full run showed the IID curves part below ~0.15.
TARGETS = (0.2, 0.1)
# "Coincide" on IID data: mean rounds to the target within this fraction of FedAvg's, or within
# one round where that is more (rounds are whole numbers).
IID_MARGIN = 0.25
METHODS = ("fedavg", "fedprox", "scaffold")


def algorithm_config(method: str, lr: float, epochs: int, batch_size: int,
                     mu: float | None = None) -> dict:
    """The registry config (`algorithm` section) of a method: its paper defaults changed by the
    shared local job and weighting (and FedProx's mu)."""
    config = {"name": method, "weighting": "num_examples",
              "client": {"lr": lr, "epochs": epochs, "batch_size": batch_size}}
    if method == "fedprox":
        config["mu"] = mu
    return config


def config_for(algorithm: dict, partition: str, rounds: int, seed: int,
               settings: dict) -> run_config.Config:
    """The whole run's config, validated (a wrong option fails before anything runs)."""
    return run_config.config_from_dict({
        "algorithm": algorithm,
        "data": {"name": "digits", "num_clients": settings["num_clients"],
                 **PARTITIONS[partition]},
        "model": {"name": settings["model"]},
        "run": {"rounds": rounds, "cohort_size": settings["cohort_size"], "seed": seed,
                "data_seed": settings["data_seed"], "eval_every": 1}})


def loss_curves(configs: list, dataset, rounds: int, eval_examples: int = 1) -> list[dict]:
    """Runs `configs` (one structure: they differ only in traced options and the seed) as
    stacked runs, one round per call; returns each run's curves: the global model's loss on all
    training data and its pooled test accuracy after every round.

    Evaluation pads the clients' examples to a multiple of `eval_examples` (masked, so the
    numbers do not change); one size for train and test compiles one evaluation program."""
    runs = StackedRuns(configs, dataset)
    population = jax.device_put(dataset.train.pad())
    evaluate_train = runs.evaluator(dataset.train.pad(eval_examples))
    evaluate_test = runs.evaluator(dataset.test.pad(eval_examples))
    states = runs.init()
    curves = [{"train_loss": [], "test_accuracy": []} for _ in configs]
    for _ in range(rounds):
        states, _ = runs.advance(states, population, 1)
        for curve, train, test in zip(curves, evaluate_train(states), evaluate_test(states)):
            curve["train_loss"].append(train["loss"])
            curve["test_accuracy"].append(test["accuracy"])
    return curves


def rounds_to_target(curve, target: float) -> int | None:
    """The first round (1-based) whose training loss is at most `target`, or None."""
    reached = np.flatnonzero(np.asarray(curve, np.float64) <= target)
    return int(reached[0]) + 1 if reached.size else None


def _rounds_to(runs: dict, rounds: int, target: float) -> dict:
    """Rounds to `target` over seeds: mean ± std with a miss counted as rounds + 1 (a lower
    bound), the per-seed values (None: missed) and whether every seed reached it."""
    reached = [rounds_to_target(run["train_loss"], target) for run in runs.values()]
    counted = [value or rounds + 1 for value in reached]
    return {**mean_std(counted), "values": reached, "all_reached": None not in reached}


def _record(runs: dict, rounds: int, targets) -> dict:
    """A setting's per-seed runs and their summary: rounds to each target, final training loss
    and final test accuracy, mean ± std over seeds."""
    return {"runs": runs, "summary": {
        "rounds_to_target": {f"{target:g}": _rounds_to(runs, rounds, target)
                             for target in targets},
        "final_train_loss": mean_std([run["train_loss"][-1] for run in runs.values()]),
        "final_test_accuracy": mean_std([run["test_accuracy"][-1] for run in runs.values()])}}


def _grid(method: str, values, seeds, datasets, rounds: int, settings: dict, targets,
          lr_of=None) -> dict:
    """`{partition: {value: record}}`: `method` at every grid value (the client rate, or mu at
    the rate `lr_of`) and seed, one program per partition."""
    out = {}
    for partition, dataset in datasets.items():
        points = [(value, seed) for value in values for seed in seeds]
        configs = [config_for(algorithm_config(
            method, value if lr_of is None else lr_of, settings["epochs"],
            settings["batch_size"], None if lr_of is None else value), partition, rounds, seed,
            settings) for value, seed in points]
        curves = loss_curves(configs, dataset, rounds, eval_examples(datasets))
        out[partition] = {}
        for value in values:
            runs = {str(seed): curve for (v, seed), curve in zip(points, curves) if v == value}
            out[partition][f"{value:g}"] = _record(runs, rounds, targets)
    return out


def eval_examples(datasets: dict) -> int:
    """The most examples any client holds in any split: one padded size for every evaluation."""
    return max(int(split.num_examples.max()) for dataset in datasets.values()
               for split in (dataset.train, dataset.test))


def local_steps(datasets: dict, epochs: int, batch_size: int) -> dict:
    """The fewest and most local steps a client takes per round, E * ceil(n_i / B)."""
    steps = [epochs * -(-int(n) // batch_size) for dataset in datasets.values()
             for n in dataset.train.num_examples]
    return {"min": min(steps), "max": max(steps)}


def _best(by_value: dict, target: float) -> str:
    """The grid value with the fewest rounds to `target` (mean over seeds, misses counted as
    rounds + 1), ties broken by the lower final training loss."""
    return min(by_value, key=lambda value: (
        by_value[value]["summary"]["rounds_to_target"][f"{target:g}"]["mean"],
        by_value[value]["summary"]["final_train_loss"]["mean"]))


def run(rounds: int = 100, seeds=(0, 1, 2), output: str = "results/scaffold_drift", *,
        epochs: int = SETTINGS["epochs"], lr_grid=LR_GRID, mu_grid=MU_GRID,
        targets=TARGETS) -> dict:
    """Tunes FedAvg's client rate on the label-skewed partition, runs every method at it on
    both partitions; writes results.json and scaffold_drift.png. `epochs` and the grids narrow
    the run for smoke tests."""
    seeds, started = start(output, seeds)
    settings = {**SETTINGS, "epochs": epochs}
    datasets = {partition: run_config.load_data(config_for(
        algorithm_config("fedavg", lr_grid[0], epochs, settings["batch_size"]), partition,
        rounds, seeds[0], settings)) for partition in PARTITIONS}
    targets = [float(target) for target in targets]
    fedavg = _grid("fedavg", lr_grid, seeds, datasets, rounds, settings, targets)
    lr = float(_best(fedavg["shards"], targets[0]))
    fedprox = _grid("fedprox", mu_grid, seeds, datasets, rounds, settings, targets, lr_of=lr)
    scaffold = _grid("scaffold", (lr,), seeds, datasets, rounds, settings, targets)
    results = {"settings": {
        **settings, "rounds": rounds, "seeds": seeds, "partitions": PARTITIONS,
        "target_train_losses": targets, "lr_grid": list(lr_grid), "mu_grid": list(mu_grid),
        "client_learning_rate": lr, "iid_margin": IID_MARGIN,
        "paper": "Karimireddy et al., ICML 2020, arXiv 1910.06378, Section 7",
        "train_loss": "the global model's mean cross-entropy over all training examples, "
                      "after every round",
        "test_accuracy": "pooled over the clients' test splits",
        "seeds_vary": "training only (initial model, cohorts, shuffles), not the data",
        "lr_tuning": "FedAvg on the shards partition, fewest rounds to the first target (mean "
                     "over seeds, misses as rounds + 1), ties by final training loss; FedProx's "
                     "mu likewise, per partition",
        "local_steps": local_steps(datasets, epochs, settings["batch_size"]),
        "deviations": ["digits and logistic regression instead of EMNIST; label-sorted shards "
                       "instead of the paper's similarity s%",
                       "FedAvg/FedProx/SCAFFOLD weight clients by examples (the paper: "
                       "uniformly; the clients here have equal sizes)",
                       "one client rate for every method, tuned for FedAvg (the paper tunes "
                       "each method)"]},
        "partitions": {}}
    batch_size = settings["batch_size"]
    for partition in PARTITIONS:
        mu = _best(fedprox[partition], targets[0])
        results["partitions"][partition] = {
            "metadata": {key: value for key, value in datasets[partition].metadata.items()
                         if key != "deviations"},
            "fedavg_lr_grid": fedavg[partition], "fedprox_mu_grid": fedprox[partition],
            "best_mu": float(mu),
            "methods": {
                "fedavg": {"config": algorithm_config("fedavg", lr, epochs, batch_size),
                           **fedavg[partition][f"{lr:g}"]},
                "fedprox": {"config": algorithm_config("fedprox", lr, epochs, batch_size,
                                                       float(mu)),
                            **fedprox[partition][mu]},
                "scaffold": {"config": algorithm_config("scaffold", lr, epochs, batch_size),
                             **scaffold[partition][f"{lr:g}"]}}}
    write_results(output, results, started)
    plot(results, os.path.join(output, "scaffold_drift.png"))
    return results


LABELS = {"fedavg": "FedAvg", "fedprox": "FedProx", "scaffold": "SCAFFOLD"}
PARTITION_LABELS = {"shards": "2 label shards/client", "iid": "IID"}


def plot(results: dict, path: str) -> None:
    """Training loss (log scale) and test accuracy per round, one column per partition; each
    method at the shared rate (FedProx at its best mu), mean over seeds with the min-max band."""
    plt = pyplot()
    s = results["settings"]
    parts = results["partitions"]
    fig, axes = plt.subplots(2, len(parts), figsize=(5.5 * len(parts), 8), squeeze=False)
    for col, (partition, entry) in enumerate(parts.items()):
        for row, (key, label) in enumerate((("train_loss", "training loss"),
                                            ("test_accuracy", "test accuracy"))):
            ax = axes[row, col]
            for method, record in entry["methods"].items():
                curves = [run[key] for run in record["runs"].values()]
                name = LABELS[method] + (f" (μ={entry['best_mu']:g})" if method == "fedprox"
                                         else "")
                band(ax, np.arange(1, len(curves[0]) + 1), curves, name)
            if key == "train_loss":
                ax.set_yscale("log")
                for target, style in zip(s["target_train_losses"], ("--", ":")):
                    ax.axhline(target, color="gray", linestyle=style, linewidth=1,
                               label=f"target {target:g}")
            ax.set(title=f"digits, {PARTITION_LABELS[partition]}: {label}", xlabel="round",
                   ylabel=label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"logistic regression, {s['num_clients']} clients, {s['cohort_size']} per "
                 f"round, E = {s['epochs']}, B = {s['batch_size']}, client lr "
                 f"{s['client_learning_rate']:g}; mean over seeds {s['seeds']}"
                 + (" (band: min-max)" if len(s["seeds"]) > 1 else ""))
    save_figure(fig, path)


def _rounds_text(stats: dict, rounds: int) -> str:
    bound = "" if stats["all_reached"] else "≥ "
    return f"{bound}{stats['mean']:.1f} ± {stats['std']:.1f}"


def _rule(parts: dict, target: str, margin: float) -> list[Check]:
    """The claim's rule at one target: on the label-skewed partition SCAFFOLD needs fewer rounds
    than FedAvg and FedProx (means over seeds); on IID the other two are within `margin` of
    FedAvg's rounds (or one round, where that is more)."""
    rounds = {partition: {method: entry["methods"][method]["summary"]["rounds_to_target"]
                          [target]["mean"] for method in METHODS}
              for partition, entry in parts.items()}
    skew, iid = rounds["shards"], rounds["iid"]
    return [
        Check(f"loss {target}, 2 shards: SCAFFOLD needs fewer rounds than FedAvg",
              skew["scaffold"] < skew["fedavg"]),
        Check(f"loss {target}, 2 shards: SCAFFOLD needs fewer rounds than FedProx (best μ)",
              skew["scaffold"] < skew["fedprox"]),
        Check(f"loss {target}, IID: FedProx's and SCAFFOLD's rounds within {margin:.0%} (or 1 "
              "round) of FedAvg's",
              all(abs(iid[m] - iid["fedavg"]) <= max(margin * iid["fedavg"], 1.0)
                  for m in ("fedprox", "scaffold")))]


def measure_scaffold(results: dict) -> Measured:
    s, parts = results["settings"], results["partitions"]
    targets = [f"{target:g}" for target in s["target_train_losses"]]
    numbers = []
    for partition in ("shards", "iid"):
        entry = parts[partition]
        summaries = {m: entry["methods"][m]["summary"] for m in METHODS}
        label = lambda m: LABELS[m] + (f"(μ={entry['best_mu']:g})" if m == "fedprox" else "")
        numbers.append(f"{PARTITION_LABELS[partition]}: " + "; ".join(
            f"rounds to loss {target}: " + ", ".join(
                f"{label(m)} {_rounds_text(summaries[m]['rounds_to_target'][target], s['rounds'])}"
                for m in METHODS) for target in targets)
            + "; final training loss: " + ", ".join(
                f"{label(m)} {pm(summaries[m]['final_train_loss'])}" for m in METHODS)
            + "; final test accuracy: " + ", ".join(
                f"{label(m)} {pm(summaries[m]['final_test_accuracy'])}" for m in METHODS))
    checks = [check for target in targets for check in _rule(parts, target, s["iid_margin"])]
    fewest, most = s["local_steps"]["min"], s["local_steps"]["max"]
    steps = f"{fewest}" if fewest == most else f"{fewest}-{most}"
    setting = (f"digits, {s['num_clients']} clients, 2 label shards each or IID (data seed "
               f"{s['data_seed']}), logistic regression, {s['cohort_size']} per round, E = "
               f"{s['epochs']}, B = {s['batch_size']} ({steps} local steps per client and "
               f"round), client lr {s['client_learning_rate']:g} "
               f"for all (FedAvg's best of {{{', '.join(f'{v:g}' for v in s['lr_grid'])}}}), "
               f"FedProx's best μ of {{{', '.join(f'{v:g}' for v in s['mu_grid'])}}}; targets: "
               f"global training loss {' and '.join(targets)} (the second added after a full run); "
               f"{s['rounds']} rounds, {seeds_text(s)}; ≥: a seed missed the target, "
               f"counted as {s['rounds'] + 1} rounds")
    return Measured(setting, numbers, checks)


CLAIMS = (
    Claim("SCAFFOLD", "Under strong label skew with many local steps, SCAFFOLD reaches a target "
          "training loss in fewer rounds than FedAvg and FedProx (it corrects client drift); on "
          "IID data the three coincide.",
          ("scaffold_drift.png",), measure_scaffold),
)


def main(argv=None) -> None:
    parser = experiment_parser(__doc__, rounds=100, seeds=[0, 1, 2],
                               output="results/scaffold_drift")
    args = parse_args(parser, argv)
    print_claims(CLAIMS, run(args.rounds, args.seeds, args.output))


if __name__ == "__main__":
    main()
