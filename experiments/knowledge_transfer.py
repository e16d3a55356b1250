"""Knowledge transfer at small scale: FedGKT (ALGORITHMS.md §5e) and FedGen (§12e) on digits.

References:
    He, Annavaram, Avestimehr. "Group Knowledge Transfer: Federated Learning of Large CNNs at the
    Edge." NeurIPS 2020, arXiv 2007.14513.
    Zhu, Hong, Zhou. "Data-Free Knowledge Distillation for Heterogeneous Federated Learning."
    ICML 2021, arXiv 2105.10056.

FedGKT (§5e): 10 digits clients, Dirichlet(0.5), all in every round; client extractor 64->16
(ReLU) + linear head, server MLP 16->64->10. FedGKT with alpha = 1, T = 3 against alpha = 0, whose
client heads are local-only small models (clients' training never sees the server when alpha = 0,
tests/test_fedgkt.py). Claims: the server model on client features beats the local-only models;
client heads with alpha > 0 are at least as good as with alpha = 0; the bytes moved are features
and logits, never parameters. Each client's predictor is scored on its own test split (which
follows its skewed labels) and on all clients' test data (the global test set of the paper).

FedGen (§12e): 20 digits clients, Dirichlet(0.1) and Dirichlet(1), 10 per round; extractor
64->32->16 (a linear latent, as the reference's), head 16->10; generator hidden 64, noise 16.
FedGen against FedAvg in both sharing modes: the whole model averaged, and only the head shared
(the baseline then is the same head-sharing round without the generator). Claim: FedGen's gain
over FedAvg is larger at Dirichlet(0.1) than at Dirichlet(1).

All numbers are final test accuracy (pooled over the clients' held-out splits unless stated),
never the best round; seeds vary the partition and the training. Every method is a registry
config (`fedgkt`, `fedgen`, `fedavg`) over the models built here.

    python -m experiments.knowledge_transfer [--rounds 60] [--seeds 0 1 2] [--output DIR]
"""

import os

import numpy as np

from experiments.claims import Check, Claim, Measured, pm, print_claims, seeds_text
from experiments.common import (Method, band, experiment_parser, mean_std, parse_args, pyplot,
                                registry_method, save_figure, start, sweep, write_results)
from fedjax_lab import compiled
from fedjax_lab.algorithms.fedgkt import PREDICTIONS
from fedjax_lab.core import experiment_key, tree_bytes
from fedjax_lab.data import PaddedClients, digits
from fedjax_lab.evaluation import make_evaluator
from fedjax_lab.experiment import run_experiment
from fedjax_lab.models import logistic_regression, mlp
from fedjax_lab.models.split import split_mlp, split_model

GKT = {"num_clients": 10, "dirichlet_alpha": 0.5, "cohort_size": 10, "temperature": 3.0,
       "beta": 1.0, "client_epochs": 2, "server_epochs": 2, "batch_size": 32,
       "client_learning_rate": 0.05, "server_learning_rate": 0.05}
GEN = {"num_clients": 20, "dirichlet_alphas": (0.1, 1.0), "cohort_size": 10, "num_epochs": 5,
       "batch_size": 32, "client_learning_rate": 0.05, "noise_dim": 16, "generator_hidden": 64,
       "latent_dim": 16}
SHARINGS = ("all", "head")
# FedGKT's registry options over its defaults: the server MLP 16->64->10 on client features.
FEDGKT = dict(client={"lr": GKT["client_learning_rate"], "epochs": GKT["client_epochs"],
                      "batch_size": GKT["batch_size"]},
              server={"lr": GKT["server_learning_rate"], "epochs": GKT["server_epochs"],
                      "batch_size": GKT["batch_size"]},
              server_hidden=(64,), beta=GKT["beta"], temperature=GKT["temperature"])
LOCAL = dict(client={"lr": GEN["client_learning_rate"], "epochs": GEN["num_epochs"],
                     "batch_size": GEN["batch_size"]})
GENERATOR = dict(generator={"noise_dim": GEN["noise_dim"], "hidden": GEN["generator_hidden"]})


def _accuracies(result) -> list[float]:
    return [e["test"]["accuracy"] for e in result.evaluations]


def _bytes_per_round(result) -> dict:
    return {f"bytes_{d}_per_round": float(np.mean([r[f"bytes_{d}"] for r in result.history]))
            for d in ("up", "down")}


def _everyone_on_all_test_data(dataset) -> PaddedClients:
    """Every client holding the union of all clients' test splits (the global test set)."""
    x, y = np.concatenate(dataset.test.x), np.concatenate(dataset.test.y)
    repeat = lambda a: np.repeat(a[None], dataset.num_clients, axis=0)
    return PaddedClients(repeat(x), repeat(y), np.ones((dataset.num_clients, len(y)), bool),
                         np.full(dataset.num_clients, len(y), np.int32))


def fedgkt_method(alpha: float, prediction: str = "server") -> Method:
    """FedGKT at KD weight `alpha` scored by `prediction` (which training never reads)."""
    return registry_method(f"alpha_{alpha:g}", "fedgkt", **FEDGKT, alpha=alpha,
                           prediction=prediction)


def run_fedgkt(rounds: int, seeds, eval_every: int) -> dict:
    """FedGKT with alpha = 1 and alpha = 0, each scored by the server model on client features
    and by the client heads, on each client's own test split and on all clients' test data."""
    runs = {"alpha_1": {}, "alpha_0": {}}
    for seed in seeds:
        dataset = digits(GKT["num_clients"], partition="dirichlet",
                         alpha=GKT["dirichlet_alpha"], seed=seed)
        client_model = split_mlp(dataset.feature_shape, dataset.num_classes, hidden=(16,))
        test_sets = {"own": dataset.test.pad(), "all": _everyone_on_all_test_data(dataset)}
        for alpha in (1.0, 0.0):
            build = lambda prediction: fedgkt_method(alpha, prediction).build(client_model,
                                                                              dataset.info())
            result = run_experiment(build("server"), dataset, num_rounds=rounds,
                                    cohort_size=GKT["cohort_size"], seed=seed,
                                    eval_every=eval_every, progress=False)
            final = {f"{prediction}_{test}": make_evaluator(
                build(prediction), clients, experiment_key(seed))(result.state)["accuracy"]
                for prediction in PREDICTIONS for test, clients in test_sets.items()}
            runs[fedgkt_method(alpha).name][str(seed)] = {
                "server_accuracy": _accuracies(result),
                "final_accuracy": final,
                **_bytes_per_round(result),
                "parameter_bytes_per_round": float(max(r["bytes_parameters"]
                                                       for r in result.history)),
                "seconds": result.seconds,
            }
    pick = lambda name, key: [run[key] for run in runs[name].values()]
    final = lambda name, key: [run["final_accuracy"][key] for run in runs[name].values()]
    # FedGKT's state params are the server model's.
    initial = compiled.init_state(fedgkt_method(1.0).build(client_model, dataset.info()),
                                  experiment_key(0))
    summary = {
        "bytes_up_per_round": mean_std(pick("alpha_1", "bytes_up_per_round")),
        "bytes_down_per_round": mean_std(pick("alpha_1", "bytes_down_per_round")),
        "parameter_bytes_per_round": max(pick("alpha_1", "parameter_bytes_per_round")),
        "client_model_parameter_bytes": tree_bytes(client_model.init(experiment_key(0))),
        "server_model_parameter_bytes": tree_bytes(initial.params),
    }
    for test in ("own", "all"):
        server, heads = final("alpha_1", f"server_{test}"), final("alpha_1", f"client_{test}")
        local_only = final("alpha_0", f"client_{test}")
        summary[f"{test}_test_data"] = {
            "fedgkt_server_on_client_features": mean_std(server),
            "fedgkt_client_heads": mean_std(heads),
            "fedgkt_alpha0_server_on_client_features": mean_std(
                final("alpha_0", f"server_{test}")),
            "local_only_small_models": mean_std(local_only),
            "server_minus_local_only": mean_std(np.subtract(server, local_only)),
            "client_heads_alpha1_minus_alpha0": mean_std(np.subtract(heads, local_only)),
        }
    return {"runs": runs, "summary": summary}


def fedgen_methods(sharing: str) -> list[Method]:
    """FedAvg and FedGen sharing the whole model ("all") or the head only, `build(model, data)`.

    With head-only sharing the baseline is the same head-sharing round without the generator.
    """
    baseline = (registry_method("fedavg", "fedavg", **LOCAL) if sharing == "all" else
                registry_method("fedavg", "fedgen", **LOCAL, **GENERATOR, sharing=sharing,
                                use_generator=False, alpha_0=0.0))
    return [baseline, registry_method("fedgen", "fedgen", **LOCAL, **GENERATOR, sharing=sharing)]


def run_fedgen(rounds: int, seeds, eval_every: int, alphas=GEN["dirichlet_alphas"],
               sharings=SHARINGS) -> dict:
    """FedAvg vs FedGen for each Dirichlet alpha and sharing mode."""
    results = {}
    for alpha in alphas:

        def run_seed(method, seed):
            dataset = digits(GEN["num_clients"], partition="dirichlet", alpha=alpha, seed=seed)
            model = split_model(mlp(dataset.feature_shape, GEN["latent_dim"], hidden=(32,)),
                                logistic_regression((GEN["latent_dim"],), dataset.num_classes))
            result = run_experiment(method.build(model, dataset.info()), dataset,
                                    num_rounds=rounds, cohort_size=GEN["cohort_size"], seed=seed,
                                    eval_every=eval_every, progress=False)
            return {"test_accuracy": _accuracies(result),
                    "final_test_accuracy": result.evaluations[-1]["test"]["accuracy"],
                    **_bytes_per_round(result), "seconds": result.seconds}

        by_sharing = {sharing: sweep(fedgen_methods(sharing), seeds, run_seed)
                      for sharing in sharings}
        summary = {}
        for sharing, methods in by_sharing.items():
            final = {m: [run["final_test_accuracy"] for run in runs.values()]
                     for m, runs in methods.items()}
            summary[sharing] = {
                **{f"{m}_final_accuracy": mean_std(v) for m, v in final.items()},
                "fedgen_minus_fedavg": mean_std(np.subtract(final["fedgen"], final["fedavg"])),
                **{f"{m}_bytes_{d}_per_round": float(np.mean(
                    [run[f"bytes_{d}_per_round"] for run in methods[m].values()]))
                   for m in methods for d in ("up", "down")},
            }
        results[f"dirichlet_{alpha:g}"] = {"runs": by_sharing, "summary": summary}
    return results


def run(rounds: int = 60, seeds=(0, 1, 2), output: str = "results/knowledge_transfer", *,
        eval_every: int = 5, fedgen_alphas=GEN["dirichlet_alphas"],
        fedgen_sharings=SHARINGS) -> dict:
    """Runs both experiments; writes results.json, fedgkt.png and fedgen.png to `output`.

    `fedgen_alphas` and `fedgen_sharings` restrict the FedGen grid (the smoke test's tiny run).
    """
    seeds, started = start(output, seeds)
    eval_every = min(eval_every, rounds)
    results = {"settings": {
        "rounds": rounds, "seeds": seeds, "seeds_vary": "partition and training",
        "eval_every": eval_every, "fedgkt": GKT,
        "fedgen": {**GEN, "dirichlet_alphas": list(fedgen_alphas),
                   "sharings": list(fedgen_sharings)},
        "fedgen_defaults": "alpha_0=10, beta_0=0 (no latent loss), gaussian noise, dataset label "
                           "counts, 50 generator Adam steps of 32 per round, lr 3e-4 x 0.98^t",
        "reported": "final test accuracy, pooled over all clients' held-out splits",
        "deviations": ["local work is epochs over each client's data (FedGen's reference runs "
                       "20 steps of a persistent loader)", "digits instead of MNIST/CIFAR"],
    }}
    results["fedgkt"] = run_fedgkt(rounds, seeds, eval_every)
    results["fedgen"] = run_fedgen(rounds, seeds, eval_every, fedgen_alphas, fedgen_sharings)
    write_results(output, results, started)
    plot(results, output)
    return results


def plot(results: dict, output: str) -> None:
    """fedgkt.png: server-model accuracy per round and final bars; fedgen.png: alpha x sharing."""
    plt = pyplot()
    settings = results["settings"]
    eval_rounds = lambda n: np.minimum(np.arange(1, n + 1) * settings["eval_every"],
                                       settings["rounds"])
    gkt = results["fedgkt"]
    fig, (curve_ax, bar_ax) = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, label in (("alpha_1", "FedGKT alpha=1: S(E_k(x))"),
                        ("alpha_0", "FedGKT alpha=0: S(E_k(x))")):
        curves = [run["server_accuracy"] for run in gkt["runs"][name].values()]
        band(curve_ax, eval_rounds(len(curves[0])), curves, label)
    curve_ax.set(title="FedGKT, digits Dir(0.5), 10 clients: own test splits", xlabel="round",
                 ylabel="test accuracy")
    curve_ax.grid(alpha=0.3)
    curve_ax.legend()
    bars = (("fedgkt_server_on_client_features", "FedGKT\nserver"),
            ("fedgkt_client_heads", "FedGKT\nclient heads"),
            ("fedgkt_alpha0_server_on_client_features", "alpha=0\nserver"),
            ("local_only_small_models", "local-only\nsmall models"))
    positions = np.arange(len(bars))
    lows = []
    for offset, (test, label) in ((-0.2, ("own", "each client's own test split")),
                                  (0.2, ("all", "all clients' test data"))):
        values = [gkt["summary"][f"{test}_test_data"][key] for key, _ in bars]
        bar_ax.bar(positions + offset, [v["mean"] for v in values], width=0.4, label=label,
                   yerr=[v["std"] for v in values], capsize=3)
        lows.extend(v["mean"] - v["std"] for v in values)
    bar_ax.set_xticks(positions, [label for _, label in bars])
    bar_ax.set(ylim=(max(0.0, min(lows) - 0.05), 1.08), ylabel="final test accuracy",
               title=f"final accuracy, mean ± std over seeds {settings['seeds']}")
    bar_ax.legend(loc="upper center", ncol=2)
    save_figure(fig, os.path.join(output, "fedgkt.png"))

    gen = results["fedgen"]
    sharings = settings["fedgen"]["sharings"]
    fig, axes = plt.subplots(len(gen), len(sharings), figsize=(5.5 * len(sharings), 4 * len(gen)),
                             squeeze=False)
    for row, (alpha_name, alpha_result) in enumerate(gen.items()):
        for col, sharing in enumerate(sharings):
            ax = axes[row, col]
            for method in ("fedavg", "fedgen"):
                curves = [r["test_accuracy"] for r in alpha_result["runs"][sharing][method]
                          .values()]
                summary = alpha_result["summary"][sharing][f"{method}_final_accuracy"]
                baseline = "FedAvg" if sharing == "all" else "FedAvg (head only)"
                name = baseline if method == "fedavg" else f"FedGen ({sharing})"
                band(ax, eval_rounds(len(curves[0])), curves,
                     f"{name}: {summary['mean']:.3f} ± {summary['std']:.3f}")
            ax.set(title=f"{alpha_name.replace('_', ' ')}, sharing={sharing}", xlabel="round",
                   ylabel="test accuracy")
            ax.grid(alpha=0.3)
            ax.legend(loc="lower right")
    fig.suptitle(f"FedGen vs FedAvg on digits, 20 clients, seeds {settings['seeds']} "
                 "(band: min-max; legend: final mean ± std)")
    save_figure(fig, os.path.join(output, "fedgen.png"))




def measure_fedgkt(results: dict) -> Measured:
    s, summary = results["settings"], results["fedgkt"]["summary"]
    numbers = []
    for view, label in (("all_test_data", "all clients' test data"),
                        ("own_test_data", "own test split")):
        v = summary[view]
        numbers.append(f"{label}: server on client features "
                       f"{pm(v['fedgkt_server_on_client_features'])}, local-only "
                       f"{pm(v['local_only_small_models'])}, client heads α = 1 "
                       f"{pm(v['fedgkt_client_heads'])}")
    numbers.append(f"parameter bytes per round {summary['parameter_bytes_per_round']:.0f}; "
                   f"upload {pm(summary['bytes_up_per_round'], 0)} bytes per round")
    checks = [
        Check("server beats local-only (all test data)",
              summary["all_test_data"]["server_minus_local_only"]["mean"] > 0),
        Check("server beats local-only (own test split)",
              summary["own_test_data"]["server_minus_local_only"]["mean"] > 0),
        Check("client heads α = 1 ≥ α = 0 (both views)",
              all(summary[view]["client_heads_alpha1_minus_alpha0"]["mean"] >= 0
                  for view in ("all_test_data", "own_test_data"))),
        Check("zero parameters moved", summary["parameter_bytes_per_round"] == 0)]
    g = s["fedgkt"]
    setting = (f"digits, {g['num_clients']} clients, Dirichlet({g['dirichlet_alpha']:g}), client "
               f"extractor 64→16 + head, server MLP 16→64→10, T = {g['temperature']:g}; "
               f"{s['rounds']} rounds, {seeds_text(s)}")
    return Measured(setting, numbers, checks)


def measure_fedgen(results: dict) -> Measured:
    s, fedgen = results["settings"], results["fedgen"]
    gain = lambda alpha, sharing: fedgen[f"dirichlet_{alpha}"]["summary"][sharing][
        "fedgen_minus_fedavg"]
    numbers = []
    for sharing, label in (("all", "whole model"), ("head", "head only")):
        numbers.append(f"{label}: FedGen − FedAvg test accuracy at Dir(0.1) "
                       f"{pm(gain('0.1', sharing))}, at Dir(1) {pm(gain('1', sharing))}")
    checks = []
    for sharing, label in (("all", "whole model"), ("head", "head only")):
        checks += [Check(f"{label}: FedGen ≥ FedAvg at both Dirichlet α",
                         min(gain("0.1", sharing)["mean"], gain("1", sharing)["mean"]) >= 0),
                   Check(f"{label}: gain larger at Dir(0.1) than at Dir(1)",
                         gain("0.1", sharing)["mean"] > gain("1", sharing)["mean"])]
    g = s["fedgen"]
    setting = (f"digits, {g['num_clients']} clients, Dirichlet(0.1) and (1), "
               f"{g['cohort_size']} per round, extractor 64→32→16 + head 16→10, generator "
               f"hidden {g['generator_hidden']}; {s['rounds']} rounds, {seeds_text(s)}")
    return Measured(setting, numbers, checks)


CLAIMS = (
    Claim("FedGKT", "The server model on client features beats local-only small models; client "
          "heads distilled from the server (α > 0) are at least as good as without (α = 0); only "
          "features and logits move, no parameters.",
          ("fedgkt.png",), measure_fedgkt),
    Claim("FedGen", "FedGen ≥ FedAvg in global test accuracy, with a larger gain under stronger "
          "label skew (Dirichlet 0.1 than 1).",
          ("fedgen.png",), measure_fedgen),
)


def main(argv=None) -> None:
    parser = experiment_parser(__doc__, rounds=60, seeds=[0, 1, 2],
                               output="results/knowledge_transfer")
    args = parse_args(parser, argv)
    print_claims(CLAIMS, run(args.rounds, args.seeds, args.output))


if __name__ == "__main__":
    main()
