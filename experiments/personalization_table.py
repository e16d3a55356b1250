"""The personalisation table: every personalised algorithm of the registry on one skewed data set.

The table PFLlib and FL-bench report: per method, the mean client test accuracy and the mean of
the worst 10% of clients (mean ± std over seeds), with the view scored. No paper claim is tested;
the record is the table itself, plus one sanity check (personalised methods beat FedAvg's global
model on this pathologically skewed data).

Setting: scikit-learn's digits over 20 clients, 2 label-sorted shards per client (so 1-2 classes
each; McMahan et al.'s pathological split), drawn once (data seed 0); 20% of each client's
examples held out for its test split. One model for all: split_mlp (64 -> 64 -> 32 extractor,
linear head), so the methods that need an extractor and a head run on the same network as the
others. 10 clients per round (50%), the same rounds and cohorts for every method (same seeds).
Every method runs at its registry defaults (`fedjax-lab list NAME`); none was changed, so local
work per round differs across methods as their papers set it (pFedHN: 50 epochs of batch 64;
FedRep: 10 head epochs + 1 body epoch at lr 0.01; ...). Each row names its registry config.

Views (fedjax_lab.evaluation): "personal" is the algorithm's `predict` (each client's personal
model, mixture, cluster or generated model); "global" is FedAvg's global model; "adapted" scores
each client after it adapts on its own training split (FedBABU's head fine-tuning, Per-FedAvg's
one step of alpha); "fine_tuned" is FedAvg+FT: FedAvg's final global model fine-tuned by each
client for 5 epochs of SGD (lr 0.05, B = 10, FedAvg's client optimiser) on its training split.
Local: Ditto with lam = 0 (its only change from the defaults), whose personal models are each
client's own training only (Ditto's client job, 5 epochs of SGD, on the rounds the client is
sampled), scored on the personal view; the registry has no other local-only option that needs no
code (LG-FedAvg/FedPer always share a part).

Each method's seeds run as one compiled program: whole runs `vmap`ped over a leading run axis
(`fedjax_lab.stacked.StackedRuns`, every round in one call), evaluated once at the end by its
sweep evaluator (personal, global and adapted views); FedAvg+FT is scored per seed by
`make_evaluator` with `FineTuning` (the sweep evaluator has no fine-tuning view).
Local (ditto, lam 0) shares Ditto's program structure and runs in the same program as Ditto.

Observed (defaults, 60 rounds): APFL's learned alpha_i fell to 0 (seed 0, inspected by hand: 18
of 20 clients at 0, the other two <= 0.009; seeds 1 and 2 not inspected), so its mixture is
FedAvg's global model and its numbers equal FedAvg's in every recorded statistic of every seed;
the default alpha_lr 0.01 was kept (a fixed alpha would be a changed default).
Default run: 60 rounds, 3 seeds, 4-5.5 minutes on two shared CPU cores, mostly compilation.

    python -m experiments.personalization_table [--rounds 60] [--seeds 0 1 2] [--output DIR]
"""

import os
import time

import jax
import numpy as np
import optax

from experiments.claims import Check, Claim, Measured, print_claims, seeds_text
from experiments.common import (experiment_parser, mean_std, parse_args, pyplot, save_figure,
                                start, write_results)
from fedjax_lab import config as run_config
from fedjax_lab.core.types import experiment_key
from fedjax_lab.evaluation import FineTuning, make_evaluator
from fedjax_lab.models import split_mlp
from fedjax_lab.stacked import StackedRuns

SETTINGS = dict(num_clients=20, shards_per_client=2, cohort_size=10, data_seed=0,
                model="split_mlp", hidden=(64, 32), test_fraction=0.2, fine_tuning_epochs=5,
                fine_tuning_lr=0.05, fine_tuning_batch_size=10)

# name -> (registry algorithm, options changed from its defaults, view scored).
METHODS = {
    "fedavg": ("fedavg", {}, "global"),   # FedAvg's predict is its global model
    "fedavg_ft": ("fedavg", {}, "fine_tuned"),
    "local": ("ditto", {"lam": 0.0}, "personal"),
    "fedper": ("fedper", {}, "personal"),
    "lg_fedavg": ("lg_fedavg", {}, "personal"),
    "fedrep": ("fedrep", {}, "personal"),
    "fedbabu": ("fedbabu", {}, "adapted"),
    "apfl": ("apfl", {}, "personal"),
    "pfedme": ("pfedme", {}, "personal"),
    "ifca": ("ifca", {}, "personal"),
    "ditto": ("ditto", {}, "personal"),
    "fedamp": ("fedamp", {}, "personal"),
    "pfedhn": ("pfedhn", {}, "personal"),
    "fedproto": ("fedproto", {}, "personal"),
    "perfedavg": ("perfedavg", {}, "adapted"),
}
LABELS = {"fedavg": "FedAvg", "fedavg_ft": "FedAvg+FT", "local": "Local (Ditto λ=0)",
          "fedper": "FedPer", "lg_fedavg": "LG-FedAvg", "fedrep": "FedRep", "fedbabu": "FedBABU",
          "apfl": "APFL", "pfedme": "pFedMe", "ifca": "IFCA", "ditto": "Ditto", "fedamp": "FedAMP",
          "pfedhn": "pFedHN", "fedproto": "FedProto", "perfedavg": "Per-FedAvg"}
# Not personalised: the sanity check compares the others against FedAvg's global model.
BASELINES = ("fedavg", "fedavg_ft", "local")


def algorithm_config(method: str) -> dict:
    """The registry config (`algorithm` section) of a row."""
    name, overrides, _ = METHODS[method]
    return {"name": name, **overrides}


def config_for(algorithm: dict, rounds: int, seed: int, settings: dict) -> run_config.Config:
    """The whole run's config, validated (a wrong option fails before anything runs)."""
    return run_config.config_from_dict({
        "algorithm": algorithm,
        "data": {"name": "digits", "num_clients": settings["num_clients"], "partition": "shards",
                 "shards_per_client": settings["shards_per_client"],
                 "test_fraction": settings["test_fraction"]},
        "model": {"name": settings["model"], "hidden": list(settings["hidden"])},
        "run": {"rounds": rounds, "cohort_size": settings["cohort_size"], "seed": seed,
                "data_seed": settings["data_seed"], "eval_every": rounds}})


def train_and_evaluate(configs: list, dataset, rounds: int):
    """Runs `configs` (one structure) as stacked runs over every round; returns the final
    stacked states and each run's evaluation (personal, global and adapted views)."""
    runs = StackedRuns(configs, dataset)
    states, _ = runs.advance(runs.init(), jax.device_put(dataset.train.pad()), rounds)
    evaluate = runs.evaluator(dataset.test.pad(), train_clients=dataset.train.pad())
    return states, evaluate(states)


def _view(evaluation: dict, view: str) -> dict:
    """One view of an evaluation; "global" of an algorithm without a personal model (FedAvg,
    whose `predict` is the global model) is its top level."""
    if view == "personal" or (view == "global" and "global" not in evaluation):
        return evaluation
    return evaluation[view]


def _scores(evaluation: dict) -> dict:
    return {"mean": evaluation["client_accuracy_mean"],
            "worst10": evaluation["client_accuracy_worst10"],
            "p10": evaluation["client_accuracy_p10"], "pooled": evaluation["accuracy"]}


def fine_tuned(states, configs, dataset, settings: dict) -> list[dict]:
    """FedAvg+FT per seed: each run's final global model fine-tuned on every client's training
    split, scored on its test split (`make_evaluator`'s fine-tuned view)."""
    model = split_mlp(dataset.feature_shape, dataset.num_classes, hidden=settings["hidden"])
    tuning = FineTuning(model, optax.sgd(settings["fine_tuning_lr"]),
                        num_epochs=settings["fine_tuning_epochs"],
                        batch_size=settings["fine_tuning_batch_size"])
    out = []
    for index, config in enumerate(configs):
        traced = run_config.traced_algorithm(config, dataset.info())
        state = jax.tree.map(lambda leaf: leaf[index], states)
        evaluation = make_evaluator(traced, dataset.test.pad(), experiment_key(config.run.seed),
                                    train_clients=dataset.train.pad(), fine_tuning=tuning)(state)
        out.append(evaluation["fine_tuned"])
    return out


def run(rounds: int = 60, seeds=(0, 1, 2), output: str = "results/personalization_table", *,
        methods=None, settings: dict | None = None) -> dict:
    """Every method of `methods` (default: all of METHODS) under every seed; writes
    results.json and personalization_table.png."""
    methods = tuple(METHODS) if methods is None else tuple(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; expected some of {', '.join(METHODS)}")
    settings = {**SETTINGS, **(settings or {})}
    seeds, started = start(output, seeds)
    dataset = run_config.load_data(config_for({"name": "fedavg"}, rounds, seeds[0], settings))
    # Rows sharing a trained program: FedAvg+FT scores FedAvg's runs, Local is Ditto with lam 0.
    programs = {}
    for method in methods:
        trained = "fedavg" if method == "fedavg_ft" else method
        programs.setdefault("ditto" if trained == "local" else trained, set()).add(method)
    table, seconds = {}, {}
    for program, rows in programs.items():
        # Local and Ditto differ only in lam (traced), so their seeds stack into one program.
        trained = sorted({"fedavg" if r == "fedavg_ft" else r for r in rows})
        points = [(m, seed) for m in trained for seed in seeds]
        configs = [config_for(algorithm_config(m), rounds, seed, settings) for m, seed in points]
        tic = time.perf_counter()
        states, evaluations = train_and_evaluate(configs, dataset, rounds)
        for method in rows:
            name = "fedavg" if method == "fedavg_ft" else method
            index = [i for i, (m, _) in enumerate(points) if m == name]
            view = METHODS[method][2]
            if method == "fedavg_ft":
                chosen = fine_tuned(jax.tree.map(lambda leaf: leaf[np.asarray(index)], states),
                                    [configs[i] for i in index], dataset, settings)
            else:
                chosen = [_view(evaluations[i], view) for i in index]
            runs = {str(seed): _scores(e) for seed, e in zip(seeds, chosen)}
            table[method] = {
                "config": algorithm_config(method), "view": view, "runs": runs,
                "summary": {key: mean_std([r[key] for r in runs.values()])
                            for key in ("mean", "worst10", "p10", "pooled")}}
        seconds[program] = time.perf_counter() - tic
        print(f"{program} ({', '.join(sorted(rows))}): {seconds[program]:.1f} s", flush=True)
    results = {
        "settings": {
            **settings, "hidden": list(settings["hidden"]), "rounds": rounds, "seeds": seeds,
            "data": "digits", "partition": f"{settings['shards_per_client']} label-sorted shards "
                    "per client (pathological label skew)",
            "metadata": {k: v for k, v in dataset.metadata.items() if k != "deviations"},
            "train_examples_per_client": [int(n) for n in dataset.train.num_examples],
            "test_examples_per_client": [int(n) for n in dataset.test.num_examples],
            "seeds_vary": "training only (initial model, cohorts, shuffles), not the data",
            "worst10": "mean test accuracy of the worst ceil(10%) of clients",
            "p10": "10th percentile of client test accuracy",
            "accuracy": "final round, never best-of-run",
            "defaults": "every method at its registry defaults; Local is ditto with lam 0",
            "views": {"personal": "the algorithm's predict", "global": "the global model",
                      "adapted": "after adapting on the client's training split",
                      "fine_tuned": "FedAvg's global model fine-tuned for fine_tuning_epochs "
                                    "of SGD on the client's training split"},
            "compiled": "each program's seeds (and Ditto with Local) vmapped as one program",
            "program_seconds": seconds},
        "methods": {method: table[method] for method in methods}}
    write_results(output, results, started)
    plot(results, os.path.join(output, "personalization_table.png"))
    return results


def plot(results: dict, path: str) -> None:
    """Bars of mean and worst-10% client accuracy per method (mean ± std over seeds)."""
    plt = pyplot()
    table = results["methods"]
    methods = [m for m in METHODS if m in table]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(methods) + 2), 4.8))
    positions = np.arange(len(methods))
    width = 0.38
    for offset, key, label in ((-width / 2, "mean", "mean"), (width / 2, "worst10", "worst 10%")):
        ax.bar(positions + offset, [table[m]["summary"][key]["mean"] for m in methods], width,
               yerr=[table[m]["summary"][key]["std"] for m in methods], capsize=3, label=label)
    ax.set_xticks(positions, [f"{LABELS[m]}\n[{table[m]['view']}]" for m in methods],
                  rotation=45, ha="right", fontsize=8)
    ax.set(ylabel="client test accuracy", ylim=(0, 1.05))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower right")
    s = results["settings"]
    fig.suptitle(f"digits, {s['num_clients']} clients, {s['shards_per_client']} label shards "
                 f"each, split_mlp, {s['cohort_size']} per round, {s['rounds']} rounds; seeds "
                 f"{s['seeds']} (bars: mean ± std)", fontsize=10)
    save_figure(fig, path)


def measure_table(results: dict) -> Measured:
    s, table = results["settings"], results["methods"]
    order = [m for m in METHODS if m in table]  # results.json stores its keys sorted
    row = lambda m: (f"{LABELS[m]} [{table[m]['view']}] "
                     f"{table[m]['summary']['mean']['mean']:.3f} ± "
                     f"{table[m]['summary']['mean']['std']:.3f} "
                     f"({table[m]['summary']['worst10']['mean']:.3f} ± "
                     f"{table[m]['summary']['worst10']['std']:.3f})")
    numbers = ["mean (worst-10%) client accuracy [view]: " + "; ".join(row(m) for m in order)]
    fedavg = table["fedavg"]["summary"]["mean"]["mean"]
    personal = [m for m in order if m not in BASELINES]
    checks = [Check(f"{LABELS[m]}: mean > FedAvg's global model's", table[m]["summary"]["mean"]
                    ["mean"] > fedavg) for m in personal]
    setting = (f"digits, {s['num_clients']} clients, {s['shards_per_client']} label-sorted shards "
               f"each (data seed {s['data_seed']}), split_mlp {tuple(s['hidden'])}, "
               f"{s['cohort_size']} per round, {s['rounds']} rounds, every method at its "
               f"registry defaults; Local = Ditto with λ = 0; FedAvg+FT = "
               f"{s['fine_tuning_epochs']} epochs of local SGD from FedAvg's model; "
               f"{seeds_text(s)}")
    return Measured(setting, numbers, checks)


CLAIMS = (
    Claim("Personalisation table", "No paper claim: the table is the record. "
          "Sanity check: on pathologically label-skewed data every personalised method's mean "
          "client accuracy beats FedAvg's global model.",
          ("personalization_table.png",), measure_table),
)


def main(argv=None) -> None:
    parser = experiment_parser(__doc__, rounds=60, seeds=[0, 1, 2],
                               output="results/personalization_table")
    parser.add_argument("--methods", nargs="+", default=None, choices=list(METHODS))
    args = parse_args(parser, argv)
    print_claims(CLAIMS, run(args.rounds, args.seeds, args.output, methods=args.methods))


if __name__ == "__main__":
    main()
