"""A sweep's summary: per setting, the mean ± std over seeds of the final metrics, the best
setting, and a plot of each setting's curve (mean over seeds, min-max band).

`metric` is a key of the final test evaluation (`accuracy`, `client_accuracy_mean`, ...; a
view's as `adapted.accuracy`); metrics whose name ends in "loss" are better lower. Diverged
points are counted and left out of their setting's statistics.
"""

import json
import math
import os

import numpy as np

from fedjax_lab import experiment

SUMMARY_FILE = "summary.json"
TABLE_FILE = "summary.md"
PLOT_FILE = "sweep.png"


def _final_value(summary: dict, metric: str):
    value = (summary.get("final") or {}).get("test", {})
    for part in metric.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _stats(values) -> dict | None:
    values = np.asarray([v for v in values if v is not None and math.isfinite(v)], np.float64)
    if not values.size:
        return None
    return {"mean": float(values.mean()), "std": float(values.std()),
            "min": float(values.min()), "max": float(values.max())}


def summarize_points(points, metric: str) -> dict:
    """The sweep summary of finished points (each folder's summary.json and evaluations)."""
    settings: dict[tuple, list] = {}
    for point in points:
        settings.setdefault(point.setting, []).append(point)
    rows = []
    for setting, members in settings.items():
        summaries = []
        for point in members:
            with open(os.path.join(point.config.run.output, experiment.SUMMARY_FILE)) as f:
                summaries.append(json.load(f))
        kept = [s for s in summaries if "diverged" not in s]
        metric_stats = _stats([_final_value(s, metric) for s in kept])
        rows.append({"setting": dict(setting), "seeds": [p.seed for p in members],
                     "diverged": len(summaries) - len(kept), metric: metric_stats,
                     "final_train_loss": _stats([s["final_train_loss"] for s in kept])})
    lower_is_better = metric.endswith("loss")
    scored = [row for row in rows if row[metric] is not None]
    best = None
    if scored:
        pick = min if lower_is_better else max
        best = pick(scored, key=lambda row: row[metric]["mean"])["setting"]
    return {"metric": metric, "lower_is_better": lower_is_better, "settings": rows,
            "best": best}


def table(summary: dict) -> str:
    """The summary as a Markdown table, the best setting marked."""
    metric = summary["metric"]
    lines = [f"| setting | seeds | diverged | final {metric} (mean ± std) | final train loss |",
             "|---|---|---|---|---|"]
    for row in summary["settings"]:
        name = ", ".join(f"{k}={v}" for k, v in row["setting"].items()) or "(base)"
        if row["setting"] == summary["best"]:
            name = f"**{name}** (best)"
        cell = lambda s: "—" if s is None else f"{s['mean']:.4f} ± {s['std']:.4f}"
        lines.append(f"| {name} | {len(row['seeds'])} | {row['diverged']} | "
                     f"{cell(row[metric])} | {cell(row['final_train_loss'])} |")
    return "\n".join(lines) + "\n"


def plot(output: str, points, metric: str) -> str | None:
    """Each setting's test `metric` against the round; None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    settings: dict[tuple, list] = {}
    for point in points:
        settings.setdefault(point.setting, []).append(point)
    for setting, members in settings.items():
        curves = []
        for point in members:
            with open(os.path.join(point.config.run.output, experiment.EVALUATIONS_FILE)) as f:
                rows = [json.loads(line) for line in f]
            curves.append([(row["round"], _final_value({"final": row}, metric)) for row in rows])
        length = min(len(c) for c in curves)
        if not length:
            continue
        rounds = [r for r, _ in curves[0][:length]]
        values = np.asarray([[v for _, v in c[:length]] for c in curves], np.float64)
        label = ", ".join(f"{k}={v}" for k, v in setting) or "base"
        line, = ax.plot(rounds, values.mean(axis=0), label=label)
        ax.fill_between(rounds, values.min(axis=0), values.max(axis=0), alpha=0.2,
                        color=line.get_color(), linewidth=0)
    ax.set_xlabel("round")
    ax.set_ylabel(f"test {metric}")
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = os.path.join(output, PLOT_FILE)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(output: str, points, metric: str) -> dict:
    """Writes summary.json, summary.md and sweep.png into `output`; returns the summary."""
    summary = summarize_points(points, metric)
    experiment.write_json_atomic(os.path.join(output, SUMMARY_FILE), summary)
    with open(os.path.join(output, TABLE_FILE), "w") as out:
        out.write(table(summary))
    plot(output, points, metric)
    return summary
