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

The round below is FedAvg's with two seams (`aggregator`, `attack`); once `fedavg` takes those
options it is `fedavg(model, optax.sgd(0.1), aggregator=..., attack=...)`.

    python -m experiments.robust_aggregation [--rounds 50] [--seeds 0 1 2] [--output DIR]
"""

import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.common import experiment_parser, parse_args, pyplot
from fedjax_lab.core import (Algorithm, ClientExecution, client_weights, local_train,
                             model_loss, server_update)
from fedjax_lab.core.attacks import Attack
from fedjax_lab.core.robust import get_aggregator
from fedjax_lab.data import digits
from fedjax_lab.experiment import run_experiment, write_json_atomic
from fedjax_lab.models import logistic_regression

NUM_CLIENTS = 20
COHORT_SIZE = 10
MALICIOUS_FRACTION = 0.2
AGGREGATORS = {"mean": {}, "median": {}, "trimmed_mean": {"beta": 0.2},
               "clipped_mean": {"max_norm": "median"}}
ATTACKS = ("none", "random_labels", "gaussian", "scaled")


class RoundState(NamedTuple):
    params: dict
    opt_state: tuple
    round: jax.Array
    metrics: dict


def attacked_fedavg(model, aggregator, attack: Attack, *, learning_rate: float = 0.1,
                    batch_size: int = 10, execution: ClientExecution = ClientExecution()):
    """FedAvg (E = 1) whose clients may be attacked and whose server aggregates robustly."""
    loss_fn = model_loss(model.apply)
    server_optimizer = optax.sgd(1.0)

    def init(key):
        params = model.init(key)
        return RoundState(params, server_optimizer.init(params), jnp.zeros((), jnp.int32),
                          {"train_loss": jnp.zeros((), jnp.result_type(float))})

    def round_fn(state, batch):
        batch = attack.poison_batch(batch)

        def client(inputs):
            x, y, mask, rng = inputs
            result = local_train(loss_fn, optax.sgd(learning_rate), state.params, x, y, mask,
                                 rng, num_epochs=1, batch_size=batch_size)
            return optax.tree.sub(state.params, result.params), result.mean_loss

        deltas, losses = execution.map(client, (batch.x, batch.y, batch.mask, batch.rng))
        deltas = attack.corrupt_updates(deltas, batch)
        weights = client_weights(batch.num_examples)
        params, opt_state = server_update(state.params, state.opt_state,
                                          aggregator(deltas, weights), server_optimizer)
        return RoundState(params, opt_state, state.round + 1,
                          {"train_loss": jnp.sum(weights * losses).astype(jnp.result_type(float))})

    def predict(state, batch):
        num, examples = batch.x.shape[:2]
        x = batch.x.reshape((num * examples,) + batch.x.shape[2:])
        return model.apply(state.params, x).reshape(num, examples, -1)

    return Algorithm(init=init, round=round_fn, predict=predict)


def run(rounds: int = 50, seeds=(0,), output: str = "results/robust_aggregation", *,
        attacks=ATTACKS, aggregators=tuple(AGGREGATORS)) -> dict:
    """Every aggregator under every attack and seed; writes results.json and a PNG."""
    os.makedirs(output, exist_ok=True)
    seeds = [int(seed) for seed in seeds]
    dataset = digits(NUM_CLIENTS, partition="iid")
    model = logistic_regression(dataset.feature_shape, dataset.num_classes)
    start = time.perf_counter()
    table = {}
    for attack_name in attacks:
        table[attack_name] = {}
        for aggregator_name in aggregators:
            options = AGGREGATORS[aggregator_name]
            accuracies = []
            for seed in seeds:
                attack = Attack(attack_name, fraction=MALICIOUS_FRACTION,
                                num_clients=NUM_CLIENTS, num_classes=dataset.num_classes,
                                poison_labels=attack_name == "scaled", seed=seed)
                algorithm = attacked_fedavg(model, get_aggregator(aggregator_name, **options),
                                            attack)
                result = run_experiment(algorithm, dataset, num_rounds=rounds,
                                        cohort_size=COHORT_SIZE, seed=seed, eval_every=rounds,
                                        progress=False, allow_divergence=True)
                accuracies.append(result.evaluations[-1]["test"]["accuracy"])
            table[attack_name][aggregator_name] = {
                "accuracies": accuracies,
                "final_test_accuracy": {"mean": float(np.mean(accuracies)),
                                        "std": float(np.std(accuracies))}}
    results = {"settings": {
        "rounds": rounds, "seeds": seeds, "num_clients": NUM_CLIENTS,
        "cohort_size": COHORT_SIZE, "malicious_fraction": MALICIOUS_FRACTION,
        "partition": "iid", "model": "logistic_regression", "local": "1 epoch, batch 10, sgd 0.1",
        "aggregators": AGGREGATORS, "scaled_boost": COHORT_SIZE,
        "wall_seconds": time.perf_counter() - start}, "final_test_accuracy": table}
    write_json_atomic(os.path.join(output, "results.json"), results)
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
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _ordered(table: dict) -> tuple[list, list]:
    """Attacks and aggregators of a results table in this module's order (JSON sorts keys)."""
    attacks = [name for name in ATTACKS if name in table]
    present = table[attacks[0]]
    return attacks, [name for name in AGGREGATORS if name in present]


def print_table(results: dict) -> None:
    table = results["final_test_accuracy"]
    attacks, aggregators = _ordered(table)
    print(f"{'attack':<14}" + "".join(f"{name:>20}" for name in aggregators))
    for attack in attacks:
        row = table[attack]
        cells = "".join(f"{row[n]['final_test_accuracy']['mean']:>12.4f} ± "
                        f"{row[n]['final_test_accuracy']['std']:<5.3f}" for n in aggregators)
        print(f"{attack:<14}{cells}")
    print(f"wall time {results['settings']['wall_seconds']:.1f} s")


def main(argv=None) -> None:
    parser = experiment_parser(__doc__, rounds=50, seeds=[0], output="results/robust_aggregation")
    args = parse_args(parser, argv)
    print_table(run(args.rounds, args.seeds, args.output))


if __name__ == "__main__":
    main()
