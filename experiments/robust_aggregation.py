"""Robust aggregators under Ditto's three attacks, in a FedAvg round on digits.

References: Yin, Chen, Ramchandran, Bartlett, ICML 2018, arXiv 1803.01498 (coordinate median,
trimmed mean); Sun, Kairouz, Suresh, McMahan, arXiv 1911.07963 (norm clipping); attacks from
Li, Hu, Beirami, Smith, "Ditto", ICML 2021, arXiv 2012.04221 and its code (litian96/ditto).

Setting: the sklearn digits split IID over 20 clients, softmax regression, 10 clients per round,
FedAvg with E = 1 epoch of batch-10 SGD (step 0.1) and sample-weighted aggregation; 20 % of the
population (4 clients, the same for every method under a seed) is malicious:
- random_labels (A1): they train on uniformly random labels;
- gaussian (A2): they send N(0, sd^2) with sd the std of their true update's coordinates;
- scaled (A3): they train on random labels and boost their update by the cohort size (10), as
  Ditto's code does.
Aggregators: the weighted mean (FedAvg), the coordinate median, the 0.2-trimmed mean, and the mean
of updates clipped to the round's median norm. Reported: final pooled test accuracy of the global
model over every client's (clean) test data, mean and std over seeds.

Each method is `fedavg(model, optax.sgd(0.1), aggregator=..., attack=...)`, a factory call rather
than a registry config: the registry's FedAvg has no aggregator or attack option (an attack is a
simulation of malicious clients, drawn per seed, not an algorithm's option). The attack's seed is
a traced argument (`compiled.TracedAlgorithm`), so the seeds of an aggregator under an attack run
through one compiled program.

    python -m experiments.robust_aggregation [--rounds 50] [--seeds 0 1 2] [--output DIR]
"""

import os

import jax.numpy as jnp
import numpy as np
import optax

from experiments.claims import NEAR, Check, Claim, Measured, pm, print_claims, seeds_text
from experiments.common import (Method, choose, experiment_parser, mean_std, parse_args, pyplot,
                                save_figure, start, sweep, write_results)
from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.compiled import TracedAlgorithm, per_structure
from fedjax_lab.core.attacks import Attack
from fedjax_lab.core.robust import get_aggregator
from fedjax_lab.data import digits
from fedjax_lab.experiment import run_experiment
from fedjax_lab.models import logistic_regression

NUM_CLIENTS = 20
COHORT_SIZE = 10
MALICIOUS_FRACTION = 0.2
AGGREGATORS = {"mean": {}, "median": {}, "trimmed_mean": {"beta": 0.2},
               "clipped_mean": {"max_norm": "median"}}
ATTACKS = ("none", "random_labels", "gaussian", "scaled")
ATTACK_SEED = "attack.seed"


@per_structure
def attacked_fedavg(aggregator: str, attack: str, model, num_classes: int):
    """`build({ATTACK_SEED: seed})`: FedAvg with `aggregator`, its malicious clients attacking
    with `attack`, chosen (with their random labels) from the traced seed; one builder per
    structure, so every seed shares the compiled program."""

    def build(hyperparameters):
        return fedavg(model, optax.sgd(0.1), num_epochs=1, batch_size=10,
                      aggregator=get_aggregator(aggregator, **AGGREGATORS[aggregator]),
                      attack=Attack(attack, fraction=MALICIOUS_FRACTION, num_clients=NUM_CLIENTS,
                                    num_classes=num_classes, poison_labels=attack == "scaled",
                                    seed=hyperparameters[ATTACK_SEED]))

    return build


METHODS = tuple(
    Method(name, lambda model, num_classes, attack, seed, name=name: TracedAlgorithm(
        attacked_fedavg(name, attack, model, num_classes),
        {ATTACK_SEED: jnp.asarray(seed, jnp.int32)}))
    for name in AGGREGATORS)


def run(rounds: int = 50, seeds=(0,), output: str = "results/robust_aggregation", *,
        attacks=ATTACKS, aggregators=tuple(AGGREGATORS)) -> dict:
    """Every aggregator under every attack and seed; writes results.json and a PNG."""
    seeds, started = start(output, seeds)
    methods = [m for m in METHODS if m.name in choose("aggregators", aggregators, AGGREGATORS)]
    dataset = digits(NUM_CLIENTS, partition="iid")
    model = logistic_regression(dataset.feature_shape, dataset.num_classes)
    table = {}
    for attack_name in choose("attacks", attacks, ATTACKS):

        def run_seed(method, seed):
            # The same malicious clients for every aggregator under a seed.
            algorithm = method.build(model, dataset.num_classes, attack_name, seed)
            result = run_experiment(algorithm, dataset, num_rounds=rounds,
                                    cohort_size=COHORT_SIZE, seed=seed, eval_every=rounds,
                                    progress=False, allow_divergence=True)
            return result.evaluations[-1]["test"]["accuracy"]

        table[attack_name] = {
            name: {"accuracies": list(runs.values()),
                   "final_test_accuracy": mean_std(list(runs.values()))}
            for name, runs in sweep(methods, seeds, run_seed).items()}
    results = {"settings": {
        "rounds": rounds, "seeds": seeds, "num_clients": NUM_CLIENTS,
        "cohort_size": COHORT_SIZE, "malicious_fraction": MALICIOUS_FRACTION,
        "partition": "iid", "model": "logistic_regression", "local": "1 epoch, batch 10, sgd 0.1",
        "aggregators": AGGREGATORS, "scaled_boost": COHORT_SIZE}, "final_test_accuracy": table}
    write_results(output, results, started)
    plot(results, os.path.join(output, "robust_aggregation.png"))
    return results


def plot(results: dict, path: str) -> None:
    """Grouped bars: final test accuracy per attack (groups) and aggregator (bars)."""
    plt = pyplot()
    table = results["final_test_accuracy"]
    attacks, aggregators = _ordered(table)
    width = 0.8 / len(aggregators)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, name in enumerate(aggregators):
        means = [table[a][name]["final_test_accuracy"]["mean"] for a in attacks]
        stds = [table[a][name]["final_test_accuracy"]["std"] for a in attacks]
        ax.bar(np.arange(len(attacks)) + i * width, means, width, yerr=stds, label=name,
               capsize=3)
    ax.set_xticks(np.arange(len(attacks)) + 0.4 - width / 2, attacks)
    s = results["settings"]
    ax.set(ylabel="final test accuracy", ylim=(0, 1),
           title=f"digits IID, {s['num_clients']} clients, {int(100 * s['malicious_fraction'])}% "
                 f"malicious, {s['rounds']} rounds, seeds {s['seeds']}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    save_figure(fig, path)


def _ordered(table: dict) -> tuple[list, list]:
    """Attacks and aggregators of a results table in this module's order (JSON sorts keys)."""
    attacks = [name for name in ATTACKS if name in table]
    present = table[attacks[0]]
    return attacks, [name for name in AGGREGATORS if name in present]




def measure_robust(results: dict) -> Measured:
    s, table = results["settings"], results["final_test_accuracy"]
    accuracy = lambda attack, agg: table[attack][agg]["final_test_accuracy"]
    robust = ("median", "trimmed_mean", "clipped_mean")
    numbers = [f"{attack.replace('_', ' ')}: " + ", ".join(
                   f"{agg.replace('_', ' ')} {pm(accuracy(attack, agg))}"
                   for agg in ("mean",) + robust)
               for attack in ("none", "scaled", "random_labels")]
    checks = [
        Check("under the scaled attack every robust aggregator beats the mean by > 0.1",
              all(accuracy("scaled", agg)["mean"] - accuracy("scaled", "mean")["mean"] > 0.1
                  for agg in robust)),
        Check(f"without attack every robust aggregator within {NEAR:g} of the mean",
              all(abs(accuracy("none", agg)["mean"] - accuracy("none", "mean")["mean"]) <= NEAR
                  for agg in robust))]
    setting = (f"digits IID over {s['num_clients']} clients, softmax regression, "
               f"{s['cohort_size']} per round, {s['local']}, {s['malicious_fraction']:.0%} "
               f"malicious clients (random labels; Gaussian updates; random labels boosted "
               f"×{s['scaled_boost']}); {s['rounds']} rounds, {seeds_text(s)}")
    return Measured(setting, numbers, checks)


CLAIMS = (
    Claim("Robust aggregation", "Coordinate median and trimmed mean (Yin et al., ICML 2018) and "
          "norm clipping (Sun et al., 2019) withstand Byzantine updates that break the mean, at "
          "little cost without attack.",
          ("robust_aggregation.png",), measure_robust),
)


def main(argv=None) -> None:
    parser = experiment_parser(__doc__, rounds=50, seeds=[0], output="results/robust_aggregation")
    args = parse_args(parser, argv)
    print_claims(CLAIMS, run(args.rounds, args.seeds, args.output))


if __name__ == "__main__":
    main()
