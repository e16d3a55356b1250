"""FedProto and pFedHN at small scale: personalised models against FedAvg and Local.

References:
    Tan et al. "FedProto: Federated Prototype Learning across Heterogeneous Clients." AAAI 2022,
    arXiv 2105.00243 (ALGORITHMS.md section 4e).
    Shamsian, Navon, Fetaya, Chechik. "Personalized Federated Learning using Hypernetworks."
    ICML 2021, arXiv 2103.04628 (ALGORITHMS.md section 9e).

FedProto: digits, 20 clients, FedProto's ways/shots split (n_i in 2..4 classes, 14..16 examples
of each, a third of every client held out for its test set), MLP 64-32 with the 32-wide
embedding and a linear head, every client every round, 1 local epoch of batch 4, SGD momentum
0.5. Methods: Local (FedProto with lam = 0, which the tests show is independent local training),
FedAvg's global model, FedProto (lam = 1) scored with its heads, with the nearest global
prototype and with the nearest prototype among the client's own classes, and FedProto with half
the clients on a second architecture (MLP 128-64-32, the same embedding size).

pFedHN: digits, 20 clients with 2 classes each (each class split evenly among its holders), the
same target MLP, 5 clients per round, 2 local epochs of batch 16 (about 10 inner steps), SGD
momentum 0.9 with weight decay 5e-5 and clipping at 50 (the reference's inner optimiser).
Methods: Local (as above), FedAvg, pFedHN and pFedHN-PC (hypernetwork: embedding 6, hidden 64, 3
hidden layers, the reference's server optimiser).

Reported: mean and worst-10% (mean of the worst ceil(10%) clients) client test accuracy, final
round, and the bytes each method moves per round.

Every method is a registry config (`fedproto`, `fedavg`, `pfedhn`, with the reference client
optimisers as `client` options) except FedProto with two architectures: the registry builds
FedProto on the one model of a run, so that comparison calls `fedproto` with both models.

    python -m experiments.fedproto_pfedhn [--rounds 100] [--pfedhn-rounds 100] [--seeds 0 1 2]
                                          [--output DIR]
"""

import os

import numpy as np
import optax

from experiments.claims import Check, Claim, Measured, pm, print_claims, seeds_text
from experiments.common import (SCORE_KEYS, choose, client_scores, experiment_parser,
                                parse_args, pyplot, registry_method, save_figure, start,
                                summarize_by_method, write_results)
from fedjax_lab import compiled
from fedjax_lab.algorithms.fedproto import INFERENCES, fedproto
from fedjax_lab.core import experiment_key
from fedjax_lab.data import digits
from fedjax_lab.evaluation import make_evaluator
from fedjax_lab.experiment import run_experiment
from fedjax_lab.models.split import split_mlp

FEDPROTO = dict(num_clients=20, ways=3, shots=15, stdev=1, test_fraction=1 / 3, lam=1.0,
                hidden=(64, 32), second_hidden=(128, 64, 32), learning_rate=0.05,
                momentum=0.5, num_epochs=1, batch_size=4)
FEDPROTO_METHODS = ("local", "fedavg", "fedproto_head", "fedproto_prototype",
                    "fedproto_local_prototype", "fedproto_mixed_head",
                    "fedproto_mixed_prototype", "fedproto_mixed_local_prototype")
PFEDHN = dict(num_clients=20, classes_per_client=2, test_fraction=0.2, hidden=(64, 32),
              cohort_size=5, learning_rate=0.02, momentum=0.9, weight_decay=5e-5, clip=50.0,
              num_epochs=2, batch_size=16, embedding_dim=6, hn_hidden=64, hn_num_hidden=3)
PFEDHN_METHODS = ("local", "fedavg", "pfedhn", "pfedhn_pc")
FEDPROTO_CLIENT = {"lr": FEDPROTO["learning_rate"], "momentum": FEDPROTO["momentum"],
                   "epochs": FEDPROTO["num_epochs"], "batch_size": FEDPROTO["batch_size"]}
# The runs on one architecture: Local is FedProto with lam = 0 (independent local training), and
# one FedProto run is scored with each inference.
FEDPROTO_TRAINED = {method.name: method for method in (
    registry_method("local", "fedproto", client=FEDPROTO_CLIENT, lam=0.0),
    registry_method("fedavg", "fedavg", client=FEDPROTO_CLIENT),
    *(registry_method(f"fedproto_{inference}", "fedproto", client=FEDPROTO_CLIENT,
                      lam=FEDPROTO["lam"], inference=inference) for inference in INFERENCES))}
# The reference's inner optimiser: SGD with momentum, weight decay and clipping.
PFEDHN_CLIENT = {"lr": PFEDHN["learning_rate"], "momentum": PFEDHN["momentum"],
                 "weight_decay": PFEDHN["weight_decay"], "clip_norm": PFEDHN["clip"],
                 "epochs": PFEDHN["num_epochs"], "batch_size": PFEDHN["batch_size"]}
HYPERNETWORK = dict(embedding_dim=PFEDHN["embedding_dim"], hidden=PFEDHN["hn_hidden"],
                    num_hidden=PFEDHN["hn_num_hidden"])
PFEDHN_TRAINED = (
    registry_method("local", "fedproto", client=PFEDHN_CLIENT, lam=0.0),
    registry_method("fedavg", "fedavg", client=PFEDHN_CLIENT),
    registry_method("pfedhn", "pfedhn", client=PFEDHN_CLIENT, **HYPERNETWORK),
    registry_method("pfedhn_pc", "pfedhn", client=PFEDHN_CLIENT, **HYPERNETWORK,
                    personal_head=True),
)


def _communication(history: list[dict]) -> dict:
    """Bytes of the final round (every round of a method moves the same amount here)."""
    return {"bytes_up": history[-1]["bytes_up"], "bytes_down": history[-1]["bytes_down"]}


def _no_traffic_if_local(method: str, scores: dict) -> dict:
    """Local training sends nothing; its FedProto (lam = 0) run still counts prototypes."""
    return {**scores, "bytes_up": 0.0, "bytes_down": 0.0} if method == "local" else scores


def _train_and_score(builders: dict, dataset, seed: int, rounds: int, cohort_size: int,
                     eval_every: int) -> dict:
    """Runs each builder's training algorithm and scores its final state with each predictor.

    `builders[name]` is `(algorithm, {score_name: algorithm_for_predict})`. Returns
    {score_name: {mean, worst10, std, pooled, curve, bytes_up, bytes_down}}; `curve` is the
    mean client accuracy of the training algorithm's own predictor every `eval_every` rounds.
    """
    key, test = experiment_key(seed), dataset.test.pad()
    scores = {}
    for algorithm, predictors in builders.values():
        result = run_experiment(algorithm, dataset, num_rounds=rounds, cohort_size=cohort_size,
                                seed=seed, eval_every=eval_every, progress=False)
        curve = [[e["round"], e["test"]["client_accuracy_mean"]] for e in result.evaluations]
        for score_name, predictor in predictors.items():
            evaluation = (result.summary["final"]["test"] if predictor is algorithm
                          else make_evaluator(predictor, test, key)(result.state))
            scores[score_name] = {**client_scores(evaluation), "curve": curve,
                                  **_communication(result.history)}
    return scores


@compiled.per_structure
def _mixed_fedproto(model, second, num_clients: int, inference: str):
    """FedProto with every other client on the second architecture; one object per structure,
    so that every seed runs the programs the first compiled."""
    settings = FEDPROTO
    return fedproto((model, second), optax.sgd(settings["learning_rate"],
                                               momentum=settings["momentum"]),
                    num_clients=num_clients, architecture_of=np.arange(num_clients) % 2,
                    lam=settings["lam"], num_epochs=settings["num_epochs"],
                    batch_size=settings["batch_size"], inference=inference)


def run_fedproto(seed: int, rounds: int, methods=FEDPROTO_METHODS, eval_every: int = 10) -> dict:
    """FedProto vs Local and FedAvg on ways/shots digits.

    Returns {"scores": {method: scores}, "train_examples": [...], "test_examples": [...]}.
    """
    settings = FEDPROTO
    dataset = digits(settings["num_clients"], partition="ways_shots", ways=settings["ways"],
                     shots=settings["shots"], stdev=settings["stdev"],
                     test_fraction=settings["test_fraction"], seed=seed)
    model = split_mlp(dataset.feature_shape, dataset.num_classes, hidden=settings["hidden"])
    second = split_mlp(dataset.feature_shape, dataset.num_classes,
                       hidden=settings["second_hidden"])
    build = lambda name: FEDPROTO_TRAINED[name].build(model, dataset.info())

    mixed = lambda inference: _mixed_fedproto(model, second, dataset.num_clients, inference)

    def prototype_family(name, build_inference):
        """One FedProto training run (head inference) scored with each inference asked for."""
        algorithm = build_inference("head")
        wanted = {f"{name}_{inference}": (algorithm if inference == "head"
                                          else build_inference(inference))
                  for inference in INFERENCES if f"{name}_{inference}" in methods}
        return (algorithm, wanted) if wanted else None

    builders = {}
    for name in ("local", "fedavg"):
        if name in methods:
            algorithm = build(name)
            builders[name] = (algorithm, {name: algorithm})
    for name, build_inference in (("fedproto", lambda inference: build(f"fedproto_{inference}")),
                                  ("fedproto_mixed", mixed)):
        family = prototype_family(name, build_inference)
        if family is not None:
            builders[name] = family
    scores = _train_and_score(builders, dataset, seed, rounds, dataset.num_clients, eval_every)
    return {"scores": {method: _no_traffic_if_local(method, scores[method])
                       for method in methods},
            "train_examples": dataset.train.num_examples.tolist(),
            "test_examples": dataset.test.num_examples.tolist()}


def run_pfedhn(seed: int, rounds: int, methods=PFEDHN_METHODS, eval_every: int = 10) -> dict:
    """pFedHN and pFedHN-PC vs Local and FedAvg with two classes per client.

    Returns {"scores": {method: scores}, "train_examples": [...], "test_examples": [...]}.
    """
    settings = PFEDHN
    dataset = digits(settings["num_clients"], partition="classes",
                     classes_per_client=settings["classes_per_client"],
                     test_fraction=settings["test_fraction"], seed=seed)
    model = split_mlp(dataset.feature_shape, dataset.num_classes, hidden=settings["hidden"])
    builders = {}
    for method in (method for method in PFEDHN_TRAINED if method.name in methods):
        algorithm = method.build(model, dataset.info())
        builders[method.name] = (algorithm, {method.name: algorithm})
    scores = _train_and_score(builders, dataset, seed, rounds, settings["cohort_size"],
                              eval_every)
    return {"scores": {method: _no_traffic_if_local(method, score)
                       for method, score in scores.items()},
            "train_examples": dataset.train.num_examples.tolist(),
            "test_examples": dataset.test.num_examples.tolist()}


def _summary(runs: dict) -> dict:
    """Each method's scores and bytes, mean ± std over seeds."""
    return summarize_by_method({seed: run["scores"] for seed, run in runs.items()},
                               SCORE_KEYS + ("bytes_up", "bytes_down"))


def run(rounds: int = 100, seeds=(0,), output: str = "results/fedproto_pfedhn", *,
        pfedhn_rounds: int = 100, eval_every: int = 10, fedproto_methods=FEDPROTO_METHODS,
        pfedhn_methods=PFEDHN_METHODS) -> dict:
    """Runs both experiments for every seed; writes results.json, fedproto.png and pfedhn.png.

    Args:
        rounds: FedProto rounds (every client every round).
        seeds: run seeds; each also seeds the data partition.
        output: folder for the results (created if needed).
        pfedhn_rounds: rounds of the pFedHN comparison (5 clients per round).
        eval_every: rounds between the evaluations of the learning curves.
        fedproto_methods, pfedhn_methods: subsets of FEDPROTO_METHODS and PFEDHN_METHODS.

    Returns:
        The results dict written to results.json.
    """
    fedproto_methods = choose("fedproto_methods", fedproto_methods, FEDPROTO_METHODS)
    pfedhn_methods = choose("pfedhn_methods", pfedhn_methods, PFEDHN_METHODS)
    for name, value in (("rounds", rounds), ("pfedhn_rounds", pfedhn_rounds),
                        ("eval_every", eval_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid; expected a positive integer")
    seeds, started = start(output, seeds)
    fedproto_runs = {str(seed): run_fedproto(seed, rounds, fedproto_methods, eval_every)
                     for seed in seeds}
    pfedhn_runs = {str(seed): run_pfedhn(seed, pfedhn_rounds, pfedhn_methods, eval_every)
                   for seed in seeds}
    results = {
        "settings": {
            "rounds": rounds, "pfedhn_rounds": pfedhn_rounds, "seeds": seeds,
            "eval_every": eval_every, "fedproto": FEDPROTO, "pfedhn": PFEDHN,
            "seeds_vary": "the data partition, the model init, cohorts and shuffles",
            "worst10": "mean test accuracy of the worst ceil(10%) of clients",
            "accuracy": "final round, never best-of-run",
            "local": "FedProto with lam = 0 (independent local training; no communication)",
            "deviations": [
                "digits (8x8) instead of MNIST/CIFAR-10; MLP targets instead of CNNs",
                "FedProto: 14-16 shots per class split 2:1 into train and test (reference: "
                "100 train shots, 15 test shots per class); SGD lr 0.05 (reference 0.01, chosen "
                "on seed 0 for all methods alike)",
                "pFedHN: 5 clients per round (reference: 1 per step), 2 local epochs of batch 16 "
                "instead of 50 steps of batch 64; inner lr 0.02 (reference 5e-3); classes split "
                "evenly among holders (reference: proportions ~U(0.4, 0.6))",
            ],
        },
        "fedproto": {"runs": fedproto_runs, "summary": _summary(fedproto_runs)},
        "pfedhn": {"runs": pfedhn_runs, "summary": _summary(pfedhn_runs)},
    }
    write_results(output, results, started)
    plot(results, "fedproto", os.path.join(output, "fedproto.png"))
    plot(results, "pfedhn", os.path.join(output, "pfedhn.png"))
    return results


TITLES = {
    "fedproto": "FedProto: digits ways/shots (2-4 classes per client), 20 clients, all per round",
    "pfedhn": "pFedHN: digits, 2 classes per client, 20 clients, 5 per round",
}


def plot(results: dict, experiment: str, path: str) -> None:
    """Learning curves (mean client accuracy, first seed) and final mean / worst-10% bars."""
    plt = pyplot()
    summary = results[experiment]["summary"]
    seed = str(results["settings"]["seeds"][0])
    runs = results[experiment]["runs"][seed]["scores"]
    # The results file stores keys sorted; show the methods in their declared order.
    methods = [m for m in {"fedproto": FEDPROTO_METHODS, "pfedhn": PFEDHN_METHODS}[experiment]
               if m in summary]
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(14, 4.8),
                                       gridspec_kw={"width_ratios": [1, 1.4]})
    drawn = set()
    for method in methods:
        curve = np.asarray(runs[method]["curve"])
        if curve.tobytes() in drawn:  # predictors of one training run share its curve
            continue
        drawn.add(curve.tobytes())
        curves.plot(curve[:, 0], curve[:, 1], marker=".", label=method)
    curves.set(title=f"mean client test accuracy (seed {seed})", xlabel="round",
               ylabel="accuracy")
    curves.grid(alpha=0.3)
    curves.legend(fontsize=8)
    width, positions = 0.38, np.arange(len(methods))
    for offset, key, label in ((-width / 2, "mean", "mean"), (width / 2, "worst10", "worst 10%")):
        bars.bar(positions + offset, [summary[m][key]["mean"] for m in methods], width,
                 yerr=[summary[m][key]["std"] for m in methods], capsize=3, label=label)
    bars.set_xticks(positions, methods, rotation=25, ha="right", fontsize=8)
    lowest = min(summary[m]["worst10"]["mean"] for m in methods)
    # Headroom above 1 keeps the legend off the bars.
    bars.set(title="final client test accuracy (bars: mean ± std over seeds)",
             ylim=(max(0.0, lowest - 0.1), 1.04))
    bars.grid(axis="y", alpha=0.3)
    bars.legend(loc="upper right", ncol=2, fontsize=8)
    fig.suptitle(f"{TITLES[experiment]}; seeds {results['settings']['seeds']}")
    save_figure(fig, path)




def measure_fedproto(results: dict) -> Measured:
    s, summary = results["settings"], results["fedproto"]["summary"]
    labels = {"fedproto_head": "FedProto (head)", "fedproto_prototype": "FedProto (prototype)",
              "local": "Local", "fedavg": "FedAvg"}
    numbers = ["mean client accuracy (bytes up per round): " + ", ".join(
        f"{label} {pm(summary[m]['mean'])} ({summary[m]['bytes_up']['mean']:,.0f})"
        for m, label in labels.items())]
    mean = lambda m: summary[m]["mean"]["mean"]
    checks = [
        Check("FedProto (head) ≥ Local", mean("fedproto_head") >= mean("local")),
        Check("nearest-prototype inference within 0.01 of head inference",
              abs(mean("fedproto_prototype") - mean("fedproto_head")) <= 0.01),
        Check("FedProto uploads < 1/10 of FedAvg's bytes",
              summary["fedproto_head"]["bytes_up"]["mean"]
              < summary["fedavg"]["bytes_up"]["mean"] / 10)]
    p = s["fedproto"]
    setting = (f"digits, {p['num_clients']} clients, ways/shots ({p['ways']} ± {p['stdev']} "
               f"classes, {p['shots']} shots), MLP 64-32 (embedding 32), every client every "
               f"round, λ = {p['lam']:g}; {s['rounds']} rounds, {seeds_text(s)}")
    return Measured(setting, numbers, checks)


def measure_pfedhn(results: dict) -> Measured:
    s, summary = results["settings"], results["pfedhn"]["summary"]
    labels = {"pfedhn": "pFedHN", "pfedhn_pc": "pFedHN-PC", "fedavg": "FedAvg", "local": "Local"}
    numbers = ["mean client accuracy: " + ", ".join(
        f"{label} {pm(summary[m]['mean'])}" for m, label in labels.items())]
    mean = lambda m: summary[m]["mean"]["mean"]
    checks = [
        Check("both HN variants beat FedAvg by ≥ 0.02",
              min(mean("pfedhn"), mean("pfedhn_pc")) - mean("fedavg") >= 0.02),
        Check("both match (within 0.01) or beat Local",
              min(mean("pfedhn"), mean("pfedhn_pc")) >= mean("local") - 0.01)]
    p = s["pfedhn"]
    setting = (f"digits, {p['num_clients']} clients × {p['classes_per_client']} classes, MLP "
               f"64-32-10 target, HN embedding {p['embedding_dim']}, {p['cohort_size']} per "
               f"round; {s['pfedhn_rounds']} rounds, {seeds_text(s)}")
    return Measured(setting, numbers, checks)


CLAIMS = (
    Claim("FedProto", "FedProto ≥ Local accuracy (typically +1–3 points), with nearest-prototype "
          "inference within a point of head inference, while sending about C·D floats per client.",
          ("fedproto.png",), measure_fedproto),
    Claim("pFedHN", "pFedHN and pFedHN-PC beat FedAvg by a wide margin under 2-class skew and "
          "match or beat Local.",
          ("pfedhn.png",), measure_pfedhn),
)


def main(argv=None) -> None:
    parser = experiment_parser(__doc__, rounds=100, seeds=[0], output="results/fedproto_pfedhn")
    parser.add_argument("--pfedhn-rounds", type=int, default=100)
    args = parse_args(parser, argv, counts=("rounds", "pfedhn_rounds"))
    print_claims(CLAIMS, run(args.rounds, args.seeds, args.output,
                             pfedhn_rounds=args.pfedhn_rounds))


if __name__ == "__main__":
    main()
