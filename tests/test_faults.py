"""Faults a batch job meets, each injected for real: signals, kills mid-write, NaN, a full disk."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from typer.testing import CliRunner

from dlcli.cli import app
from tests.conftest import digit_images, free_port


@pytest.fixture
def big_digits(tmp_path):
    """Enough digits (batch 8: 375 steps) that an epoch lasts about a second."""
    x, y = digit_images(300, seed=5)
    path = tmp_path / "more.npz"
    np.savez(path, x_train=x, y_train=y, x_test=x[:20], y_test=y[:20])
    return path


def _args(data, root, *extra):
    return ["mnist", "--dataset", f"npz:{data}", "--epochs", "2", "--batch-size", "8",
            "--set", "val_size=100", "--runs-dir", str(root), "--quiet", *extra]


def _start(data, root, run, *extra):
    return subprocess.Popen([sys.executable, "-m", "dlcli", "train", *_args(data, root, "--run", run, *extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path_glob, root, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not list(root.glob(path_glob)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_sigterm_mid_epoch_saves_and_resume_continues_exactly(cli, big_digits, root):
    # 375 steps an epoch, a checkpoint every 100: the signal comes when epoch 2 has at least
    # 75 steps to go (a checkpoint of epoch 2 is on disk), however fast or slow the machine.
    three = ("--epochs", "3", "--set", "save_every_steps=100")
    cli.runner.invoke(app, ["train", *_args(big_digits, root, "--run", "straight", *three)])
    proc = _start(big_digits, root, "stopped", *three)
    _wait_for("mnist/stopped/backup/epoch-0001-step-*/state.json", root, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert re.search(r"stopped by SIGTERM at epoch [23], step \d+", err) and "--run stopped --resume" in err
    assert list((root / "mnist" / "stopped" / "backup").glob("epoch-000[12]-step-*"))
    result = cli.runner.invoke(app, ["train", *_args(big_digits, root, "--run", "stopped", "--resume", *three)])
    assert result.exit_code == 0, result.stderr
    straight = cli.runner.invoke(app, ["eval", "mnist", "--run", "straight", "--runs-dir", str(root), "--json"])
    resumed = cli.runner.invoke(app, ["eval", "mnist", "--run", "stopped", "--runs-dir", str(root), "--json"])
    # The weights after a mid-epoch stop and resume are those of the uninterrupted run.
    assert json.loads(resumed.stdout)["metrics"] == json.loads(straight.stdout)["metrics"]


def test_sigkill_while_checkpoints_are_written_leaves_only_complete_files(cli, big_digits, root):
    proc = _start(big_digits, root, "killed", "--set", "save_every_steps=3")
    # Saving every 3 steps, the run is writing a checkpoint most of the time once its second
    # one is there (tests/test_crash_points.py kills at every single write, deterministically).
    _wait_for("mnist/killed/backup/epoch-0000-step-000006/state.json", root, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_dir = root / "mnist" / "killed"
    import keras

    complete = sorted(p for p in (run_dir / "backup").iterdir() if not p.name.startswith("."))
    assert complete
    for checkpoint in complete:
        state = json.loads((checkpoint / "state.json").read_text())
        step = state["steps_done"]
        assert checkpoint.name == f"epoch-{state['epochs_done']:04d}" + (f"-step-{step:06d}" if step else "")
        assert state["steps_done"] % 3 == 0 and len(state["history"]) == state["epochs_done"]
        keras.models.load_model(checkpoint / "model.keras")  # never torn
    result = cli.runner.invoke(app, ["train", *_args(big_digits, root, "--run", "killed", "--resume")])
    assert result.exit_code == 0, result.stderr
    assert len((run_dir / "history.csv").read_text().splitlines()) == 1 + 2
    assert not list((run_dir / "backup").glob(".*"))  # temporary directories were cleaned up


def test_nan_loss_stops_with_the_epoch_and_step(cli, digits_npz):
    result = cli("train", "mnist", "--dataset", f"npz:{digits_npz}", "--epochs", "3", "--set", "val_size=50",
                 "--lr", "1e30", expect=1)
    assert "the loss became NaN or infinite in epoch 1, by step" in result.stderr
    result = cli("train", "linear", "--optimizer", "sgd", "--lr", "1e300", "--mode", "regression", expect=1)
    assert "NaN or infinite in epoch" in result.stderr


def test_full_disk_is_a_clear_error_and_the_previous_checkpoint_survives(cli, digits_npz, monkeypatch):
    """The disk fills while epoch 2's model file is written, in the checkpoint writer's thread:
    the run stops with the one-line error, and epoch 1's checkpoint is the one left."""
    import keras

    from dlcli.engine import keras_workarounds

    real_snapshot = keras_workarounds.model_snapshot
    calls = {"n": 0}

    def snapshot_until_disk_fills(model):
        write = real_snapshot(model)
        calls["n"] += 1
        if calls["n"] < 2:
            return write

        def full(path):
            with open(path, "wb") as fh:
                fh.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")

        return full

    monkeypatch.setattr(keras_workarounds, "model_snapshot", snapshot_until_disk_fills)
    result = cli("train", "mnist", "--dataset", f"npz:{digits_npz}", "--epochs", "3", "--set", "val_size=50",
                 "--set", "save_interval_seconds=0", "--run", "full", expect=1)
    assert "no space left on the device" in result.stderr and "previous checkpoint is intact" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    backup = cli.root / "mnist" / "full" / "backup"
    assert sorted(p.name for p in backup.iterdir()) == ["epoch-0001"]
    monkeypatch.setattr(keras_workarounds, "model_snapshot", real_snapshot)
    keras.models.load_model(backup / "epoch-0001" / "model.keras")
    cli("train", "mnist", "--run", "full", "--resume", "--quiet")  # and the run carries on


option_values = st.one_of(
    st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
    st.sampled_from(["", "nan", "-1", "0", "1e-3", "true", "null", "[1, 2]", "{a: 1}", "0x10"]),
)
keys = st.sampled_from(["epochs", "batch_size", "lr", "seed", "optimizer", "l1", "mode", "features",
                        "steps_per_epoch", "dataset", "nope", "alpha", "val_fraction"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flags=st.lists(st.tuples(st.sampled_from(["--epochs", "--batch-size", "--lr", "--seed", "--set"]),
                                st.tuples(keys, option_values)), max_size=4),
       config=st.dictionaries(keys, option_values, max_size=4))
def test_random_options_and_configs_never_crash(cli, tmp_path, flags, config):
    import yaml

    cfg_file = tmp_path / "random.yaml"
    cfg_file.write_text(yaml.safe_dump(config))
    args = ["train", "linear", "--config", str(cfg_file), "--print-config"]
    for flag, (key, value) in flags:
        args += [flag, f"{key}={value}" if flag == "--set" else str(value)]
    result = cli(*args, expect=None)
    assert result.exit_code in (0, 2), (args, result.exit_code, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    if result.exit_code == 2:
        assert result.stderr.startswith("error: ") or "Usage:" in result.stderr


def test_mirrored_over_two_cpu_replicas_trains_like_one_device(tmp_path, root):
    x, y = digit_images(20, seed=1)
    data = tmp_path / "digits.npz"
    np.savez(data, x_train=x, y_train=y, x_test=x[:20], y_test=y[:20])
    command = [sys.executable, "-m", "dlcli", "train", "mnist", "--dataset", f"npz:{data}", "--epochs", "3",
               "--batch-size", "32", "--set", "val_size=20", "--runs-dir", str(root), "--json"]
    single = subprocess.run([*command, "--run", "single"], capture_output=True, text=True)
    mirrored = subprocess.run([*command, "--run", "mirrored", "--set", "strategy=mirrored"], capture_output=True,
                              text=True, env={**os.environ, "DLCLI_CPU_REPLICAS": "2"})
    assert single.returncode == 0 and mirrored.returncode == 0, mirrored.stderr[-2000:]
    assert "strategy mirrored: 2 replicas in sync" in mirrored.stderr
    one, two = (json.loads(r.stdout)["metrics"] for r in (single, mirrored))
    # Half a batch per replica, gradients summed over replicas: the same training, up to dropout noise.
    assert two["test_loss"] == pytest.approx(one["test_loss"], rel=0.2)


def test_two_workers_train_mnist_together(tmp_path, root):
    """Two processes on localhost, one cluster (TF_CONFIG), MultiWorkerMirroredStrategy."""
    x, y = digit_images(20, seed=1)
    data = tmp_path / "digits.npz"
    np.savez(data, x_train=x, y_train=y, x_test=x[:20], y_test=y[:20])
    workers = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    procs = []
    for index in range(2):
        env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": {"worker": workers},
                                                      "task": {"type": "worker", "index": index}})}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "dlcli", "train", "mnist", "--dataset", f"npz:{data}", "--epochs", "2",
             "--batch-size", "32", "--set", "val_size=20", "--set", "strategy=multi-worker", "--run", "mw",
             "--runs-dir", str(root), "--json"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-2000:]
    chief, other = (json.loads(out) for out, _ in outputs)
    assert chief["run"] == other["run"] == str(root / "mnist" / "mw")  # one run, written by the chief
    assert "training mnist -> " in outputs[1][1] and "dlcli-mnist-worker-" in outputs[1][1]  # worker 1 trained
    # Each worker reads its own shard of every batch: equal results mean the gradients were all-reduced.
    assert chief["metrics"] == other["metrics"]
    assert not list(tmp_path.glob("dlcli-mnist-worker-*"))
    assert sorted(p.name for p in (root / "mnist" / "mw").iterdir()) == [
        ".lock", "backup", "classes.json", "config.yaml", "history.csv", "logs", "metrics.json", "model.keras"]
    result = CliRunner().invoke(app, ["eval", "mnist", "--run", "mw", "--runs-dir", str(root), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["metrics"]["test_examples"] == 20


def test_a_dead_worker_fails_the_run_clearly_and_resume_recovers_it(tmp_path, root):
    x, y = digit_images(60, seed=1)  # 73 steps of 8 an epoch: the kill (after epoch 1) lands mid-run
    data = tmp_path / "digits.npz"
    np.savez(data, x_train=x, y_train=y, x_test=x[:20], y_test=y[:20])
    workers = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]

    def start(index, *extra):
        env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": {"worker": workers},
                                                      "task": {"type": "worker", "index": index}})}
        return subprocess.Popen(
            [sys.executable, "-m", "dlcli", "train", "mnist", "--dataset", f"npz:{data}", "--epochs", "4",
             "--batch-size", "8", "--set", "val_size=20", "--set", "strategy=multi-worker", "--run", "mw",
             "--runs-dir", str(root), "--quiet", *extra],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    chief, other = start(0), start(1)
    _wait_for("mnist/mw/backup/epoch-0001/state.json", root, chief, timeout=300)
    other.kill()
    other.wait()
    _, err = chief.communicate(timeout=300)
    assert chief.returncode == 1
    assert "a worker of the cluster stopped answering" in err and "--resume" in err
    assert "Traceback" not in err
    chief, other = start(0, "--resume"), start(1, "--resume")
    for proc in (chief, other):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    history = (root / "mnist" / "mw" / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 4 and (root / "mnist" / "mw" / "metrics.json").exists()
