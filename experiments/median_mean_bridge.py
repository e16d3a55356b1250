"""Bridging median and mean with noise: the 1-D example and one-class-per-client digits.

Reference: Chen, Chen, Sun, Wu, Hong. "Distributed Training with Heterogeneous Data: Bridging
Median- and Mean-Based Algorithms." NeurIPS 2020, arXiv 1906.01736 (ALGORITHMS.md §3e).

Part 1 (exact and Monte Carlo): f_i(x) = (x - a_i)^2 / 2 with a = (0, 0, 3), M = 3 nodes, so the
mean of the gradients vanishes at x = 1 and their median at x = 0. For each noise scale b the
fixed point x*(b) of the *expected* update of noisy signSGD (majority vote of 3 noisy signs) and
noisy medianSGD (median of 3 noisy gradients) is found by bisection, with Gaussian noise, and
compared with the time average of the library's `sign_sgd` / `median_sgd` run for many steps
with a small step (Monte Carlo: 16 independent chains per seed, standard error across chains; it
grows with b). x*(0) = 0 and x*(b) -> 1 as b grows. These runs call the factories: a registry
config cannot carry the 1-D problem's loss.

Part 2 (data): the 1797 scikit-learn digits, 10 nodes each holding one class, softmax regression,
every node in every round, full local gradients. signSGD and medianSGD with b in {0, 0.3, 1, 3}
times the median |g| of the first round, against plain (mean) gradient descent; final pooled
test accuracy after a fixed number of rounds. These methods are registry configs (`sign_sgd`,
`median_sgd`, `fedavg`).

    python -m experiments.median_mean_bridge [--rounds 300] [--seeds 0 1 2] [--output DIR]
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.stats import norm

from experiments.claims import Check, Claim, Measured, pm, print_claims, seeds_text
from experiments.common import (Method, band, chosen, experiment_parser, finals, mean_std,
                                parse_args, pyplot, registry_method, save_figure, start, sweep,
                                write_results)
from fedjax_lab.algorithms.median_mean import median_sgd, sign_sgd
from fedjax_lab.core import ClientBatch, client_keys, experiment_key
from fedjax_lab.data import digits
from fedjax_lab.experiment import run_experiment
from fedjax_lab.models import Model, logistic_regression

TARGETS = (0.0, 0.0, 3.0)
NOISE_SCALES_1D = (0.0, 0.3, 1.0, 3.0, 10.0, 30.0)
RELATIVE_NOISE_SCALES = (0.0, 0.3, 1.0, 3.0)
LEARNING_RATES = {"mean": 0.5, "sign": 0.03, "median": 0.5}


# ---- Part 1: the 1-D example --------------------------------------------------------------------

def _count_distribution(probabilities: jax.Array) -> jax.Array:
    """P(K = j), j = 0..M, for K a sum of independent Bernoulli(p_i) (last axis: the nodes)."""
    counts = jnp.zeros(probabilities.shape[:-1] + (probabilities.shape[-1] + 1,))
    counts = counts.at[..., 0].set(1.0)
    for i in range(probabilities.shape[-1]):
        p = probabilities[..., i:i + 1]
        shifted = jnp.concatenate([jnp.zeros_like(p), counts[..., :-1]], axis=-1)
        counts = counts * (1 - p) + shifted * p
    return counts


def expected_vote(x, targets, b):
    """E[sign(sum_i sign(x - a_i + b xi_i))] with xi_i ~ N(0, 1), b > 0."""
    positive = norm.cdf((x - jnp.asarray(targets)) / b)
    counts = _count_distribution(positive)
    num = len(targets)
    votes = jnp.sign(2 * jnp.arange(num + 1) - num)
    return jnp.sum(counts * votes, axis=-1)


def expected_median(x, targets, b, num_points: int = 40_001):
    """E[median_i(x - a_i + b xi_i)] for an odd number of nodes, by quadrature of the CDF."""
    targets = jnp.asarray(targets)
    num = len(targets)
    half_width = jnp.max(jnp.abs(x - targets)) + 12.0 * b
    t = jnp.linspace(-half_width, half_width, num_points)
    below = norm.cdf((t[:, None] - (x - targets)[None, :]) / b)
    median_cdf = jnp.sum(_count_distribution(below)[:, (num + 1) // 2:], axis=-1)
    # E[m] = L - int_{-L}^{L} F(t) dt for m in [-L, L]; this integrand has no jump at 0, which
    # the split form int (1 - F) - int F has and which costs the trapezoid rule ~1e-2.
    return half_width - jnp.trapezoid(median_cdf, t)


def fixed_point(expected_update, b, targets=TARGETS, low=-1.0, high=2.0, steps=40) -> float:
    """The root in [low, high] of x -> expected_update(x, targets, b), increasing in x."""
    update = jax.jit(lambda x: expected_update(x, targets, b))
    for _ in range(steps):
        middle = 0.5 * (low + high)
        if float(update(middle)) > 0:
            high = middle
        else:
            low = middle
    return 0.5 * (low + high)


def scalar_model() -> Model:
    """A 'model' that is one scalar x, so the algorithms run the 1-D problem unchanged."""
    return Model(init=lambda key: {"x": jnp.zeros((), jnp.result_type(float))},
                 apply=lambda params, x: jnp.zeros((x.shape[0], 2)), feature_shape=(1,),
                 num_classes=2)


def quadratic_loss(params, x, y, mask, rng):
    """f_i(x) = (x - a_i)^2 / 2, where the node's one example holds a_i."""
    del y, mask, rng
    return 0.5 * (params["x"] - x[0, 0]) ** 2


def one_dimensional_batch(round_index, targets=TARGETS, seed: int = 0) -> ClientBatch:
    """The M nodes of the 1-D example, each holding its a_i as its single example."""
    num = len(targets)
    ids = jnp.arange(num, dtype=jnp.int32)
    return ClientBatch(x=jnp.asarray(targets, jnp.result_type(float)).reshape(num, 1, 1),
                       y=jnp.zeros((num, 1), jnp.int32), mask=jnp.ones((num, 1), bool),
                       num_examples=jnp.ones(num, jnp.int32), client_ids=ids,
                       rng=client_keys(experiment_key(seed), round_index, ids))


def monte_carlo_fixed_point(rule: str, b: float, *, learning_rate: float = 1e-3,
                            num_steps: int = 200_000, seed: int = 0,
                            num_chains: int = 16) -> tuple[float, float]:
    """Mean over `num_chains` independent runs of the library's algorithm on the 1-D example of
    the average of each run's last half of iterates, and its standard error across the runs
    (iterates within a run are autocorrelated over ~1 / (delta * slope) steps, so errors are
    taken across independent runs, not within one)."""
    make = sign_sgd if rule == "sign" else median_sgd
    algorithm = make(scalar_model(), learning_rate=learning_rate, noise_scale=b,
                     loss=quadratic_loss)

    @jax.jit
    def chain_average(chain_seed):
        def step(state, t):
            state = algorithm.round(state, one_dimensional_batch(t, seed=chain_seed))
            return state, state.params["x"]
        trajectory = jax.lax.scan(step, algorithm.init(jax.random.key(0)),
                                  jnp.arange(num_steps))[1]
        return jnp.mean(trajectory[num_steps // 2:])

    chain_seeds = jnp.arange(num_chains) + num_chains * seed
    averages = np.asarray(jax.jit(jax.vmap(chain_average))(chain_seeds))
    return float(averages.mean()), float(averages.std(ddof=1) / np.sqrt(num_chains))


def run_one_dimensional(noise_scales=NOISE_SCALES_1D, num_steps: int = 200_000,
                        seeds=(0,)) -> dict:
    rows = {}
    for b in noise_scales:
        row = {}
        for rule, expected in (("sign", expected_vote), ("median", expected_median)):
            row[f"{rule}_exact"] = 0.0 if b == 0 else fixed_point(expected, b)
            runs = [monte_carlo_fixed_point(rule, b, num_steps=num_steps, seed=s) for s in seeds]
            means, errors = zip(*runs)
            row[f"{rule}_monte_carlo"] = dict(
                mean_std(means), per_seed=list(means),
                standard_error=float(np.sqrt(np.sum(np.square(errors))) / len(errors)))
        rows[f"{b:g}"] = row
    return rows


# ---- Part 2: one class per node on digits ------------------------------------------------------

def data_methods(learning_rates: dict) -> list[Method]:
    """The compared algorithms (b relative to the first median |g|, full local gradients)."""
    return [registry_method("mean_gd", "fedavg", weighting="uniform", client={
        "lr": learning_rates["mean"], "epochs": 1, "batch_size": None})] + [
        registry_method(f"{rule}_b{b:g}", f"{rule}_sgd", lr=learning_rates[rule], noise_scale=b,
                        noise_reference="median_gradient", batch_size=None)
        for rule in ("sign", "median") for b in RELATIVE_NOISE_SCALES]


def run_data(rounds: int, seeds, learning_rates: dict, method_names=None) -> dict:
    """Every method on the one-class-per-node digits; final pooled test accuracy per seed."""
    dataset = digits(10, partition="classes", classes_per_client=1)
    model = logistic_regression(dataset.feature_shape, dataset.num_classes)

    def run_seed(method, seed):
        result = run_experiment(method.build(model, dataset.info()), dataset, num_rounds=rounds,
                                cohort_size=10, seed=seed, eval_every=max(rounds // 30, 1),
                                progress=False)
        return {"curve": [e["test"]["accuracy"] for e in result.evaluations],
                "eval_rounds": [e["round"] for e in result.evaluations],
                "bytes_up_per_round": result.history[-1]["bytes_up"],
                "noise_scale_absolute": result.history[-1].get("noise_scale", 0.0)}

    results = {}
    for name, runs in sweep(chosen(data_methods(learning_rates), method_names), seeds,
                            run_seed).items():
        last = list(runs.values())[-1]
        results[name] = {"final_test_accuracy": mean_std(finals(runs, "curve")),
                         "accuracies": finals(runs, "curve"),
                         "eval_rounds": last["eval_rounds"],
                         "curves": [run["curve"] for run in runs.values()],
                         "bytes_up_per_round": last["bytes_up_per_round"],
                         "noise_scale_absolute": last["noise_scale_absolute"]}
    return results


def run(rounds: int = 300, seeds=(0,), output: str = "results/median_mean_bridge", *,
        monte_carlo_steps: int = 200_000, noise_scales=NOISE_SCALES_1D,
        learning_rates=None, curve_points: int = 13, method_names=None) -> dict:
    """Both parts; writes results.json and median_mean_bridge.png into `output`."""
    seeds, started = start(output, seeds)
    learning_rates = dict(LEARNING_RATES, **(learning_rates or {}))
    with jax.enable_x64(True):
        one_dimensional = run_one_dimensional(noise_scales, monte_carlo_steps, seeds)
        curve_b = np.geomspace(0.1, 30.0, curve_points)
        curve = {rule: [fixed_point(expected, b) for b in curve_b]
                 for rule, expected in (("sign", expected_vote), ("median", expected_median))}
    results = {
        "settings": {"paper": "Chen et al., NeurIPS 2020, arXiv 1906.01736", "rounds": rounds,
                     "seeds": seeds, "targets": list(TARGETS), "noise": "gaussian",
                     "monte_carlo": {"learning_rate": 1e-3, "steps": monte_carlo_steps,
                                     "chains_per_seed": 16,
                                     "average": "last half of the iterates"},
                     "data": "sklearn digits, node c holds class c, softmax regression, every "
                             "node every round, full local gradients",
                     "relative_noise_scales": list(RELATIVE_NOISE_SCALES),
                     "learning_rates": learning_rates},
        "one_dimensional": one_dimensional,
        "fixed_point_curve": {"b": curve_b.tolist(), **curve},
        "data": run_data(rounds, seeds, learning_rates, method_names),
    }
    write_results(output, results, started)
    plot(results, os.path.join(output, "median_mean_bridge.png"))
    return results


def plot(results: dict, path: str) -> None:
    """Fixed point against b (exact curve, Monte Carlo points) and digits accuracy per round."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    curve = results["fixed_point_curve"]
    for rule, marker in (("sign", "o"), ("median", "s")):
        line, = axes[0].plot(curve["b"], curve[rule], label=f"{rule}: root of expected update")
        points = [(float(b), row[f"{rule}_monte_carlo"]["mean"])
                  for b, row in results["one_dimensional"].items() if float(b) > 0]
        axes[0].plot(*zip(*points), marker, color=line.get_color(), fillstyle="none",
                     label=f"{rule}: Monte Carlo")
    axes[0].axhline(1.0, color="grey", linestyle="--", linewidth=1, label="mean (x = 1)")
    axes[0].axhline(0.0, color="grey", linestyle=":", linewidth=1, label="median (x = 0)")
    axes[0].set(xscale="log", xlabel="noise scale b", ylabel="fixed point x*(b)",
                title="a = (0, 0, 3): the fixed point moves from median to mean")
    for ax, rule in ((axes[1], "sign"), (axes[2], "median")):
        for name, method in results["data"].items():
            if name.startswith(rule) or name == "mean_gd":
                band(ax, method["eval_rounds"], method["curves"], name)
        ax.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1),
               title=f"one class per node: {rule}SGD, b x first median |g|")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)




def measure_median_mean(results: dict) -> Measured:
    s, one_d, data = results["settings"], results["one_dimensional"], results["data"]
    scales = sorted(one_d, key=float)
    numbers = ["1-D fixed point x*(b), exact (Monte Carlo) sign / median: " + "; ".join(
                   f"b = {b}: {one_d[b]['sign_exact']:.3f} "
                   f"({one_d[b]['sign_monte_carlo']['mean']:.3f}) / "
                   f"{one_d[b]['median_exact']:.3f} "
                   f"({one_d[b]['median_monte_carlo']['mean']:.3f})" for b in scales),
               "digits test accuracy: " + ", ".join(
                   f"{name.replace('_b', '(b=') + ')' if '_b' in name else 'mean GD'} "
                   f"{pm(data[name]['final_test_accuracy'])}"
                   for name in ("sign_b0", "sign_b3", "median_b0", "median_b3", "mean_gd"))]
    exact = {kind: [one_d[b][f"{kind}_exact"] for b in scales] for kind in ("sign", "median")}
    accuracy = lambda name: data[name]["final_test_accuracy"]["mean"]
    checks = [
        Check("noiseless fixed point is the median 0 (sign and median)",
              max(abs(exact[kind][0]) for kind in exact) < 1e-6),
        Check("x*(b) grows with b and is within 0.01 of the mean 1 at the largest b",
              all(np.all(np.diff(v) > 0) and abs(v[-1] - 1) <= 0.01 for v in exact.values())),
        Check("Monte Carlo runs within 0.02 of the exact fixed points",
              all(abs(one_d[b][f"{kind}_monte_carlo"]["mean"] - one_d[b][f"{kind}_exact"])
                  <= 0.02 for b in scales for kind in ("sign", "median"))),
        Check("noisy (b = 3) beats noiseless on digits, sign and median",
              accuracy("sign_b3") > accuracy("sign_b0")
              and accuracy("median_b3") > accuracy("median_b0"))]
    setting = (f"f_i(x) = (x - a_i)²/2, a = (0, 0, 3), Gaussian noise; digits with one class per "
               f"node (10 nodes), softmax regression, full gradients, b in "
               f"{{{', '.join(f'{b:g}' for b in s['relative_noise_scales'])}}} × median |g|; "
               f"{s['rounds']} rounds, {seeds_text(s)}")
    return Measured(setting, numbers, checks)


CLAIMS = (
    Claim("Noisy signSGD / medianSGD", "Sign and median of heterogeneous gradients converge to "
          "the wrong point (the median's); noise added to each local gradient bridges them to the "
          "mean as its scale b grows, and noisy versions beat noiseless ones on skewed data.",
          ("median_mean_bridge.png",), measure_median_mean),
)


def main(argv=None) -> None:
    parser = experiment_parser(__doc__, rounds=300, seeds=[0],
                               output="results/median_mean_bridge")
    parser.add_argument("--monte-carlo-steps", type=int, default=200_000)
    args = parse_args(parser, argv, counts=("rounds", "monte_carlo_steps"))
    print_claims(CLAIMS, run(args.rounds, args.seeds, args.output,
                             monte_carlo_steps=args.monte_carlo_steps))


if __name__ == "__main__":
    main()
