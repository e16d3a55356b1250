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
never the best round; seeds vary the partition and the training.

    python -m experiments.knowledge_transfer [--rounds 60] [--seeds 0 1 2] [--output DIR]
"""

import os
import time

import numpy as np
import optax

from experiments.common import experiment_parser, parse_args, pyplot
from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.algorithms.fedgen import fedgen
from fedjax_lab.algorithms.fedgkt import PREDICTIONS, fedgkt
from fedjax_lab.core import experiment_key, tree_bytes
from fedjax_lab.data import PaddedClients, digits
from fedjax_lab.evaluation import make_evaluator
from fedjax_lab.experiment import run_experiment, write_json_atomic
from fedjax_lab.models import logistic_regression, mlp
from fedjax_lab.models.split import split_mlp, split_model

GKT = {"num_clients": 10, "dirichlet_alpha": 0.5, "cohort_size": 10, "temperature": 3.0,
       "beta": 1.0, "client_epochs": 2, "server_epochs": 2, "batch_size": 32,
       "client_learning_rate": 0.05, "server_learning_rate": 0.05}
GEN = {"num_clients": 20, "dirichlet_alphas": (0.1, 1.0), "cohort_size": 10, "num_epochs": 5,
       "batch_size": 32, "client_learning_rate": 0.05, "noise_dim": 16, "generator_hidden": 64,
       "latent_dim": 16}
SHARINGS = ("all", "head")


def _mean_std(values) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)),
            "values": [float(v) for v in values]}


def _accuracies(result) -> list[float]:
    return [e["test"]["accuracy"] for e in result.evaluations]


def _everyone_on_all_test_data(dataset) -> PaddedClients:
    """Every client holding the union of all clients' test splits (the global test set)."""
    x, y = np.concatenate(dataset.test.x), np.concatenate(dataset.test.y)
    repeat = lambda a: np.repeat(a[None], dataset.num_clients, axis=0)
    return PaddedClients(repeat(x), repeat(y), np.ones((dataset.num_clients, len(y)), bool),
                         np.full(dataset.num_clients, len(y), np.int32))


def run_fedgkt(rounds: int, seeds, eval_every: int) -> dict:
    """FedGKT with alpha = 1 and alpha = 0, each scored by the server model on client features
    and by the client heads, on each client's own test split and on all clients' test data."""
    runs = {"alpha_1": {}, "alpha_0": {}}
    for seed in seeds:
        dataset = digits(GKT["num_clients"], partition="dirichlet",
                         alpha=GKT["dirichlet_alpha"], seed=seed)
        client_model = split_mlp(dataset.feature_shape, dataset.num_classes, hidden=(16,))
        server_model = mlp((16,), dataset.num_classes, hidden=(64,))
        test_sets = {"own": dataset.test.pad(), "all": _everyone_on_all_test_data(dataset)}
        for name, alpha in (("alpha_1", 1.0), ("alpha_0", 0.0)):
            def build(prediction):
                return fedgkt(client_model, server_model,
                              optax.sgd(GKT["client_learning_rate"]),
                              optax.sgd(GKT["server_learning_rate"]),
                              num_clients=dataset.num_clients,
                              max_examples=int(dataset.train.num_examples.max()), alpha=alpha,
                              beta=GKT["beta"], temperature=GKT["temperature"],
                              client_epochs=GKT["client_epochs"],
                              server_epochs=GKT["server_epochs"], batch_size=GKT["batch_size"],
                              prediction=prediction)
            result = run_experiment(build("server"), dataset, num_rounds=rounds,
                                    cohort_size=GKT["cohort_size"], seed=seed,
                                    eval_every=eval_every, progress=False)
            final = {f"{prediction}_{test}": make_evaluator(
                build(prediction), clients, experiment_key(seed))(result.state)["accuracy"]
                for prediction in PREDICTIONS for test, clients in test_sets.items()}
            runs[name][str(seed)] = {
                "server_accuracy": _accuracies(result),
                "final_accuracy": final,
                "bytes_up_per_round": float(np.mean([r["bytes_up"] for r in result.history])),
                "bytes_down_per_round": float(np.mean([r["bytes_down"] for r in result.history])),
                "parameter_bytes_per_round": float(max(r["bytes_parameters"]
                                                       for r in result.history)),
                "seconds": result.seconds,
            }
    pick = lambda name, key: [run[key] for run in runs[name].values()]
    final = lambda name, key: [run["final_accuracy"][key] for run in runs[name].values()]
    summary = {
        "bytes_up_per_round": _mean_std(pick("alpha_1", "bytes_up_per_round")),
        "bytes_down_per_round": _mean_std(pick("alpha_1", "bytes_down_per_round")),
        "parameter_bytes_per_round": max(pick("alpha_1", "parameter_bytes_per_round")),
        "client_model_parameter_bytes": tree_bytes(client_model.init(experiment_key(0))),
        "server_model_parameter_bytes": tree_bytes(server_model.init(experiment_key(0))),
    }
    for test in ("own", "all"):
        server, heads = final("alpha_1", f"server_{test}"), final("alpha_1", f"client_{test}")
        local_only = final("alpha_0", f"client_{test}")
        summary[f"{test}_test_data"] = {
            "fedgkt_server_on_client_features": _mean_std(server),
            "fedgkt_client_heads": _mean_std(heads),
            "fedgkt_alpha0_server_on_client_features": _mean_std(
                final("alpha_0", f"server_{test}")),
            "local_only_small_models": _mean_std(local_only),
            "server_minus_local_only": _mean_std(np.subtract(server, local_only)),
            "client_heads_alpha1_minus_alpha0": _mean_std(np.subtract(heads, local_only)),
        }
    return {"runs": runs, "summary": summary}


def _fedgen_algorithms(model, dataset, sharing: str) -> dict:
    local = dict(num_epochs=GEN["num_epochs"], batch_size=GEN["batch_size"])
    generator = dict(noise_dim=GEN["noise_dim"], generator_hidden=GEN["generator_hidden"])
    optimizer = optax.sgd(GEN["client_learning_rate"])
    if sharing == "all":
        baseline = fedavg(model, optimizer, **local)
        head = {}
    else:
        head = dict(sharing="head", num_clients=dataset.num_clients)
        baseline = fedgen(model, optimizer, use_generator=False, alpha_0=0.0, **head, **local,
                          **generator)
    return {"fedavg": baseline, "fedgen": fedgen(model, optimizer, **head, **local, **generator)}


def run_fedgen(rounds: int, seeds, eval_every: int, alphas=GEN["dirichlet_alphas"],
               sharings=SHARINGS) -> dict:
    """FedAvg vs FedGen for each Dirichlet alpha and sharing mode."""
    results = {}
    for alpha in alphas:
        by_sharing = {sharing: {"fedavg": {}, "fedgen": {}} for sharing in sharings}
        for seed in seeds:
            dataset = digits(GEN["num_clients"], partition="dirichlet", alpha=alpha, seed=seed)
            model = split_model(mlp(dataset.feature_shape, GEN["latent_dim"], hidden=(32,)),
                                logistic_regression((GEN["latent_dim"],), dataset.num_classes))
            for sharing in sharings:
                for method, algorithm in _fedgen_algorithms(model, dataset, sharing).items():
                    result = run_experiment(algorithm, dataset, num_rounds=rounds,
                                            cohort_size=GEN["cohort_size"], seed=seed,
                                            eval_every=eval_every, progress=False)
                    by_sharing[sharing][method][str(seed)] = {
                        "test_accuracy": _accuracies(result),
                        "final_test_accuracy": result.evaluations[-1]["test"]["accuracy"],
                        "bytes_up_per_round": float(np.mean([r["bytes_up"]
                                                             for r in result.history])),
                        "bytes_down_per_round": float(np.mean([r["bytes_down"]
                                                               for r in result.history])),
                        "seconds": result.seconds,
                    }
        summary = {}
        for sharing, methods in by_sharing.items():
            final = {m: [run["final_test_accuracy"] for run in runs.values()]
                     for m, runs in methods.items()}
            summary[sharing] = {
                **{f"{m}_final_accuracy": _mean_std(v) for m, v in final.items()},
                "fedgen_minus_fedavg": _mean_std(np.subtract(final["fedgen"], final["fedavg"])),
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
    os.makedirs(output, exist_ok=True)
    seeds = [int(seed) for seed in seeds]
    eval_every = min(eval_every, rounds)
    start = time.perf_counter()
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
    gen = results["fedgen"]
    gkt = results["fedgkt"]["summary"]
    claims = {"fedgkt_moves_no_parameters": gkt["parameter_bytes_per_round"] == 0.0}
    for test in ("own", "all"):
        claims[f"fedgkt_server_beats_local_only_on_{test}_test_data"] = bool(
            gkt[f"{test}_test_data"]["server_minus_local_only"]["mean"] > 0)
        claims[f"fedgkt_client_heads_alpha1_at_least_alpha0_on_{test}_test_data"] = bool(
            gkt[f"{test}_test_data"]["client_heads_alpha1_minus_alpha0"]["mean"] >= 0)
    if {"dirichlet_0.1", "dirichlet_1"} <= set(gen):
        for sharing in fedgen_sharings:
            gain = lambda a: gen[a]["summary"][sharing]["fedgen_minus_fedavg"]["mean"]
            claims[f"fedgen_gain_larger_at_dir0.1_than_dir1_{sharing}"] = bool(
                gain("dirichlet_0.1") > gain("dirichlet_1"))
    results["claims"] = claims
    results["settings"]["wall_seconds"] = time.perf_counter() - start
    write_json_atomic(os.path.join(output, "results.json"), results)
    plot(results, output)
    return results


def _band(ax, curves: list, rounds, label: str) -> None:
    curves = np.asarray(curves)
    line, = ax.plot(rounds, curves.mean(axis=0), label=label)
    if len(curves) > 1:
        ax.fill_between(rounds, curves.min(axis=0), curves.max(axis=0), color=line.get_color(),
                        alpha=0.2, linewidth=0)


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
        _band(curve_ax, curves, eval_rounds(len(curves[0])), label)
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
    fig.tight_layout()
    fig.savefig(os.path.join(output, "fedgkt.png"), dpi=100)
    plt.close(fig)

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
                _band(ax, curves, eval_rounds(len(curves[0])),
                      f"{name}: {summary['mean']:.3f} ± {summary['std']:.3f}")
            ax.set(title=f"{alpha_name.replace('_', ' ')}, sharing={sharing}", xlabel="round",
                   ylabel="test accuracy")
            ax.grid(alpha=0.3)
            ax.legend(loc="lower right")
    fig.suptitle(f"FedGen vs FedAvg on digits, 20 clients, seeds {settings['seeds']} "
                 "(band: min-max; legend: final mean ± std)")
    fig.tight_layout()
    fig.savefig(os.path.join(output, "fedgen.png"), dpi=100)
    plt.close(fig)


def print_table(results: dict) -> None:
    fmt = lambda s: f"{s['mean']:.4f} ± {s['std']:.4f}"
    gkt = results["fedgkt"]["summary"]
    print(f"{'FedGKT (digits Dir(0.5), 10 clients)':<46} {'own test splits':>17} "
          f"{'all test data':>17}")
    for key in ("fedgkt_server_on_client_features", "fedgkt_client_heads",
                "fedgkt_alpha0_server_on_client_features", "local_only_small_models",
                "server_minus_local_only", "client_heads_alpha1_minus_alpha0"):
        print(f"  {key:<44} {fmt(gkt['own_test_data'][key]):>17} "
              f"{fmt(gkt['all_test_data'][key]):>17}")
    print(f"  bytes per round: up {gkt['bytes_up_per_round']['mean']:.0f}, down "
          f"{gkt['bytes_down_per_round']['mean']:.0f}, parameters "
          f"{gkt['parameter_bytes_per_round']:.0f}")
    print(f"\n{'FedGen':<16} {'sharing':<8} {'FedAvg':>17} {'FedGen':>17} {'gain':>18} "
          f"{'bytes up/down FedAvg':>22} {'FedGen':>16}")
    for alpha_name, alpha_result in results["fedgen"].items():
        for sharing, s in alpha_result["summary"].items():
            fedavg_bytes = (f"{s['fedavg_bytes_up_per_round']:.0f}/"
                            f"{s['fedavg_bytes_down_per_round']:.0f}")
            fedgen_bytes = (f"{s['fedgen_bytes_up_per_round']:.0f}/"
                            f"{s['fedgen_bytes_down_per_round']:.0f}")
            print(f"{alpha_name:<16} {sharing:<8} {fmt(s['fedavg_final_accuracy']):>17} "
                  f"{fmt(s['fedgen_final_accuracy']):>17} {fmt(s['fedgen_minus_fedavg']):>18} "
                  f"{fedavg_bytes:>22} {fedgen_bytes:>16}")
    print("\nclaims:", ", ".join(f"{k}={v}" for k, v in results["claims"].items()))
    print(f"wall time {results['settings']['wall_seconds']:.1f} s")


def main(argv=None) -> None:
    parser = experiment_parser(__doc__, rounds=60, seeds=[0, 1, 2],
                               output="results/knowledge_transfer")
    args = parse_args(parser, argv)
    print_table(run(args.rounds, args.seeds, args.output))


if __name__ == "__main__":
    main()
