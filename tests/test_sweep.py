"""Sweeps: every grid point equals its configuration run alone; one program per structure;
chunks run at once in threads change nothing; bad grids refused before anything runs; resume
after an interruption."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import warnings

import jax
import pytest

from fedjax_lab import compiled, options, sweep, sweep_grid
from fedjax_lab import config as run_config
from fedjax_lab.algorithms import REGISTRY
from fedjax_lab.options import OptionError

BASE = {"data": {"name": "digits", "num_clients": 8}, "model": {"name": "logistic"},
        "run": {"rounds": 2, "cohort_size": 4, "eval_every": 2}}
# (algorithm, the sweepable option varied, its values): FedAvg, FedProx, Ditto, FedMeta and
# FedAMP, whose attention also gathers the whole population's state.
SWEEPS = [("fedavg", "algorithm.client.lr", [0.05, 0.2]),
          ("fedprox", "algorithm.mu", [0.0, 0.5]),
          ("ditto", "algorithm.lam", [0.1, 1.0]),
          ("fedmeta", "algorithm.inner_lr", [0.05, 0.2]),
          ("fedamp", "algorithm.lam", [0.5, 1.0])]


# A vmapped program may sum float32 terms (a client's cross-entropies, the cohort's losses) in
# another order than the single run's, so float metrics agree to float32 rounding: at most a few
# ulp measured (relative 1e-7) over these two-round runs, bounded here at 1e-5 (also each
# client's perplexity); integers, counts and accuracies agree exactly, and FedAvg's training
# metrics are bit for bit.
RTOL = 1e-5


def _assert_rows_equal(swept: list[dict], single: list[dict]) -> None:
    assert len(swept) == len(single)
    for swept_row, single_row in zip(swept, single):
        swept_row, single_row = options.flatten(swept_row), options.flatten(single_row)
        assert swept_row.keys() == single_row.keys()
        for path, value in swept_row.items():
            name = path.rpartition(".")[2]
            if isinstance(value, float) and name != "accuracy":
                assert value == pytest.approx(single_row[path], rel=RTOL, abs=1e-7), path
            elif name == "client_perplexities":  # exponentiated float32 losses
                assert value == pytest.approx(single_row[path], rel=RTOL), path
            else:
                assert value == single_row[path], path


def assert_same_run(folder: str, alone: str) -> None:
    for file in ("metrics.jsonl", "evaluations.jsonl"):
        _assert_rows_equal(_lines(folder, file), _lines(alone, file))


def _rerun_alone(folder: str, output: str) -> str:
    """Runs a sweep point's saved config alone into `output`; returns `output`."""
    config = run_config.load_config(os.path.join(folder, "config.json"))
    run_config.run(dataclasses.replace(config, run=dataclasses.replace(config.run, output=output)),
                   progress=False)
    return output


def _lines(folder: str, name: str) -> list[dict]:
    with open(os.path.join(folder, name)) as f:
        return [json.loads(line) for line in f]


def _base(algorithm: str) -> dict:
    return options.merge(BASE, {"algorithm": {"name": algorithm}})


@pytest.mark.parametrize("algorithm, option, values", SWEEPS, ids=[s[0] for s in SWEEPS])
def test_every_grid_point_equals_its_config_run_alone(tmp_path, algorithm, option, values):
    output = str(tmp_path / "sweep")
    # All four points stacked in one vmapped program (on CPU the default runs them one by one).
    summary = sweep.sweep(_base(algorithm), [0, 1], {option: values}, output,
                          points_per_program=4, progress=False)
    assert [row["setting"] for row in summary["settings"]] == [{option: v} for v in values]
    points = sorted(os.listdir(os.path.join(output, sweep_grid.POINTS_DIR)))
    assert len(points) == 4
    # Two points (both values, both seeds) rerun alone from their saved configs.
    for name in (points[0], points[-1]):
        folder = os.path.join(output, sweep_grid.POINTS_DIR, name)
        assert_same_run(folder, _rerun_alone(folder, str(tmp_path / f"alone-{name}")))


def _point_alone_and_run_alone(folder, base: dict, seed: int, grid: dict) -> tuple[str, str]:
    """A one-point sweep of `base` in `folder` (one point per program, the CPU default: the
    single run's programs, not a vmap over one) and its config rerun alone: both folders."""
    sweep.sweep(base, [seed], grid, os.path.join(folder, "sweep"), points_per_program=1,
                progress=False)
    [name] = os.listdir(os.path.join(folder, "sweep", sweep_grid.POINTS_DIR))
    point = os.path.join(folder, "sweep", sweep_grid.POINTS_DIR, name)
    return point, _rerun_alone(point, os.path.join(folder, "alone"))


@pytest.mark.parametrize("algorithm, option, values", SWEEPS, ids=[s[0] for s in SWEEPS])
def test_a_point_in_a_program_of_its_own_is_its_run_alone_bit_for_bit(tmp_path, algorithm,
                                                                       option, values):
    point, alone = _point_alone_and_run_alone(str(tmp_path), _base(algorithm), 1,
                                              {option: values[:1]})
    for file in ("metrics.jsonl", "evaluations.jsonl"):
        assert _lines(point, file) == _lines(alone, file)


def _algorithms_whose_point_alone_differs(folder: str, algorithms) -> list[str]:
    """Each algorithm's default config as a one-point sweep, evaluated every round, against its
    run alone; the algorithms whose files differ."""
    differing = []
    for algorithm in algorithms:
        model = "split_mlp" if REGISTRY[algorithm].model_kind == "split" else "logistic"
        base = options.merge(BASE, {"algorithm": {"name": algorithm}, "model": {"name": model},
                                    "run": {"eval_every": 1}})
        point, alone = _point_alone_and_run_alone(os.path.join(folder, algorithm), base, 3, {})
        if any(_lines(point, file) != _lines(alone, file)
               for file in ("metrics.jsonl", "evaluations.jsonl")):
            differing.append(algorithm)
    return differing


@pytest.mark.slow
def test_every_registered_algorithm_point_alone_is_its_run_alone_bit_for_bit_fully_optimised(
        tmp_path):
    # Under XLA's full optimisation, the users' default, which the suite turns off
    # (conftest.py): there a point stacked alone used to round FedAdam's, FedYogi's, APFL's and
    # FedMeta's losses differently from their runs alone (seed 3, evaluated every round).
    env = {name: value for name, value in os.environ.items()
           if name not in ("JAX_DISABLE_MOST_OPTIMIZATIONS", "XLA_FLAGS")}
    completed = subprocess.run([sys.executable, os.path.abspath(__file__), str(tmp_path),
                                *sorted(REGISTRY)], env=env, capture_output=True, text=True,
                               timeout=1500, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert json.loads(completed.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize("sampling", ["fixed", "poisson"])
def test_dp_points_record_the_epsilon_of_their_runs_alone(tmp_path, sampling):
    # The base has no noise multiplier: only with the grid's values are its points valid.
    dp = {"clip": 1.0, "sampling": sampling, "delta": 1e-5}
    if sampling == "poisson":
        dp["expected_cohort"] = 1.5
    else:
        # z = 0.8 stays within epsilon = 15 for one round (13.5 after it, 21.2 after round 2)
        # and runs on with the accountant's warning; z = 2.0 stays within it (7.5 after round 3).
        dp.update(target_epsilon=15.0, on_budget="warn")
    base = options.merge(_base("fedavg"), {"algorithm": {"dp": dp},
                                           "run": {"rounds": 3, "eval_every": 2}})
    output = tmp_path / "sweep"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sweep.sweep(base, [0], {"algorithm.dp.noise_multiplier": [0.8, 2.0]}, str(output),
                    points_per_program=1, progress=False)
    spent = [str(w.message) for w in caught if "budget" in str(w.message)]
    assert spent == ([] if sampling == "poisson" else
                     ["epsilon=15 at delta=1e-05 is spent after round 1 of 3; running on past "
                      "the budget (on_budget='warn')"])
    epsilons = []
    for name in sorted(os.listdir(output / sweep_grid.POINTS_DIR)):
        folder = str(output / sweep_grid.POINTS_DIR / name)
        alone = _rerun_alone(folder, str(tmp_path / f"alone-{name}"))
        for file in ("metrics.jsonl", "evaluations.jsonl"):
            assert _lines(folder, file) == _lines(alone, file)
        # Every round's epsilon under RDP (fixed cohorts), the evaluated rounds' under PLD.
        recorded = [row["round"] for row in _lines(folder, "metrics.jsonl") if "epsilon" in row]
        assert recorded == ([1, 2, 3] if sampling == "fixed" else [2, 3])
        epsilons.append([row["epsilon"] for row in _lines(folder, "evaluations.jsonl")])
    # More noise spends less: each point is accounted with its own noise multiplier.
    assert all(0 < more_noise < less_noise
               for less_noise, more_noise in zip(epsilons[0], epsilons[1]))


def test_a_dp_point_whose_budget_would_end_its_run_early_is_refused_before_writing(tmp_path):
    base = options.merge(_base("fedavg"), {"algorithm": {"dp": {"clip": 1.0,
                                                                "target_epsilon": 3.0}},
                                           "run": {"rounds": 20}})
    # Only the refusal: no warning that the run would stop there (a sweep does not run it).
    with warnings.catch_warnings(), pytest.raises(
            OptionError, match=r"^algorithm\.dp\.target_epsilon=3\.0 is invalid; spent after "
                               r"round 8 of 20 at algorithm\.dp\.noise_multiplier=4\.0,seed=0"):
        warnings.simplefilter("error")
        sweep.sweep(base, [0], {"algorithm.dp.noise_multiplier": [4.0, 8.0]},
                    str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_seeds_and_values_reuse_one_compiled_program(tmp_path):
    config = run_config.config_from_dict(options.merge(_base("fedprox"), {"run": {"rounds": 1,
                                                                                   "eval_every": 1}}))
    dataset = run_config.load_data(config)
    traced = run_config.traced_algorithm(config, dataset.info())
    block = compiled.device_block(traced.build, dataset.train.num_clients, 4)
    compiled_programs = []
    for seed, mu in ((0, 0.0), (1, 0.3), (2, 1.0)):
        changed = run_config.config_from_dict(options.merge(
            config.to_dict(), {"algorithm": {"mu": mu}, "run": {"seed": seed, "data_seed": 0}}))
        assert run_config.traced_algorithm(changed, dataset.info()).build is traced.build
        run_config.run(changed, progress=False)
        compiled_programs.append(block._cache_size())
    assert compiled_programs[0] >= 1 and len(set(compiled_programs)) == 1


def test_chunks_and_structural_groups(tmp_path):
    grid = {"algorithm.mu": [0.0, 0.5], "algorithm.client.epochs": [1, 2]}
    whole = sweep.sweep(_base("fedprox"), [0], grid, str(tmp_path / "whole"),
                        points_per_program=2, progress=False)
    chunked = sweep.sweep(_base("fedprox"), [0], grid, str(tmp_path / "chunked"),
                          points_per_program=3, progress=False)
    one_by_one = sweep.sweep(_base("fedprox"), [0], grid, str(tmp_path / "default"),
                             chunks_at_once=2, progress=False)
    assert whole["settings"] == chunked["settings"] == one_by_one["settings"]
    checkpoints = sorted(os.listdir(tmp_path / "whole" / "checkpoints"))
    assert checkpoints == ["group0-chunk0", "group1-chunk0"]  # epochs change the structure
    # On CPU each point is a chunk of its own, two running at once in threads, all of a group's
    # through one compiled program.
    assert sorted(os.listdir(tmp_path / "default" / "checkpoints")) == [
        "group0-chunk0", "group0-chunk1", "group1-chunk0", "group1-chunk1"]
    for name in os.listdir(tmp_path / "whole" / sweep_grid.POINTS_DIR):
        for other in ("chunked", "default"):
            assert (_lines(str(tmp_path / "whole" / sweep_grid.POINTS_DIR / name), "metrics.jsonl") ==
                    _lines(str(tmp_path / other / sweep_grid.POINTS_DIR / name), "metrics.jsonl"))


def test_resume_after_interruption_gives_the_uninterrupted_sweep(tmp_path):
    base = options.merge(_base("fedavg"), {"run": {"rounds": 4, "checkpoint_every": 2}})
    grid = {"algorithm.client.lr": [0.05, 0.2]}
    reference = str(tmp_path / "reference")
    # Two chunks of one point, running at once.
    sweep.sweep(base, [0], grid, reference, points_per_program=1, chunks_at_once=2,
                progress=False)
    interrupted = str(tmp_path / "interrupted")
    shutil.copytree(reference, interrupted)
    # A sweep.json written before the memory budget was saved resumes as one with the default.
    spec = json.loads((tmp_path / "interrupted" / "sweep.json").read_text())
    assert spec.pop("memory_budget_bytes") is None
    (tmp_path / "interrupted" / "sweep.json").write_text(json.dumps(spec))
    # As if killed after the round-2 checkpoints: no summaries, each chunk's last checkpoint
    # gone, the metrics files holding a partial block.
    for chunk in ("group0-chunk0", "group0-chunk1"):
        folder = os.path.join(interrupted, "checkpoints", chunk)
        os.remove(os.path.join(folder, sorted(os.listdir(folder))[-1]))
    for name in os.listdir(os.path.join(interrupted, sweep_grid.POINTS_DIR)):
        folder = os.path.join(interrupted, sweep_grid.POINTS_DIR, name)
        os.remove(os.path.join(folder, "summary.json"))
        with open(os.path.join(folder, "metrics.jsonl"), "a") as out:
            out.write('{"round": 3, "partial": ')
    sweep.sweep(base, [0], grid, interrupted, points_per_program=1, chunks_at_once=2,
                resume=True, progress=False)
    for name in os.listdir(os.path.join(reference, sweep_grid.POINTS_DIR)):
        for file in ("metrics.jsonl", "evaluations.jsonl"):
            assert (_lines(os.path.join(reference, sweep_grid.POINTS_DIR, name), file) ==
                    _lines(os.path.join(interrupted, sweep_grid.POINTS_DIR, name), file))
    with pytest.raises(ValueError, match="different sweep"):
        sweep.sweep(base, [0, 1], grid, interrupted, resume=True, progress=False)


def test_chunks_at_once_are_as_many_as_their_compiled_programs_fit_the_memory_budget():
    points = sweep_grid.grid_points(_base("fedprox"), [0, 1, 2], {}, "unwritten")
    dataset = run_config.load_data(points[0].config)
    population = jax.device_put(dataset.train.pad())
    chunk = sweep._Group(points, dataset, 1, 1).chunk(0, "")
    stats = chunk.runs.lower(chunk.runs.init(), population, 1).compile().memory_analysis()
    needed = (stats.temp_size_in_bytes + stats.argument_size_in_bytes +
              stats.output_size_in_bytes)
    # Both budgets are under 8x the rough size of two chunks, so the compiled program is measured.
    assert 3 * needed < 16 * chunk.rough_bytes(population)
    for budget, at_once in ((needed + needed // 2, 1), (2 * needed, 2), (3 * needed, 2)):
        group = sweep._plan(points, dataset, budget, None, 2)
        assert (group.points_per_program, group.chunks_at_once) == (1, at_once), budget


def test_a_failing_chunk_stops_the_chunks_running_with_it():
    second_running, told_to_stop = threading.Event(), []

    def run(job, stop_requested):
        if job == 0:
            second_running.wait(timeout=10)  # both chunks run at once
            raise RuntimeError("chunk 0 failed")
        second_running.set()
        told_to_stop.append(stop_requested.wait(timeout=10))

    with pytest.raises(RuntimeError, match="chunk 0 failed"):
        sweep._run_at_once([0, 1, 2], run, chunks_at_once=2)
    # Chunk 1 was told to stop; chunk 2 was cancelled, or told to stop if it had started.
    assert told_to_stop in ([True], [True, True])


@pytest.mark.parametrize("grid, seeds, message", [
    ({"algorithm.server.optimizer": ["sgd", "adam"]}, [0], "not numeric"),
    ({"run.seed": [0, 1]}, [0], "--seeds"),
    ({"run.rounds": [1, 2]}, [0], "not a hyperparameter"),
    ({"algorithm.mu": []}, [0], "at least one value"),
    ({"algorithm.mu": [-1.0]}, [0], "algorithm.mu"),
    ({"algorithm.nonsense": [1.0]}, [0], "unknown option"),
    ({}, [], "at least one seed"),
    ({"run.cohort_size": [4, 9]}, [0], "run.cohort_size=9 is invalid; expected at most 8"),
])
def test_bad_grids_are_refused_before_anything_is_written(tmp_path, grid, seeds, message):
    with pytest.raises(OptionError, match=message):
        sweep.sweep(_base("fedprox"), seeds, grid, str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_a_grid_over_the_memory_budget_at_one_point_per_chunk_is_refused_before_writing(
        tmp_path):
    with pytest.raises(OptionError, match="memory_budget=1000 is invalid; one grid point alone "
                                          "needs at least"):
        sweep.sweep(_base("fedprox"), [0, 1], {"algorithm.mu": [0.0, 0.5]},
                    str(tmp_path / "out"), memory_budget_bytes=1000, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, seeds", [("0-3", (0, 1, 2, 3)), ("4", (4,)),
                                         ("0,3,5", (0, 3, 5)), ("1-2,7", (1, 2, 7))])
def test_parse_seeds(text, seeds):
    assert sweep_grid.parse_seeds(text) == seeds


@pytest.mark.parametrize("text", ["", "3-1", "a-b", "0,0", "-2"])
def test_parse_seeds_refuses_malformed_ranges(text):
    with pytest.raises(OptionError, match="seeds"):
        sweep_grid.parse_seeds(text)


if __name__ == "__main__":
    print(json.dumps(_algorithms_whose_point_alone_differs(sys.argv[1], sys.argv[2:])))
