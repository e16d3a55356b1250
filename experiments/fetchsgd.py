"""FetchSGD against uncompressed momentum SGD, true top-k and local top-k on non-IID digits.

Reference: Rothchild et al. "FetchSGD: Communication-Efficient Federated Learning with
Sketching." ICML 2020, arXiv 2007.07682 (ALGORITHMS.md §6e).

Setting: the 1797 scikit-learn digits sorted by label and cut into 100 shards, one a client
(McMahan et al.'s pathological split with one shard: most clients hold a single class, as the
paper's CIFAR-10 clients do), about 14 training images each; an MLP 64-128-10 (d = 9,610);
10 clients per round, each sending one gradient of all its training images (the paper's clients
hold 5 images and send one gradient). Server momentum rho = 0.9 and step eta for every method;
sketches have r = 5 rows and c = d / 20 columns (upload 4x smaller than d floats), and k = d / 100
coordinates are applied per round. Methods, all under the same seeds (same cohorts):
- uncompressed momentum SGD;
- true top-k (dense uploads, top k of the server's momentum-and-error vector; FetchSGD's ideal);
- FetchSGD with the paper's subtraction, with the reference code's bucket zeroing ("zero"),
  "zero" with the optional second round of communication (2k candidates), and "zero" with one
  row of 5c columns (the same upload);
- local top-k with and without error feedback at the same k, and without error feedback at the
  k whose upload (values and int32 indices) equals FetchSGD's sketch ("upload_matched").
Communication is the library's `bytes_up` / `bytes_down`; downloads use the reference code's
catch-up accounting (a client fetches the coordinates changed since it last took part). The
compression ratios are uncompressed momentum SGD's total bytes over each method's. Every method is
a registry config (`momentum_sgd`, `true_topk`, `fetchsgd`, `local_topk`) without client weight
decay, whose sizes are fractions of d.

    python -m experiments.fetchsgd [--rounds 300] [--seeds 0 1 2] [--output DIR]
"""

import os

import numpy as np

from experiments.claims import NEAR, Check, Claim, Measured, pm, print_claims, seeds_text
from experiments.common import (Method, band, chosen, experiment_parser, finals, mean_std,
                                parse_args, pyplot, registry_method, save_figure, start, sweep,
                                write_results)
from fedjax_lab.algorithms.compressed import model_dim
from fedjax_lab.data import digits
from fedjax_lab.experiment import run_experiment
from fedjax_lab.models import mlp

NUM_CLIENTS = 100
COHORT_SIZE = 10
HIDDEN = (128,)
SHARDS_PER_CLIENT = 1
NUM_ROWS = 5


def fraction(count: int, dim: int) -> float:
    """The fraction of d that the registry's sizes (int(d * fraction)) turn back into `count`."""
    return (count + 0.5) / dim


def methods(*, learning_rate: float, dim: int, num_columns: int, k: int) -> list[Method]:
    """Every compared method, for a model of `dim` parameters."""
    matched_k = NUM_ROWS * num_columns // 2  # k values + k int32 indices = the sketch's bytes
    common = dict(lr=learning_rate, momentum=0.9, client={"weight_decay": 0.0})
    top = dict(common, k_fraction=fraction(k, dim))
    sketch = dict(top, num_rows=NUM_ROWS, column_fraction=fraction(num_columns, dim))
    return [
        registry_method("uncompressed", "momentum_sgd", **common),
        registry_method("true_topk", "true_topk", **top, error_update="subtract"),
        registry_method("fetchsgd", "fetchsgd", **sketch, error_update="subtract"),
        registry_method("fetchsgd_zero", "fetchsgd", **sketch),
        registry_method("fetchsgd_zero_second_round", "fetchsgd", **sketch, second_round=2.0),
        registry_method("fetchsgd_zero_one_row", "fetchsgd", **dict(
            sketch, num_rows=1, column_fraction=fraction(NUM_ROWS * num_columns, dim))),
        registry_method("local_topk_ef", "local_topk", **top),
        registry_method("local_topk_no_ef", "local_topk", **top, error_feedback=False),
        registry_method("local_topk_no_ef_upload_matched", "local_topk", **dict(
            top, k_fraction=fraction(matched_k, dim)), error_feedback=False),
    ]


def run(rounds: int = 300, seeds=(0,), output: str = "results/fetchsgd", *,
        learning_rate: float = 0.1, column_fraction: float = 1 / 20,
        k_fraction: float = 1 / 100, method_names=None) -> dict:
    """Runs every method and seed; writes results.json and fetchsgd.png into `output`."""
    seeds, started = start(output, seeds)
    dataset = digits(NUM_CLIENTS, partition="shards", shards_per_client=SHARDS_PER_CLIENT)
    model = mlp(dataset.feature_shape, dataset.num_classes, hidden=HIDDEN)
    dim = model_dim(model)
    num_columns, k = max(int(dim * column_fraction), 1), max(int(dim * k_fraction), 1)
    compared = chosen(methods(learning_rate=learning_rate, dim=dim, num_columns=num_columns, k=k),
                      method_names)
    results = {"settings": {
        "paper": "Rothchild et al., ICML 2020, arXiv 2007.07682", "rounds": rounds,
        "seeds": seeds, "num_clients": NUM_CLIENTS, "cohort_size": COHORT_SIZE,
        "model": f"mlp{HIDDEN}", "dim": dim, "num_rows": NUM_ROWS, "num_columns": num_columns,
        "k": k, "local_topk_upload_matched_k": NUM_ROWS * num_columns // 2,
        "learning_rate": learning_rate, "shards_per_client": SHARDS_PER_CLIENT,
        "momentum": 0.9, "client_update": "one gradient of all the client's training images",
        "download_accounting": "changes since the client last took part (reference code)",
        "data": dataset.metadata}, "methods": {}}

    def run_seed(method, seed):
        # The paper's subtraction can diverge at this sketch size (the reference code's comment
        # says so); record that instead of stopping the experiment.
        result = run_experiment(method.build(model, dataset.info()), dataset, num_rounds=rounds,
                                cohort_size=COHORT_SIZE, seed=seed,
                                eval_every=max(rounds // 30, 1), progress=False,
                                allow_divergence=True)
        return {"test_accuracy": [e["test"]["accuracy"] for e in result.evaluations],
                "eval_rounds": [e["round"] for e in result.evaluations],
                "bytes_up": float(sum(row["bytes_up"] for row in result.history)),
                "bytes_down": float(sum(row["bytes_down"] for row in result.history)),
                "diverged": not all(np.isfinite(row["update_norm"]) for row in result.history),
                "seconds": result.seconds}

    results["methods"] = {name: {"runs": runs}
                          for name, runs in sweep(compared, seeds, run_seed).items()}
    _summarize(results)
    write_results(output, results, started)
    plot(results, os.path.join(output, "fetchsgd.png"))
    return results


def _summarize(results: dict) -> None:
    """Final accuracy (mean, std over seeds) and compression against uncompressed."""
    mean_bytes = lambda method, key: float(np.mean([run[key] for run in method["runs"].values()]))
    reference = results["methods"].get("uncompressed")
    for method in results["methods"].values():
        up, down = mean_bytes(method, "bytes_up"), mean_bytes(method, "bytes_down")
        summary = {"final_test_accuracy": mean_std(finals(method["runs"], "test_accuracy")),
                   "bytes_up": up, "bytes_down": down}
        if reference is not None:
            ref_up, ref_down = mean_bytes(reference, "bytes_up"), mean_bytes(reference,
                                                                             "bytes_down")
            summary.update(upload_compression=ref_up / up, download_compression=ref_down / down,
                           total_compression=(ref_up + ref_down) / (up + down))
        method["summary"] = summary


def plot(results: dict, path: str) -> None:
    """Test accuracy per round (mean over seeds, min-max band) and accuracy vs total bytes."""
    plt = pyplot()
    fig, (by_round, by_bytes) = plt.subplots(1, 2, figsize=(13, 4.8))
    rounds_total = results["settings"]["rounds"]
    for name, method in results["methods"].items():
        runs = list(method["runs"].values())
        curves = np.array([run["test_accuracy"] for run in runs])
        rounds = np.asarray(runs[0]["eval_rounds"])
        summary = method["summary"]
        label = name + (f" ({summary['total_compression']:.1f}x)"
                        if "total_compression" in summary else "")
        line = band(by_round, rounds, curves, label)
        total = (summary["bytes_up"] + summary["bytes_down"]) * rounds / rounds_total / 1e6
        by_bytes.plot(total, curves.mean(0), color=line.get_color(), label=name)
    by_round.set(xlabel="round", ylabel="test accuracy", title="accuracy (legend: total "
                 "compression vs uncompressed)")
    by_bytes.set(xlabel="MB sent (up + down, approx. linear in rounds)", ylabel="test accuracy",
                 xscale="log", title="accuracy vs communication")
    for ax in (by_round, by_bytes):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    s = results["settings"]
    fig.suptitle(f"digits, {s['shards_per_client']} shard(s)/client, MLP d={s['dim']}, "
                 f"r={s['num_rows']}, c={s['num_columns']}, k={s['k']}, seeds {s['seeds']}")
    save_figure(fig, path)




def measure_fetchsgd(results: dict) -> Measured:
    s, methods = results["settings"], results["methods"]
    summary = lambda m: methods[m]["summary"]
    accuracy = lambda m: summary(m)["final_test_accuracy"]["mean"]
    labels = {"uncompressed": "uncompressed", "true_topk": "true top-k",
              "fetchsgd_zero": "FetchSGD (reference zeroing)",
              "fetchsgd": "FetchSGD (paper's subtraction)",
              "local_topk_no_ef": "local top-k, no EF"}
    numbers = ["test accuracy (total compression): " + ", ".join(
        f"{label} {pm(summary(m)['final_test_accuracy'])} ({summary(m)['total_compression']:.1f}×)"
        for m, label in labels.items())]
    checks = [
        Check(f"FetchSGD (reference) within {NEAR:g} of uncompressed",
              accuracy("uncompressed") - accuracy("fetchsgd_zero") <= NEAR),
        Check(f"FetchSGD (paper's subtraction) within {NEAR:g} of uncompressed",
              accuracy("uncompressed") - accuracy("fetchsgd") <= NEAR),
        Check(f"true top-k within {NEAR:g} of uncompressed",
              accuracy("uncompressed") - accuracy("true_topk") <= NEAR),
        Check(f"local top-k without EF more than {NEAR:g} below FetchSGD (reference)",
              accuracy("fetchsgd_zero") - accuracy("local_topk_no_ef") > NEAR)]
    setting = (f"digits, {s['num_clients']} clients of one label shard, MLP 64-128-10 "
               f"(d = {s['dim']}), {s['cohort_size']} per round, one gradient each, momentum "
               f"{s['momentum']:g}; sketch {s['num_rows']} × {s['num_columns']}, k = {s['k']}; "
               f"{s['rounds']} rounds, {seeds_text(s)}")
    return Measured(setting, numbers, checks)


CLAIMS = (
    Claim("FetchSGD", "Sketched momentum and error feedback on the server keep accuracy close to "
          "uncompressed SGD and true top-k at high compression, where local top-k without error "
          "feedback loses more.",
          ("fetchsgd.png",), measure_fetchsgd),
)


def main(argv=None) -> None:
    parser = experiment_parser(__doc__, rounds=300, seeds=[0], output="results/fetchsgd")
    parser.add_argument("--learning-rate", type=float, default=0.1)
    args = parse_args(parser, argv)
    print_claims(CLAIMS, run(args.rounds, args.seeds, args.output,
                             learning_rate=args.learning_rate))


if __name__ == "__main__":
    main()
