"""`fedjax-lab plot`: learning curves and per-client accuracy of saved runs, as PNG files.

A run folder (what `fedjax-lab run --output DIR` or `run_experiment(output_dir=...)` writes)
holds metrics.jsonl (one line per round, with `train_loss`), evaluations.jsonl (one line per
evaluation, with the pooled test `accuracy`) and config.json. Two figures are drawn for one or
several runs:
- curves: training loss per round and test accuracy per evaluation, one line per run;
- clients: the distribution over clients of the last evaluation's test accuracy, one box (with
  every client as a dot) per run. Runs saved before the last evaluation kept
  `client_accuracies` only have the deciles, which are drawn instead and marked as such.

The accuracy reported is that of the last evaluation, never the best one. matplotlib is imported
only when a figure is drawn (`pip install 'fedjax_lab[plot]'`).
"""

import json
import os
from typing import NamedTuple

import numpy as np

from fedjax_lab.experiment import CONFIG_FILE, EVALUATIONS_FILE, METRICS_FILE

CURVES_FILE = "curves.png"
CLIENTS_FILE = "client_accuracy.png"


class RunFolderError(ValueError):
    """A folder given to `fedjax-lab plot` is not a usable run folder; the message names it."""


class Run(NamedTuple):
    """One saved run: its folder, legend label, per-round metrics, evaluations and config."""

    folder: str
    label: str
    metrics: list[dict]
    evaluations: list[dict]
    config: dict


def _read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise RunFolderError(f"{path} line {number} is not JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise RunFolderError(f"{path} line {number} is not a JSON object")
            rows.append(row)
    return rows


def load_run(folder: str) -> Run:
    """Reads a run folder; raises `RunFolderError` naming the folder if it is not one."""
    if not os.path.isdir(folder):
        raise RunFolderError(f"{folder!r} is not a folder")
    metrics_path = os.path.join(folder, METRICS_FILE)
    if not os.path.isfile(metrics_path):
        raise RunFolderError(f"{folder!r} is not a run folder: it has no {METRICS_FILE}")
    metrics = _read_jsonl(metrics_path)
    if not metrics:
        raise RunFolderError(f"{folder!r} has no metrics: {METRICS_FILE} is empty")
    if any("round" not in row or "train_loss" not in row for row in metrics):
        raise RunFolderError(f"{metrics_path} has rows without 'round' or 'train_loss'")
    evaluations_path = os.path.join(folder, EVALUATIONS_FILE)
    evaluations = _read_jsonl(evaluations_path) if os.path.isfile(evaluations_path) else []
    if any("round" not in row or "accuracy" not in row.get("test", {}) for row in evaluations):
        raise RunFolderError(f"{evaluations_path} has rows without 'round' or a test accuracy")
    config = {}
    config_path = os.path.join(folder, CONFIG_FILE)
    if os.path.isfile(config_path):
        try:
            with open(config_path) as f:
                config = json.load(f)
        except json.JSONDecodeError as error:
            raise RunFolderError(f"{config_path} is not JSON ({error.msg})") from None
    name = os.path.basename(os.path.normpath(os.path.abspath(folder)))
    algorithm = config.get("algorithm") if isinstance(config, dict) else None
    if isinstance(algorithm, dict):
        algorithm = algorithm.get("name")
    label = name if not algorithm or algorithm in name else f"{name} ({algorithm})"
    return Run(folder, label, metrics, evaluations, config if isinstance(config, dict) else {})


def _unique_labels(runs: list[Run]) -> list[Run]:
    """Runs whose folders share a name are told apart by their parent folder."""
    labels = [run.label for run in runs]
    return [run._replace(label=os.path.join(
                os.path.basename(os.path.dirname(os.path.abspath(run.folder))), run.label))
            if labels.count(run.label) > 1 else run for run in runs]


def client_accuracies(run: Run) -> tuple[list[float], bool]:
    """(accuracies, exact) of the last evaluation: every client's, or only the deciles."""
    if not run.evaluations:
        return [], False
    test = run.evaluations[-1]["test"]
    if "client_accuracies" in test:
        return [a for a in test["client_accuracies"] if a is not None], True
    return list(test.get("client_accuracy_deciles", [])), False


def output_paths(runs: list[Run], output: str | None) -> tuple[str, str]:
    """(curves PNG, clients PNG) for `output`: a .png file name, a folder, or None.

    None writes into the run's folder for one run and into the current folder for several; a
    name ending in .png is the curves figure and the clients figure goes beside it.
    """
    if output is None:
        output = runs[0].folder if len(runs) == 1 else os.curdir
    if output.lower().endswith(".png"):
        stem = output[:-len(".png")]
        return output, f"{stem}_clients.png"
    return os.path.join(output, CURVES_FILE), os.path.join(output, CLIENTS_FILE)


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("plotting needs matplotlib: pip install 'fedjax_lab[plot]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str) -> None:
    """Writes a figure to a temporary file and renames it, so no half-written PNG is left."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    try:
        fig.savefig(temporary, dpi=100, format="png")
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _color(index: int) -> str:
    """The same colour for a run in both figures (matplotlib's default cycle)."""
    return f"C{index % 10}"


def plot_curves(runs: list[Run], path: str) -> None:
    """Training loss per round (left) and test accuracy per evaluation (right)."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, (loss_ax, accuracy_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for index, run in enumerate(runs):
        loss_ax.plot([row["round"] for row in run.metrics],
                     [row["train_loss"] for row in run.metrics], linewidth=1.2,
                     color=_color(index), label=run.label)
        if run.evaluations:
            accuracy_ax.plot([row["round"] for row in run.evaluations],
                             [row["test"]["accuracy"] for row in run.evaluations],
                             marker="o", markersize=3, color=_color(index), label=run.label)
    loss_ax.set(title="training loss (mean over the round's cohort)", xlabel="round",
                ylabel="train_loss")
    accuracy_ax.set(title="test accuracy (pooled over clients)", xlabel="round",
                    ylabel="accuracy")
    for ax in (loss_ax, accuracy_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.title.set_fontsize(10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_clients(runs: list[Run], path: str) -> None:
    """Per-client test accuracy of each run's last evaluation: a box and every client's dot."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(runs) + 2.5), 4.5))
    rng = np.random.default_rng(0)  # jitter only spreads the dots; it is not data
    labels = []
    for position, run in enumerate(runs, 1):
        color = _color(position - 1)
        values, exact = client_accuracies(run)
        last = run.evaluations[-1]["round"] if run.evaluations else None
        if last is None:
            labels.append(f"{run.label}\n(no evaluation)")
            continue
        if exact:
            labels.append(f"{run.label}\nround {last}, {len(values)} clients")
            ax.boxplot([values], positions=[position], widths=0.5, showfliers=False,
                       medianprops={"color": "black"})
            ax.scatter(position + rng.uniform(-0.18, 0.18, len(values)), values, s=10,
                       alpha=0.6, color=color, zorder=3)
        else:
            labels.append(f"{run.label}\nround {last}, deciles only")
            ax.scatter([position] * len(values), values, marker="_", s=300, color=color,
                       zorder=3)
        ax.scatter([position], [run.evaluations[-1]["test"]["client_accuracy_mean"]],
                   marker="D", color="black", s=25, zorder=4,
                   label="client mean" if position == 1 else None)
    ax.set_xticks(range(1, len(runs) + 1), labels, fontsize=8)
    ax.set_xlim(0.4, len(runs) + 0.6)
    ax.set(title="test accuracy per client at the last evaluation", ylabel="accuracy")
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3, axis="y")
    if any(run.evaluations for run in runs):
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_runs(folders: list[str], output: str | None = None) -> tuple[str, str]:
    """Reads every run folder, then writes the curves and clients figures; returns their paths.

    Every folder is checked before anything is drawn or written.
    """
    if not folders:
        raise RunFolderError("no run folder given")
    runs = _unique_labels([load_run(folder) for folder in folders])
    curves_path, clients_path = output_paths(runs, output)
    plot_curves(runs, curves_path)
    plot_clients(runs, clients_path)
    return curves_path, clients_path
