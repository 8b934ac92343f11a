"""Hostile but realistic cases, one test (or a few) each: odd file types among the inputs,
closed and broken standard streams, tampered runs, bad cluster settings, names that would
drive the terminal, and advice after a failure that must work when followed.

Most run in this process (CliRunner); a subprocess only where the real process behaviour is
the point (a closed file descriptor, a pipe whose reader left, a call that must not hang).
The runs are built, not trained (tests/test_predict_batch.py's `make_run`), and shared by
the module; the mnist run is exported, so a predict subprocess needs no TensorFlow.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dlcli.runs.run import Run
from tests.conftest import Cli
from tests.test_predict_batch import digit_files, make_run

EXCEPTION_NAME = re.compile(r"\b[A-Z][A-Za-z]*(Error|Exception)\b|Traceback")
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("DLCLI_DEBUG", "PYTEST_XDIST_WORKER")}


def clean_failure(result, code: int, *needles: str) -> str:
    """The call failed with `code` and one `error:` line holding each needle, no exception name."""
    stderr = result.stderr
    assert result.exit_code == code, (result.exit_code, stderr, result.stdout)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert not EXCEPTION_NAME.search(stderr), stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An exported mnist run `r` and the digits to predict."""
    base = tmp_path_factory.mktemp("hostile")
    root = base / "runs"
    make_run(root, "mnist")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DLCLI_NETWORK_PROBE", "127.0.0.1:9")
        Cli(root)("export", "mnist", "--quiet")
    digits = digit_files(base / "d", 2)
    return {"root": root, "run": root / "mnist" / "r", "digits": digits, "base": base}


@pytest.fixture
def hostile(runs, tmp_path):
    """A Cli on a private copy of the mnist run (`t`), free to tamper with."""
    root = tmp_path / "runs"
    shutil.copytree(runs["root"], root, symlinks=True)
    cli = Cli(root)
    cli.run = root / "mnist" / "r"
    cli.digits = runs["digits"]
    return cli


def dlcli(args: list, redirect: str = "", timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    """`python -m dlcli ARGS REDIRECT` through sh, so `>&-` closes a real file descriptor."""
    line = 'exec "$0" -m dlcli "$@" ' + redirect
    return subprocess.run(["sh", "-c", line, sys.executable, *map(str, args)], capture_output="2>" not in redirect
                          and ">" not in redirect, text=True, timeout=timeout, env=CLEAN_ENV, **kwargs)


# -- odd file types among the inputs ---------------------------------------------------


@pytest.mark.parametrize("engine", ["lite", "keras"])
def test_a_fifo_among_the_inputs_is_refused_and_the_others_predicted(runs, tmp_path, engine):
    folder = tmp_path / "d"
    folder.mkdir()
    good0, good1 = runs["digits"]
    os.mkfifo(folder / "fifo.png")  # nobody ever writes to it: opening it to read would wait forever
    args = ["predict", "mnist", good0, folder / "fifo.png", good1, folder, "--jsonl", "--engine", engine,
            "--runs-dir", runs["root"]]
    result = subprocess.run([sys.executable, "-m", "dlcli", *map(str, args)], capture_output=True, text=True,
                            timeout=120, env=CLEAN_ENV)
    assert result.returncode == 2, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["input"] for r in rows] == [str(good0), str(folder / "fifo.png"), str(good1), str(folder / "fifo.png")]
    assert "digit" in rows[0] and "digit" in rows[2]
    assert rows[1]["error"].startswith(f"{folder / 'fifo.png'}: not a regular file")
    assert f"error: {folder / 'fifo.png'}: not a regular file" in result.stderr
    assert not EXCEPTION_NAME.search(result.stderr)


def test_an_input_that_never_finishes_reading_is_bounded(runs, tmp_path):
    """A file on a stalled mount blocks its read in the kernel: the call ends, naming it, after
    DLCLI_READ_TIMEOUT seconds."""
    stalled = tmp_path / "stalled.png"
    shutil.copy(runs["digits"][1], stalled)
    code = ("import sys, time; from dlcli.tasks import mnist; read = mnist.read_image\n"
            "mnist.read_image = lambda p, mode='L': time.sleep(3600) if 'stalled' in str(p) else read(p, mode)\n"
            "from dlcli.cli import main; sys.argv[0] = 'dlcli'; main()")
    result = subprocess.run([sys.executable, "-c", code, "predict", "mnist", runs["digits"][0], stalled, "--jsonl",
                             "--runs-dir", runs["root"]], capture_output=True, text=True, timeout=60,
                            env={**CLEAN_ENV, "DLCLI_READ_TIMEOUT": "1.5"})
    assert result.returncode == 2, result.stderr
    assert result.stderr == (f"error: {stalled}: reading it took more than 1.5 s (a stalled file system?); "
                             "stopped there (DLCLI_READ_TIMEOUT=SECONDS sets the bound)\n")


def test_a_character_device_and_a_fifo_config_are_refused_at_once(hostile, tmp_path):
    result = hostile("predict", "mnist", "/dev/zero", hostile.digits[0], "--jsonl", expect=2)
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows[0]["error"] == "/dev/zero: not a regular file (a character device)" and "digit" in rows[1]
    os.mkfifo(tmp_path / "config.yaml")
    clean_failure(hostile("train", "linear", "--config", tmp_path / "config.yaml", expect=None), 2, "a FIFO")
    os.mkfifo(tmp_path / "data.npz")
    clean_failure(hostile("train", "mnist", "--dataset", f"npz:{tmp_path / 'data.npz'}", expect=None), 2,
                  "not a regular file")


def test_a_signal_during_predict_does_not_speak_of_resuming(hostile, monkeypatch):
    from dlcli.engine.interrupts import Terminated
    from dlcli.inference import inputs as batchpredict

    def terminated(*args, **kwargs):
        raise Terminated("SIGTERM")

    monkeypatch.setattr(batchpredict, "expand", terminated)
    result = hostile("predict", "mnist", hostile.digits[0], expect=143)
    assert result.stderr.strip() == "stopped by SIGTERM"


# -- closed and broken standard streams ------------------------------------------------


@pytest.mark.parametrize("args", [["predict", "mnist", "{digit}", "--jsonl"], ["predict", "mnist", "{digit}"],
                                  ["train", "linear", "--epochs", "1", "--json"]], ids=["jsonl", "human", "train"])
def test_a_closed_stdout_is_one_line_and_a_failure(runs, tmp_path, args):
    args = [a.replace("{digit}", str(runs["digits"][0])) for a in args]
    root = runs["root"] if args[0] == "predict" else tmp_path / "runs"
    result = dlcli([*args, "--runs-dir", root], redirect=f">&- 2>{tmp_path / 'err'}")
    stderr = (tmp_path / "err").read_text()
    assert result.returncode == 1, stderr
    assert stderr == "error: cannot write to standard output (it is closed)\n"


def test_a_full_stdout_is_one_line_and_a_failure(runs, tmp_path):
    result = dlcli(["predict", "mnist", runs["digits"][0], "--runs-dir", runs["root"]],
                   redirect=f">/dev/full 2>{tmp_path / 'err'}")
    assert result.returncode == 1
    assert (tmp_path / "err").read_text() == "error: cannot write to standard output (no space left on the device)\n"


@pytest.mark.parametrize("engine", ["lite", "keras"])
def test_a_closed_stderr_still_gives_the_predictions(runs, tmp_path, engine):
    out = tmp_path / "out"
    result = dlcli(["predict", "mnist", *runs["digits"], "--engine", engine, "--runs-dir", runs["root"]],
                   redirect=f"2>&- >{out}")
    assert result.returncode == 0
    lines = out.read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == [str(p) for p in runs["digits"]]
    assert all(" digit " in line for line in lines)


def test_human_predict_into_a_pipe_that_closes_exits_141_like_jsonl(runs):
    """2,000 lines outrun the pipe's buffer: the reader has closed it before they are written."""
    paths = "".join(f"{runs['digits'][0]}\n" for _ in range(2000))
    for mode in ([], ["--jsonl"]):
        proc = subprocess.Popen([sys.executable, "-m", "dlcli", "predict", "mnist", "-", *mode, "--runs-dir",
                                 str(runs["root"])], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=CLEAN_ENV)
        proc.stdin.write(paths)
        proc.stdin.close()
        first = proc.stdout.readline()
        proc.stdout.close()
        stderr = proc.stderr.read()
        assert proc.wait(timeout=60) == 141, stderr
        assert first.startswith(str(runs["digits"][0])) or first.startswith("{")
        assert stderr == "", stderr


# -- tampered runs ---------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["lite", "keras"])
@pytest.mark.parametrize("content", ['["a", "b", "c"]', '{"a": 1}', "7", '["a", 1]', "[]"])
def test_a_tampered_classes_json_is_named_and_exit_2(hostile, engine, content):
    (hostile.run / "classes.json").write_text(content)
    result = hostile("predict", "mnist", hostile.digits[0], "--engine", engine, expect=None)
    line = clean_failure(result, 2, str(hostile.run / "classes.json"))
    if content.startswith('["a", "b"'):
        assert "is not a list of 10 class names" in line
    else:
        assert "is not a list of class names" in line


def test_every_file_of_a_run_read_back_is_checked(tmp_path):
    """A damaged file of a run is a UsageError naming it, never an IndexError or a TypeError."""
    from dlcli.inference import lite
    from dlcli.errors import UsageError

    run = Run("mnist", tmp_path / "mnist" / "r")
    run.dir.mkdir(parents=True)
    cases = [
        ("vocab.json", '{"a": 1}', lambda: run.read_names("vocab.json", "words")),
        ("history.csv", "epoch,loss\n1,abc\n", run.read_history),
        ("history.csv", "epoch,loss\n1,0.5,7\n", run.read_history),
        ("history.csv", b"epoch,loss\n\xff\xfe\n", run.read_history),
        ("config.yaml", "x: " + "[" * 5000 + "]" * 5000, run.read_config),
        ("config.yaml", "- 1\n- 2\n", run.read_config),
        ("backup/epoch-0001/state.json", '{"epochs_done": "many"}',
         lambda: run.read_backup_state(run.file("backup/epoch-0001"))),
        ("backup/epoch-0001/state.json", "[1, 2]", lambda: run.read_backup_state(run.file("backup/epoch-0001"))),
    ]
    for name, content, read in cases:
        path = run.file(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(UsageError, match=re.escape(str(path.parent if "state" in name else path))):
            read()
    export = run.file("export")
    export.mkdir()
    for meta in ({"task": "mnist", "source": 7}, {"task": "mnist", "source_stamp": [1]}, [1], {"task": None}):
        (export / "export.json").write_text(json.dumps(meta))
        assert lite.read_meta(export / "model.tflite") is None
        assert "not a dlcli export" in lite.check_export(export / "model.tflite", "mnist", None)


def test_a_damaged_linear_model_file_is_named(tmp_path):
    from dlcli.errors import UsageError
    from dlcli.tasks import linear

    for meta, w in (("[1, 2]", np.zeros(6)), ('{"task": "linear"}', np.zeros((2, 3)))):
        np.savez(tmp_path / "model.npz", w=w, meta=np.array(meta))
        with pytest.raises(UsageError, match="is not a linear model"):
            linear.load_model(tmp_path / "model.npz")


def test_a_damaged_split_or_config_of_a_run_is_named(hostile, tmp_path):
    from dlcli.data import faces
    from dlcli.errors import UsageError

    run = Run("autoencoder", tmp_path / "ae")
    run.dir.mkdir()
    run.file(faces.SPLIT_FILE).write_text('{"data": {}, "train": 7, "val": []}')
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(faces, "load_faces", lambda cfg: (["a", "b"], np.zeros((2, 4, 4, 3), np.uint8)))
        with pytest.raises(UsageError, match="is not a split of the faces"):
            faces.load_split({"dataset": "x", "crop": 0, "image_size": 4, "limit": 0, "val_fraction": 0.5,
                              "seed": 0}, run)
    (hostile.run / "config.yaml").write_text("val_size: many\n")
    clean_failure(hostile("predict", "mnist", hostile.digits[0], expect=None), 2,
                  f"{hostile.run / 'config.yaml'} is not a valid configuration", "val_size")


def test_a_views_folder_that_links_outside_the_run_is_refused(hostile, tmp_path):
    (hostile.run / "history.csv").write_text("epoch,loss,val_loss\n1,0.5,0.6\n2,0.4,0.5\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (hostile.run / "views").symlink_to(outside)
    result = hostile("visualize", "training-curves", "--task", "mnist", "--run", "r", expect=None)
    clean_failure(result, 2, "views", "leads outside the run")
    assert list(outside.iterdir()) == []
    (hostile.run / "views").unlink()
    (hostile.run / "export").rename(tmp_path / "export")
    (hostile.run / "export").symlink_to(tmp_path / "export")  # predict would read the model outside
    clean_failure(hostile("predict", "mnist", hostile.digits[0], expect=None), 2, "leads outside the run")


def test_a_run_still_training_says_so(hostile):
    (hostile.run / "metrics.json").unlink()
    run = Run("mnist", hostile.run).lock()
    try:
        for args in (["predict", "mnist", hostile.digits[0]], ["eval", "mnist"], ["export", "mnist"]):
            line = clean_failure(hostile(*args, "--run", "r", expect=None), 2, "is still training", f"pid {os.getpid()}")
            assert "resume" not in line
    finally:
        run.unlock()
    assert "has not finished training; resume it" in hostile("predict", "mnist", "x.png", "--run", "r", expect=2).stderr


def test_a_lambda_layer_is_refused_in_a_short_line(hostile, tmp_path):
    import keras

    inputs = keras.Input((28, 28))
    outputs = keras.layers.Dense(10, activation="softmax")(keras.layers.Lambda(lambda x: x * 2)(keras.layers.Flatten()(inputs)))
    keras.Model(inputs, outputs, name="mnist_lambda").save(tmp_path / "lambda.keras")
    result = hostile("predict", "mnist", hostile.digits[0], "--checkpoint", tmp_path / "lambda.keras", expect=None)
    line = clean_failure(result, 2, "Lambda layer")
    assert len(line) - len(str(tmp_path / "lambda.keras")) < 160, line  # not Keras's 330 characters


# -- names that would drive the terminal -----------------------------------------------


def test_control_characters_of_names_are_escaped_in_human_output(hostile, tmp_path):
    evil = "\x1b[2J\x1b]0;PWNED\x07"
    (hostile.run / "classes.json").write_text(json.dumps([f"{evil}{d}" for d in range(10)]))
    (hostile.run / "export" / "classes.json").write_text(json.dumps([f"{evil}{d}" for d in range(10)]))
    named = tmp_path / f"digit{evil}.png"
    shutil.copy(hostile.digits[0], named)
    broken = tmp_path / f"broken{evil}[red].png"
    broken.write_bytes(b"not a picture")
    result = hostile("predict", "mnist", named, broken, expect=2)
    for stream in (result.stdout, result.stderr):
        assert not re.search("[\x00-\x08\x0b-\x1f\x7f]", stream), repr(stream)
    assert "\\x1b[2J\\x1b]0;PWNED\\x07" in result.stdout  # shown, escaped, in the file name and the class
    assert result.stdout.count("\\x1b[2J") == 2
    assert "broken\\x1b[2J\\x1b]0;PWNED\\x07[red].png" in result.stderr  # and no markup taken from it
    rows = json.loads(hostile("predict", "mnist", named, "--json").stdout)
    assert rows[0]["input"] == str(named) and rows[0]["digit"].startswith(evil)  # JSON keeps the names as they are


def test_progress_messages_and_run_listings_escape_control_characters(hostile):
    import io

    from rich.console import Console

    from dlcli.engine.progress import Reporter

    buffer = io.StringIO()
    reporter = Reporter(Console(file=buffer, width=200), live=False)
    reporter.info("reading \x1b]0;PWNED\x07faces\nand more")
    reporter.warn("skipped \x1b[2J")
    assert buffer.getvalue() == "reading \\x1b]0;PWNED\\x07faces\nand more\nwarning: skipped \\x1b[2J\n"
    shutil.copytree(hostile.run, hostile.root / "mnist" / "r\x1b[2J")
    listing = hostile("tasks").stdout
    assert "\x1b" not in listing and "r\\x1b[2J" in listing


# -- cluster settings ------------------------------------------------------------------


@pytest.mark.parametrize("tf_config, needle", [
    ({"cluster": {"worker": ["localhost:abc"]}, "task": {"type": "worker", "index": 0}}, "'localhost:abc' is not host:port"),
    ({"cluster": {"worker": ["localhost:2222"]}, "task": {"type": "worker", "index": 5}}, "index 5"),
    ({"cluster": {"worker": ["localhost:2222"]}, "task": {"type": "ps", "index": 0}}, "type 'ps'"),
    ({"cluster": {"worker": "localhost:2222"}, "task": {"type": "worker", "index": 0}}, "not a list of addresses"),
    ({"cluster": {"worker": ["localhost:70000"]}, "task": {"type": "worker", "index": 0}}, "port 1-65535"),
])
def test_a_bad_tf_config_is_refused_before_any_waiting(hostile, digits_npz, monkeypatch, tf_config, needle):
    monkeypatch.setenv("TF_CONFIG", json.dumps(tf_config))
    result = hostile("train", "mnist", "--dataset", f"npz:{digits_npz}", "--set", "strategy=multi-worker", expect=None)
    clean_failure(result, 2, "TF_CONFIG is not valid", needle)
    assert "waiting" not in result.stderr


def test_a_cluster_address_already_in_use_is_named(hostile, digits_npz, monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": [f"localhost:{port}", "localhost:1"]},
                                                    "task": {"type": "worker", "index": 0}}))
        result = hostile("train", "mnist", "--dataset", f"npz:{digits_npz}", "--set", "strategy=multi-worker",
                         "--run", "c", expect=None)
    clean_failure(result, 2, f"localhost:{port}", "already in use")
    assert "waiting" not in result.stderr


# -- configs and settings --------------------------------------------------------------


def test_deeply_nested_and_duplicate_keyed_yaml_is_refused(hostile, tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("x: " + "[" * 5000 + "]" * 5000 + "\n")
    clean_failure(hostile("train", "linear", "--config", deep, expect=None), 2, "not valid YAML")
    twice = tmp_path / "twice.yaml"
    twice.write_text("epochs: 2\nlr: 0.1\nepochs: 3\n")
    clean_failure(hostile("train", "linear", "--config", twice, expect=None), 2, "not valid YAML (line 3)",
                  "'epochs' appears twice")
    merged = tmp_path / "merged.yaml"  # a YAML merge key still lets keys beside it override
    merged.write_text("epochs: 1\nl2: 0.0\n")
    assert hostile.json("train", "linear", "--config", merged, "--run", "m", "--quiet")["config"]["epochs"] == 1
    from dlcli import config

    assert config.parse_set("model=" + "[" * 5000) == ("model", "[" * 5000)


def test_a_run_name_that_looks_like_an_option_is_refused(hostile):
    clean_failure(hostile("train", "linear", "--run=-x", expect=None), 2, "invalid run name '-x'")
    assert not (hostile.root / "linear" / "-x").exists()


def test_a_val_size_larger_than_a_fifth_of_the_data_says_what_it_holds_out():
    from dlcli.data.sources import held_out_count

    said = []
    assert held_out_count(999_999_999, 300, said.append) == 60
    assert said == ["holding out 60 of the 300 training examples for validation, not val_size 999999999 "
                    "(at most a fifth of them)"]
    assert held_out_count(50, 300, said.append) == 50 and len(said) == 1


def test_a_read_only_file_system_is_not_called_permission_denied():
    from dlcli.runs.files import _describe_os_error

    assert _describe_os_error(OSError(errno.EROFS, "Read-only file system"), Path("r/x")) == \
        "cannot write r/x: the file system is read-only"
    assert _describe_os_error(OSError(errno.EACCES, "Permission denied"), Path("r/x")) == \
        "cannot write r/x: permission denied"


# -- evaluation on any labelled folder -------------------------------------------------


def _colour_folder(root: Path, split: str, colours: dict, n: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for name, rgb in colours.items():
        (root / split / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = np.clip(rng.normal(rgb, 30, (40, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / split / name / f"{i}.jpg")
    return root


@pytest.mark.parametrize("split", ["test", "train"])
@pytest.mark.parametrize("task", ["finetune", "cnn"])
def test_eval_on_a_folder_with_a_single_split(hostile, tmp_path, task, split):
    colours = {"blue": (30, 40, 210), "green": (30, 190, 40), "red": (220, 30, 30)}
    flags = {"backbone": "mobilenet_v2", "alpha": 0.35, "image_size": 32, "weights": "none"} if task == "finetune" else {}
    make_run(hostile.root, task, "own", classes=list(colours), **flags)
    folder = _colour_folder(tmp_path / "mine", split, {k: colours[k] for k in ("red", "blue")})  # 2 of its 3 classes
    metrics = hostile.json("eval", task, "--run", "own", "--dataset", f"folder:{folder}")["metrics"]
    prefix = "test_" if split == "test" else ""
    assert metrics[f"{prefix}examples"] == 4
    assert f"{prefix}accuracy" in metrics


# -- advice after a failure that must work -----------------------------------------------


def test_a_diverged_run_names_a_sound_checkpoint_or_a_command_that_starts_again(hostile, digits_npz):
    data = ["--dataset", f"npz:{digits_npz}", "--set", "val_size=50", "--batch-size", "8"]
    result = hostile("train", "mnist", *data, "--lr", "1e9", "--set", "save_every_steps=1", "--run", "d", expect=1)
    line = clean_failure(result, 1, "NaN or infinite", "no sound checkpoint was saved", "start again at a lower rate")
    command = shlex.split(re.search(r"`dlcli (.*)`$", line).group(1))
    assert command[command.index("--lr") + 1] == "0.001"  # the task's default, below the diverging rate
    assert not (hostile.root / "mnist" / "d").exists()  # nothing sound to resume: no run left behind
    hostile(*command[:-2], "--epochs", "1", "--lr", "0.001", "--quiet")  # the advice works as given


def test_finite_but_diverged_checkpoints_are_not_sound(tmp_path):
    from dlcli.runs import checkpoints

    run = Run("mnist", tmp_path / "mnist" / "s")
    for name, state in [("epoch-0001", {"loss": 0.4, "max_weight": 2.5}),
                        ("epoch-0001-step-000004", {"loss": 0.45, "max_weight": 2e9}),
                        ("epoch-0001-step-000008", {"loss": 50.0, "max_weight": 3.0})]:
        run.file(f"backup/{name}").mkdir(parents=True)
        run.file(f"backup/{name}/state.json").write_text(json.dumps({"epochs_done": 1, "history": [], **state}))
    sound, unsound = checkpoints.sound_backup(run)
    assert sound == run.file("backup/epoch-0001")
    assert unsound == [run.file("backup/epoch-0001-step-000008"), run.file("backup/epoch-0001-step-000004")]
