"""The breaks a fault-injection campaign found, one test each; the crash at every
write point is tests/test_crash_points.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import zipfile
import zlib
import struct

import numpy as np
import pytest

from dlcli import config
from dlcli.engine import training
from dlcli.cli import app
from dlcli.runs.run import Run
from dlcli.tasks import TASK_NAMES, get_task
from tests.conftest import free_port


def _finite_checkpoints(backup):
    import keras

    for checkpoint in sorted(backup.glob("epoch-*")):
        model = keras.models.load_model(checkpoint / "model.keras", compile=False)
        assert all(np.isfinite(w).all() for w in model.get_weights()), checkpoint


# 1. a checkpoint is never written from non-finite weights ---------------------------------


def test_no_checkpoint_holds_non_finite_weights_and_the_named_one_is_good(cli, digits_npz):
    data = ["mnist", "--dataset", f"npz:{digits_npz}", "--set", "val_size=50", "--batch-size", "8",
            "--set", "save_every_steps=5", "--epochs", "3", "--run", "nan"]
    cli("train", *data[:-4], "--epochs", "1", "--run", "nan", "--quiet")  # good checkpoints first
    result = cli("train", *data, "--lr", "1e9", "--resume", expect=1)  # diverges within 5 steps of epoch 2
    assert "NaN or infinite in epoch 2" in result.stderr
    backup = cli.root / "mnist" / "nan" / "backup"
    named = result.stderr.split("the last sound checkpoint is ")[1].split(";")[0].split(" (")[0]
    assert named == str(Run("mnist", cli.root / "mnist" / "nan").latest_backup())
    assert result.stderr.strip().endswith(f"--run nan --resume --runs-dir {cli.root} --lr 0.001`")
    _finite_checkpoints(backup)
    cli("train", *data, "--lr", "0.001", "--resume", "--quiet")  # and training goes on from it


# 2. a run stopped after its last checkpoint, before metrics.json, finishes on --resume ----


def test_a_run_stopped_before_its_metrics_finishes_on_resume(cli):
    cli("train", "linear", "--epochs", "2", "--run", "done", "--quiet")
    run = cli.root / "linear" / "done"
    (run / "metrics.json").unlink()
    cli("eval", "linear", "--run", "done", expect=2)  # not finished: eval says so
    cli("train", "linear", "--epochs", "2", "--run", "done", "--resume", "--quiet")
    assert (run / "metrics.json").exists()
    cli("eval", "linear", "--run", "done", "--quiet")
    assert "already done 2 epochs" in cli("train", "linear", "--run", "done", "--resume", expect=2).stderr


def test_sigterm_after_the_training_loop_is_one_line_and_exit_143(cli, monkeypatch):
    from dlcli.engine.interrupts import stop_by_exception
    from dlcli.tasks import linear

    real = linear.link_or_copy

    def terminated_then_link(src, dst):
        os.kill(os.getpid(), signal.SIGTERM)  # after the last checkpoint, before metrics.json
        real(src, dst)

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    stop_by_exception()
    try:
        monkeypatch.setattr(linear, "link_or_copy", terminated_then_link)
        result = cli("train", "linear", "--epochs", "2", "--run", "term", expect=143)
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGINT, before[1])
    assert "stopped by SIGTERM" in result.stderr and "Traceback" not in result.stderr
    monkeypatch.setattr(linear, "link_or_copy", real)
    cli("train", "linear", "--epochs", "2", "--run", "term", "--resume", "--quiet")
    assert (cli.root / "linear" / "term" / "metrics.json").exists()


# 4. temporary files a killed process left are removed ------------------------------------


def test_locking_a_run_removes_the_temporary_files_of_a_killed_process(tmp_path):
    run = Run.create(tmp_path, "linear", "r")
    for name in (".history.csv.tmp-99999", "views/.linear-boundary.png.tmp-99999", "backup/.epoch-0001.tmp-99999/x"):
        (run.dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run.dir / name).write_text("partial")
    run.lock()
    run.unlock()
    assert not [p for p in run.dir.rglob("*") if ".tmp-" in str(p)]


# 5. Ctrl-C while the command starts ---------------------------------------------------------


def test_sigint_during_start_up_is_one_line_without_traceback():
    code = ("import os, signal, sys; sys.argv[0] = 'dlcli'; import dlcli; os.kill(os.getpid(), signal.SIGINT); "
            "import dlcli.cli; import time; time.sleep(10)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 130
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


# 6. default run names are unique ---------------------------------------------------------


def test_runs_started_in_the_same_second_get_different_names(tmp_path, monkeypatch):
    import datetime as dt

    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return dt.datetime(2024, 5, 1, 12, 0, 0)

    monkeypatch.setattr("dlcli.runs.run._dt.datetime", Frozen)
    names = [Run.create(tmp_path, "linear").name for _ in range(3)]
    assert names == ["20240501-120000", "20240501-120000-2", "20240501-120000-3"]


# 7. one bad image never costs the others their prediction ---------------------------------


def _png_header_only(path, width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_a_near_empty_image_and_a_decompression_bomb_are_named_and_the_rest_predicted(cli, digits_npz, tmp_path):
    from PIL import Image

    from dlcli.tasks.mnist import to_mnist

    sparse = np.zeros((2000, 2000), np.uint8)
    sparse[100, 100] = sparse[1900, 1900] = 255  # too sparse to survive the scaling to 20x20
    assert np.isfinite(to_mnist(sparse)).all()
    cli("train", "mnist", "--dataset", f"npz:{digits_npz}", "--epochs", "1", "--set", "val_size=50", "--quiet")
    good, dots, bomb = tmp_path / "good.png", tmp_path / "dots.png", tmp_path / "bomb.png"
    Image.fromarray(np.asarray(Image.new("L", (40, 40), 0))).save(good)
    Image.fromarray(sparse).save(dots)
    _png_header_only(bomb, 20000, 20000)
    result = cli("predict", "mnist", good, dots, bomb, "--json", expect=2)
    rows = json.loads(result.stdout)
    assert [("error" in row) for row in rows] == [False, False, True]
    assert "too large" in rows[2]["error"] and str(bomb) in rows[2]["error"]


# 9. every config key has a range; every bad input is one line with exit 2 ----------------


def test_every_number_in_every_tasks_config_has_a_range():
    for name in TASK_NAMES:
        task = get_task(name)
        config.validate(task.defaults, task.defaults, task.choices)  # the defaults are in range
        flat = config.flatten(task.defaults)
        unchecked = [k for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                     and k.rsplit(".", 1)[-1] not in config.COMMON_CHECKS]
        assert not unchecked, (name, unchecked)


@pytest.mark.parametrize("task, setting, message", [
    ("names", "layers=99999999999999999999999", "'layers' must be an integer >= 1 and <= 64"),
    ("names", "val_fraction=1e9", "'val_fraction' must be a number > 0 and < 1"),
    ("linear", "val_fraction=-0.2", "'val_fraction' must be a number > 0 and < 1"),
    ("mnist", "hidden=0", "'hidden' must be an integer >= 1"),
    ("linear", "seed=99999999999999999999", "'seed' must be an integer >= 0 and < 2^31"),
])
def test_out_of_range_values_are_refused_at_once(cli, task, setting, message):
    result = cli("train", task, "--set", setting, "--print-config", expect=2)
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_hostile_inputs_are_one_line_and_exit_2(cli, tmp_path):
    binary = tmp_path / "config.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    assert "not a text (YAML) file" in cli("train", "linear", "--config", binary, "--print-config", expect=2).stderr
    assert "invalid run name" in cli("train", "linear", "--run", "r" * 300, expect=2).stderr
    # A .keras whose config.json is a list; beside it, a binary config.yaml taken for its run's.
    listed = tmp_path / "listed.keras"
    with zipfile.ZipFile(listed, "w") as archive:
        archive.writestr("config.json", "[1, 2, 3]")
    assert "config.yaml cannot be read as YAML" in cli("eval", "mnist", "--checkpoint", listed, expect=2).stderr
    (tmp_path / "model").mkdir()
    listed = listed.rename(tmp_path / "model" / "listed.keras")
    assert "not a Keras model file" in cli("eval", "mnist", "--checkpoint", listed, expect=2).stderr
    cli("train", "linear", "--epochs", "1", "--quiet")
    result = cli("predict", "linear", "1e309,0", "0,0", "--json", expect=2)
    rows = json.loads(result.stdout)
    alone = json.loads(cli("predict", "linear", "0,0", "--json").stdout)
    assert "finite" in rows[0]["error"] and rows[1] == alone[0]  # the bad point changes nothing for the good one
    for out in (result.stdout, result.stderr):
        assert "nan" not in out.lower()


# 10. multi-worker waiting is visible and bounded --------------------------------------------


def test_a_worker_that_cannot_see_the_chiefs_run_on_resume_says_so(cli, monkeypatch):
    workers = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": 1}}))
    result = cli("train", "mnist", "--run", "mw", "--resume", expect=2)
    assert "worker 1 cannot see the chief's run" in result.stderr and "share" in result.stderr


def test_a_worker_whose_peer_never_starts_waits_visibly_and_gives_up(tmp_path, digits_npz):
    workers = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    env = {**os.environ, "DLCLI_WORKER_TIMEOUT": "8",
           "TF_CONFIG": json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": 0}})}
    result = subprocess.run(
        [sys.executable, "-m", "dlcli", "train", "mnist", "--dataset", f"npz:{digits_npz}", "--epochs", "1",
         "--set", "val_size=50", "--set", "strategy=multi-worker", "--run", "alone", "--runs-dir",
         str(tmp_path / "runs")], capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == -9, result.stderr[-2000:]  # killed by its watchdog: TensorFlow waits holding the GIL
    said = " ".join((result.stdout + result.stderr).split())
    assert f"waiting for the other workers of the cluster: worker 1 ({workers[1]})" in said
    assert "waited 8 s for the other workers" in result.stderr and "Traceback" not in result.stderr


# 11. raw messages ---------------------------------------------------------------------------


def test_tensorflow_errors_are_read_without_their_graph_names():
    class Error(Exception):
        message = ("{{function_node __wrapped__CreateSummaryFileWriter_device_/job:localhost/replica:0/task:0/device:CPU:0}}"
                   " /runs/x/logs/train; No space left on device [Op:CreateSummaryFileWriter]")

    assert training.tf_error_line(Error()) == "/runs/x/logs/train; No space left on device"

    class Lost(Exception):
        message = "Collective ops is aborted by: peer down\n [[{{node CollectiveReduceV2}}]] (__inference_multi_step_on_iterator_1384])"

    assert training.tf_error_line(Lost()) == "Collective ops is aborted by: peer down"


def test_a_full_disk_under_tensorboard_is_one_clear_line(cli, digits_npz, monkeypatch):
    import keras
    import tensorflow as tf

    def full(self, logs=None):
        raise tf.errors.ResourceExhaustedError(None, None, "{{function_node __wrapped__CreateSummaryFileWriter}} "
                                               "logs/train; No space left on device [Op:CreateSummaryFileWriter]")

    monkeypatch.setattr(keras.callbacks.TensorBoard, "on_train_begin", full)
    result = cli("train", "mnist", "--dataset", f"npz:{digits_npz}", "--epochs", "1", "--set", "val_size=50", expect=1)
    assert "no space left on the device" in result.stderr and "{{" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_unwritable_run_is_a_clear_error_on_resume(cli):
    cli("train", "linear", "--epochs", "1", "--run", "ro", "--quiet")
    run = cli.root / "linear" / "ro"
    (run / ".lock").unlink()
    (run / ".lock").mkdir()  # what a read-only directory does to the lock file, even for root
    result = cli("train", "linear", "--epochs", "2", "--run", "ro", "--resume", expect=1)
    assert result.stderr.startswith("error: cannot write") and "Errno" not in result.stderr


def test_double_dash_ends_the_options_of_predict(cli, tmp_path):
    cli("train", "linear", "--epochs", "1", "--quiet")
    result = cli.runner.invoke(app, ["predict", "linear", "--runs-dir", str(cli.root), "0,0", "--", "--x.png"])
    assert result.exit_code == 2
    assert "'--x.png' is not a point" in result.stderr and "unknown option" not in result.stderr
