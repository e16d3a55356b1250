"""Exact resume after SIGKILL, corrupted checkpoints, divergence, refused configuration changes."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common import assert_trees_equal, small_digits_config
from fedjax_lab import checkpoint, options
from fedjax_lab.algorithms import fedavg
from fedjax_lab.config import Config, build, default_config, run
from fedjax_lab.data import ClientData, FederatedDataset, digits
from fedjax_lab.experiment import ConfigMismatchError, DivergenceError, run_experiment
from fedjax_lab.models import logistic_regression

LONG = {"run.rounds": 1000, "run.eval_every": 25, "run.checkpoint_every": 25}


def _long(folder: str) -> Config:
    return small_digits_config(**LONG, **{"run.output": folder})


def _cli(config: Config, resume: bool) -> list[str]:
    """The command line of `config`: a flag for every option that differs from the defaults."""
    argv = [sys.executable, "-m", "fedjax_lab.cli", "run"]
    if resume:
        return argv + ["--resume", config.run.output]
    defaults = options.flatten(default_config().to_dict())
    for path, value in options.flatten(config.to_dict()).items():
        if value != defaults.get(path):
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            argv += ["--" + path, text]
    return argv


def _files(folder: str) -> dict[str, str]:
    return {name: open(os.path.join(folder, name)).read()
            for name in ("metrics.jsonl", "evaluations.jsonl")}


def _final_state(config: Config):
    folder = config.run.output
    template = build(config)[0].init(jax.random.key(0))
    return checkpoint.load_latest(os.path.join(folder, "checkpoints"), template).state


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("reference") / "run")
    run(_long(folder), progress=False)
    return folder


def _wait_until(process, condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None and not condition():
        time.sleep(0.02)


def _kill_when(process, condition):
    _wait_until(process, condition)
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_sigkill_between_checkpoints_then_resume_is_bit_identical(tmp_path, uninterrupted):
    config = _long(str(tmp_path / "run"))
    process = subprocess.Popen(_cli(config, resume=False), stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "run" / "checkpoints"
    _kill_when(process, lambda: len(checkpoint.list_checkpoints(str(checkpoints))) >= 2)
    assert process.returncode == -signal.SIGKILL
    newest = checkpoint.list_checkpoints(str(checkpoints))[-1]
    assert int(os.path.basename(newest)[6:14]) < LONG["run.rounds"], "the run ended before the kill"

    resumed = run(config, progress=False, resume=True)
    assert _files(config.run.output) == _files(uninterrupted)
    assert_trees_equal(resumed.state, _final_state(_long(uninterrupted)))


def test_random_kills_in_a_row_then_resume_equal_the_uninterrupted_run(tmp_path, uninterrupted):
    """Each launch is killed at a random moment after it has written a new checkpoint."""
    config = _long(str(tmp_path / "run"))
    folder = os.path.join(config.run.output, "checkpoints")
    chance = random.Random(1234)
    rounds_reached = []
    for _ in range(3):
        started = os.path.exists(os.path.join(config.run.output, "config.json"))
        before = checkpoint.list_checkpoints(folder)
        process = subprocess.Popen(_cli(config, resume=started), stderr=subprocess.DEVNULL)
        _wait_until(process, lambda: checkpoint.list_checkpoints(folder) != before)
        time.sleep(chance.uniform(0.0, 0.3))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait()
        assert process.returncode == -signal.SIGKILL
        rounds_reached.append(int(os.path.basename(checkpoint.list_checkpoints(folder)[-1])[6:14]))
    assert rounds_reached == sorted(rounds_reached) and rounds_reached[-1] < LONG["run.rounds"]
    run(config, progress=False, resume=True)
    assert _files(config.run.output) == _files(uninterrupted)
    assert_trees_equal(_final_state(config), _final_state(_long(uninterrupted)))


def _small(folder, **dotted):
    settings = {"data.num_clients": 6, "run.cohort_size": 3, "run.rounds": 8,
                "run.checkpoint_every": 2, "run.output": folder}
    settings.update(dotted)
    return small_digits_config(**settings)


def test_corrupted_newest_checkpoint_is_reported_and_the_previous_one_used(tmp_path):
    reference = run(_small(str(tmp_path / "reference")), progress=False)
    config = _small(str(tmp_path / "run"))
    run(config, progress=False)
    folder = tmp_path / "run" / "checkpoints"
    previous, newest = checkpoint.list_checkpoints(str(folder))
    assert previous.endswith("round_00000006.ckpt") and newest.endswith("round_00000008.ckpt")
    with open(newest, "r+b") as f:
        f.seek(100)
        f.write(b"\x00garbage\x00")
    with pytest.warns(UserWarning, match=r"round_00000008.ckpt is truncated or corrupted"):
        resumed = run(config, progress=False, resume=True)
    assert_trees_equal(resumed.state, reference.state)
    assert resumed.history == reference.history


def test_truncated_checkpoint_gives_a_clear_error(tmp_path):
    run(_small(str(tmp_path / "run"), **{"run.rounds": 2}), progress=False)
    (path,) = checkpoint.list_checkpoints(str(tmp_path / "run" / "checkpoints"))
    with open(path, "rb") as f:
        blob = f.read()
    with open(path, "wb") as f:
        f.write(blob[:len(blob) // 2])
    template = fedavg(logistic_regression((64,), 10), optax.sgd(0.1)).init(jax.random.key(0))
    with pytest.raises(checkpoint.CheckpointError, match="truncated or corrupted"):
        checkpoint.load(path, template)


def test_checkpoint_round_trips_typed_keys_and_rejects_another_state(tmp_path):
    state = {"key": jax.random.key(3), "w": jnp.arange(4.0), "round": jnp.int32(5)}
    from collections import namedtuple
    State = namedtuple("State", "key w round")
    state = State(**state)
    path = checkpoint.save(str(tmp_path), state, [{"round": 5}], [])
    restored = checkpoint.load(path, state)
    np.testing.assert_array_equal(jax.random.key_data(restored.state.key),
                                  jax.random.key_data(state.key))
    assert restored.history == [{"round": 5}]
    with pytest.raises(checkpoint.CheckpointError, match=r"array 1 is float32\[4\]"):
        checkpoint.load(path, state._replace(w=jnp.zeros(3)))


def test_nan_in_a_client_stops_the_run_naming_round_and_metric(tmp_path):
    dataset = digits(6, seed=0)
    poisoned_x = list(dataset.train.x)
    poisoned_x[2] = np.full_like(poisoned_x[2], np.nan)
    train = ClientData(tuple(poisoned_x), dataset.train.y, dataset.train.names)
    poisoned = FederatedDataset(dataset.name, train, dataset.test, 10, dataset.metadata)
    algorithm = fedavg(logistic_regression((64,), 10), optax.sgd(0.1))
    folder = str(tmp_path / "run")
    with pytest.raises(DivergenceError, match=r"diverged at round \d+: train_loss is nan"):
        run_experiment(algorithm, poisoned, num_rounds=30, cohort_size=2, eval_every=1,
                       checkpoint_every=1, output_dir=folder, progress=False)
    rows = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
    first_bad = next(row["round"] for row in rows if not np.isfinite(row["train_loss"]))
    kept = checkpoint.list_checkpoints(os.path.join(folder, "checkpoints"))
    assert kept and kept[-1].endswith(f"round_{first_bad - 1:08d}.ckpt")
    restored = checkpoint.load(kept[-1], algorithm.init(jax.random.key(0)))
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(restored.state.params))

    continued = run_experiment(algorithm, poisoned, num_rounds=30, cohort_size=2, eval_every=10,
                               progress=False, allow_divergence=True)
    assert len(continued.history) == 30


def test_resume_with_a_changed_learning_rate_is_refused(tmp_path, capsys):
    config = _small(str(tmp_path / "run"), **{"run.rounds": 2})
    run(config, progress=False)
    faster = _small(str(tmp_path / "run"), **{"run.rounds": 2, "algorithm.client.lr": 0.1})
    with pytest.raises(ConfigMismatchError,
                       match=r"algorithm.client.lr \(saved 0.05, now 0.1\)"):
        run(faster, progress=False, resume=True)
    from fedjax_lab.cli import main
    assert main(["run", "--resume", config.run.output, "--algorithm.client.lr", "0.1",
                 "--rounds", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedjax-lab: error: cannot resume") and "algorithm.client.lr" in err
    assert "run.rounds (saved 2, now 3)" in err and len(err.splitlines()) == 1


def test_a_run_saved_before_an_option_existed_resumes_while_the_option_keeps_its_default(
        tmp_path, capsys):
    config = _small(str(tmp_path / "run"), **{"run.rounds": 4})
    run(config, progress=False)
    path = tmp_path / "run" / "config.json"
    saved = json.loads(path.read_text())
    # As written before these options existed.
    del saved["algorithm"]["dp"]["mechanism"], saved["run"]["execution"]
    path.write_text(json.dumps(saved))
    os.remove(checkpoint.list_checkpoints(str(tmp_path / "run" / "checkpoints"))[-1])
    from fedjax_lab.cli import main
    assert main(["run", "--resume", config.run.output, "--execution", "vmap"]) == 2
    assert "run.execution (saved 'auto', now 'vmap')" in capsys.readouterr().err
    assert main(["run", "--resume", config.run.output]) == 0
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(row)["round"] for row in rows] == [1, 2, 3, 4]
