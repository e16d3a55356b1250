"""What a federated data set looks like: clients, their sizes and their label skew.

`describe` summarises a `FederatedDataset` as a dict of plain numbers (JSON-ready), which
`format_description` prints as a small table; `plot_label_distribution` draws every client's
label distribution as a heatmap (clients x classes), the picture behind the numbers. Together
they are `fedjax-lab data describe`.

Label skew is measured as the mean over clients of the entropy of each client's label
distribution, in bits, next to the entropy of the pooled labels: a client that holds one class
has entropy 0, and IID clients approach the pooled entropy (at most log2 of the number of
classes). A client's labels are those of its train and test examples together, since both are
drawn from the client's own distribution; clients without any example are left out of the mean.

Pitfall: the plug-in entropy of a small sample is biased low (by about (K - 1) / (2 n ln 2) bits
for n examples of K equally likely classes), so even IID clients of 30 examples over 10 classes
score about 0.2 bits below the pooled entropy; compare partitions at equal client sizes.
"""

from __future__ import annotations

import numpy as np

from fedjax_lab.core.losses import IGNORE_LABEL
from fedjax_lab.data.federated import FederatedDataset


def client_label_counts(dataset: FederatedDataset):
    """Yields each client's [num_classes] label counts, train and test examples together (for
    next-token data, the counted target tokens: ignored targets are left out)."""
    for train, test in zip(dataset.train.y, dataset.test.y):
        labels = np.concatenate([train.ravel(), test.ravel()])
        yield np.bincount(labels[labels != IGNORE_LABEL], minlength=dataset.num_classes)


def entropy_bits(counts: np.ndarray) -> np.ndarray:
    """Entropy in bits of the distribution in each row of `counts` (0 for an empty row)."""
    counts = np.asarray(counts, np.float64)
    totals = counts.sum(-1, keepdims=True)
    shares = counts / np.where(totals > 0, totals, 1)
    return -(shares * np.log2(np.where(shares > 0, shares, 1))).sum(-1)


def _sizes(sizes: np.ndarray) -> dict:
    return {"total": int(sizes.sum()), "min": int(sizes.min()),
            "median": float(np.median(sizes)), "max": int(sizes.max())}


def describe(dataset: FederatedDataset) -> dict:
    """The numbers that characterise `dataset`, as plain Python values.

    Returns:
      {"name", "num_clients", "num_classes", "feature_shape" (list),
       "examples": {"train"|"test": {"total", "min", "median", "max"}} per client,
       "label_entropy_bits": {"mean_per_client", "pooled", "uniform" (log2 num_classes)},
       "classes_per_client": {"mean", "min", "max"} (distinct labels a client holds),
       "clients_without_examples"}
    """
    # One client's counts at a time: Stack Overflow's clients x classes would not fit in memory.
    pooled = np.zeros(dataset.num_classes, np.int64)
    entropies, held = [], []
    for counts in client_label_counts(dataset):
        pooled += counts
        if counts.any():
            entropies.append(entropy_bits(counts))
            held.append(np.count_nonzero(counts))
    if not held:
        raise ValueError(f"data set {dataset.name!r} has no examples to describe")
    return {
        "name": dataset.name,
        "num_clients": dataset.num_clients,
        "num_classes": dataset.num_classes,
        "feature_shape": list(dataset.feature_shape),
        "examples": {"train": _sizes(dataset.train.num_examples),
                     "test": _sizes(dataset.test.num_examples)},
        "label_entropy_bits": {
            "mean_per_client": float(np.mean(entropies)),
            "pooled": float(entropy_bits(pooled)),
            "uniform": float(np.log2(dataset.num_classes))},
        "classes_per_client": {"mean": float(np.mean(held)), "min": int(min(held)),
                               "max": int(max(held))},
        "clients_without_examples": dataset.num_clients - len(held),
    }


def format_description(description: dict) -> str:
    """`describe`'s dict as a small text table."""
    examples, entropy = description["examples"], description["label_entropy_bits"]
    classes = description["classes_per_client"]
    lines = [f"{description['name']}: {description['num_clients']} clients, "
             f"{description['num_classes']} classes, features "
             f"{tuple(description['feature_shape'])}",
             f"{'examples per client':<22}{'total':>8}{'min':>7}{'median':>8}{'max':>7}"]
    for split in ("train", "test"):
        sizes = examples[split]
        lines.append(f"  {split:<20}{sizes['total']:>8}{sizes['min']:>7}"
                     f"{sizes['median']:>8g}{sizes['max']:>7}")
    lines.append(f"{'label entropy (bits)':<22}mean per client {entropy['mean_per_client']:.3f}, "
                 f"pooled {entropy['pooled']:.3f}, uniform {entropy['uniform']:.3f}")
    lines.append(f"{'classes per client':<22}mean {classes['mean']:.2f}, min {classes['min']}, "
                 f"max {classes['max']}")
    if description["clients_without_examples"]:
        lines.append(f"{'clients without data':<22}{description['clients_without_examples']} "
                     "(left out of the entropy mean)")
    return "\n".join(lines)


def plot_label_distribution(dataset: FederatedDataset, path: str) -> str:
    """Writes a PNG heatmap of each client's label shares (rows: clients, columns: classes).

    Needs matplotlib (`pip install 'fedjax_lab[plot]'`); the file is written whole or not at all.
    Returns `path`.
    """
    from fedjax_lab.plotting import _pyplot, _save  # lazy: matplotlib only when drawing

    plt = _pyplot()
    counts = np.stack(list(client_label_counts(dataset)))
    totals = counts.sum(1, keepdims=True)
    shares = counts / np.where(totals > 0, totals, 1)
    summary = describe(dataset)["label_entropy_bits"]
    height = min(max(3.0, 0.12 * dataset.num_clients + 1.5), 16.0)
    width = min(max(5.0, 0.25 * dataset.num_classes + 2.5), 20.0)
    fig, ax = plt.subplots(figsize=(width, height))
    image = ax.imshow(shares, aspect="auto", interpolation="nearest", cmap="viridis",
                      vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="share of the client's examples")
    ax.set(xlabel="class", ylabel="client",
           title=f"{dataset.name}: label distribution per client\nmean entropy "
                 f"{summary['mean_per_client']:.2f} bits (pooled {summary['pooled']:.2f})")
    ax.title.set_fontsize(10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path
