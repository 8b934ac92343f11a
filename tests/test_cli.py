"""The command line itself: help without TensorFlow, clear errors, JSON for scripts, locks."""

import json
import os
import subprocess
import sys

import pytest

from dlcli.cli import app
from dlcli.runs.run import Run


def run_python(code: str, *args: str):
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["predict", "--help"], ["tasks"]])
def test_help_and_tasks_do_not_import_tensorflow(argv):
    code = (
        "import sys\n"
        "from dlcli.cli import app\n"
        "try:\n    app(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
        "print('TF-LOADED' if 'tensorflow' in sys.modules else 'TF-NOT-LOADED', code)\n"
    )
    result = run_python(code, *argv)
    assert "TF-NOT-LOADED 0" in result.stdout, result.stdout + result.stderr


def test_python_dash_m_and_version():
    result = subprocess.run([sys.executable, "-m", "dlcli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("dlcli ")


def test_tasks_lists_every_task_with_views_and_training_state(cli):
    data = cli.json("tasks")
    names = [t["task"] for t in data["tasks"]]
    assert names[:2] == ["linear", "mnist"]
    mnist = data["tasks"][1]
    assert mnist["dataset"] == "mnist" and "mnist-confusion" in mnist["views"] and mnist["trained"] is None
    cli("train", "linear", "--epochs", "1", "--run", "r1", "--quiet")
    assert cli.json("tasks")["tasks"][0]["trained"] == "r1"


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "nosuch"], "unknown task 'nosuch'; valid tasks: linear, mnist"),
        (["eval", "nosuch"], "unknown task 'nosuch'"),
        (["visualize", "nosuch-view"], "unknown view 'nosuch-view'; valid views: training-curves"),
        (["eval", "linear"], "no finished run of task linear"),
        (["predict", "mnist", "x.png"], "no finished run of task mnist"),
        (["eval", "mnist", "--checkpoint", "missing.keras"], "checkpoint missing.keras does not exist"),
        (["train", "linear", "--dataset", "ftp:thing"], "cannot read --dataset 'ftp:thing'"),
        (["train", "linear", "--dataset", "npz:/no/such.npz"], "does not exist"),
        (["train", "linear", "--bogus", "1"], "unknown option --bogus"),
        (["train", "linear", "--run", "../x"], "invalid run name"),
        (["predict", "linear", "--top-k", "3"], "unknown option --top-k"),
    ],
)
def test_bad_usage_is_one_clear_line_and_exit_2(cli, args, message):
    result = cli(*args, expect=2)
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1


def test_offline_tfds_fails_fast_with_advice(cli, monkeypatch):
    import tensorflow_datasets as tfds

    from dlcli.data import sources as data

    probes, downloads = [], []
    probe = data.network_available
    monkeypatch.setattr(data, "network_available", lambda *a, **k: probes.append(probe(*a, **k)) or probes[-1])
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", lambda self, *a, **k: downloads.append(1))
    result = cli("train", "mnist", "--epochs", "1", expect=1)
    assert "not prepared" in result.stderr and "network is unreachable" in result.stderr
    assert "npz:PATH" in result.stderr and "tfds build mnist" in result.stderr
    # One probe of the network and no download: not the minutes tensorflow-datasets retries for.
    assert probes == [False] and downloads == []


def test_json_mode_prints_exactly_one_document(cli):
    result = cli("train", "linear", "--epochs", "2", "--json")
    data = json.loads(result.stdout)  # fails if anything human leaked onto stdout
    assert data["task"] == "linear" and set(data["metrics"]) >= {"loss", "val_accuracy"}
    assert "epoch 2/2" in result.stderr  # the human lines went to stderr
    assert os.path.isdir(data["run"])


def test_quiet_prints_nothing(cli):
    result = cli("train", "linear", "--epochs", "2", "--quiet")
    assert result.stdout == "" and result.stderr == ""


def test_existing_run_is_not_overwritten(cli):
    cli("train", "linear", "--epochs", "1", "--run", "same", "--quiet")
    result = cli("train", "linear", "--epochs", "1", "--run", "same", expect=2)
    assert "already exists" in result.stderr and "--resume" in result.stderr


def test_a_locked_run_is_refused(cli):
    cli("train", "linear", "--epochs", "1", "--run", "busy", "--quiet")
    holder = Run("linear", cli.root / "linear" / "busy").lock()
    try:
        result = cli("train", "linear", "--epochs", "3", "--run", "busy", "--resume", expect=2)
        assert "is in use by pid" in result.stderr
    finally:
        holder.unlock()
    cli("train", "linear", "--epochs", "3", "--run", "busy", "--resume", "--quiet")


def test_resume_with_nothing_to_resume(cli):
    result = cli("train", "linear", "--resume", expect=2)
    assert "no run of task linear" in result.stderr
    cli("train", "linear", "--epochs", "2", "--run", "done", "--quiet")
    result = cli("train", "linear", "--resume", "--run", "done", expect=2)
    assert "already done 2 epochs" in result.stderr


def test_unwritable_runs_dir_is_a_clear_error(cli, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = cli.runner.invoke(app, ["train", "linear", "--runs-dir", str(blocker / "runs")])
    assert result.exit_code == 1
    assert "cannot write" in result.stderr and "Traceback" not in result.stderr


def test_visualize_out_must_be_png(cli, tmp_path):
    cli("train", "linear", "--epochs", "1", "--quiet")
    result = cli("visualize", "linear-boundary", "--out", tmp_path / "x.jpg", expect=2)
    assert "PNG" in result.stderr
    path = cli.json("visualize", "training-curves", "--task", "linear", "--out", tmp_path / "curves.png")["path"]
    assert path.endswith("curves.png") and os.path.getsize(path) > 1000


def test_tasks_task_describes_keys_options_and_views(cli):
    info = cli.json("tasks", "mnist")
    assert info["config"]["model"] == "mlp" and info["choices"]["model"] == ["softmax", "mlp", "cnn"]
    assert [o["option"] for o in info["predict_options"]] == ["--top-k"]
    assert info["views"]["mnist-errors"]["options"][0]["option"] == "--n"
    result = cli("tasks", "linear")
    assert "optimizer" in result.stdout and "allowed: sgd, momentum" in result.stdout and "linear-optimizers" in result.stdout


def test_click_usage_errors_are_one_line(cli):
    for args, message in [
        (["train", "linear", "--epochs", "abc"], "Invalid value for '--epochs'"),
        (["train"], "Missing argument 'TASK'"),
        (["nosuchcommand"], "No such command"),
    ]:
        result = cli.runner.invoke(app, args)
        assert result.exit_code == 2
        assert message in result.stderr and "╭" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_shell_completion_of_tasks_views_and_config_keys(cli):
    help_text = cli("--help").stdout
    assert "--install-completion" in help_text and "--show-completion" in help_text

    def complete(words: str) -> list[str]:
        env = {"_DLCLI_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split()) - 1)}
        result = cli.runner.invoke(app, [], env=env, prog_name="dlcli")
        return result.stdout.split()

    assert complete("dlcli train mn") == ["mnist"]
    assert complete("dlcli visualize mnist-") == ["mnist-confusion", "mnist-errors"]
    assert complete("dlcli train cnn --set wa") == ["warmup="]
    assert "linear" in complete("dlcli tasks l")


@pytest.mark.parametrize(
    "argv, shown",
    [
        (["predict", "names", "--help"], ["--n", "--prefix", "--temperature", "--exclude-training"]),
        (["train", "mnist", "--help"], ["--model", "--hidden", "--lr-decay", "one of softmax, mlp, cnn"]),
        (["visualize", "mnist-errors", "--help"], ["Options of view mnist-errors", "--n"]),
    ],
)
def test_help_shows_the_options_of_the_task_named(cli, argv, shown):
    result = cli.runner.invoke(app, argv, env={"COLUMNS": "120"})
    assert result.exit_code == 0
    for text in shown:
        assert text in result.stdout, text
    assert "<bool>" not in result.stdout  # flags take no value


def test_help_texts_of_run_seed_and_dataset(cli):
    def help_of(command):
        return " ".join(cli.runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"}).stdout.split())

    assert "newest unfinished" in help_of("train") and "newest run for eval" not in help_of("train")
    for command in ("eval", "predict", "visualize"):
        assert "newest finished run" in help_of(command) and "time stamp" not in help_of(command)
    assert "same seed, same run" not in help_of("predict") and "tasks that sample" in help_of("predict")
    assert "captions:DIR" in help_of("train")


def test_the_set_example_in_the_help_works_for_every_task():
    from dlcli import cli as cli_module, config
    from dlcli.tasks import TASK_NAMES, get_task

    from typer.testing import CliRunner

    help_text = " ".join(CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).stdout.split())
    assert f"--set {cli_module.SET_EXAMPLE}" in help_text
    for name in TASK_NAMES:
        task = get_task(name)
        config.resolve(task.defaults, sets=[cli_module.SET_EXAMPLE], choices=task.choices)


def test_every_config_key_of_every_task_is_explained(cli):
    from dlcli.tasks import TASK_NAMES

    for name in TASK_NAMES:
        info = cli.json("tasks", name)
        for key, row in info["keys"].items():
            assert row["help"], f"{name}: config key {key} has no line in dlcli/keyhelp.py"
        for row in info["predict_options"]:
            assert row["help"]
    text = cli("tasks", "names").stdout
    assert "(default )" not in text and "allowed:" in text


def test_bad_datasets_are_refused_before_tensorflow_and_leave_nothing(tmp_path):
    import numpy as np

    (tmp_path / "names.txt").write_text("Anna\nBob\n")
    (tmp_path / "empty.npz").write_bytes(b"")
    np.savez(tmp_path / "wrong.npz", a=np.zeros(3))
    (tmp_path / "flat").mkdir()
    cases = {
        "folder:/nonexistent": "does not exist",
        "npz:wrong.npz": "lacks the arrays x_train, y_train, x_test, y_test",
        "foo:bar": "cannot read --dataset 'foo:bar'",
        "text:names.txt": "task mnist cannot use --dataset 'text:names.txt'",
        "npz:names.txt": "is not an .npz file",
        "npz:empty.npz": "empty file",
        "folder:flat": "is not an image folder",
    }
    code = (
        "import sys\n"
        "from dlcli.cli import app\n"
        "try:\n    app(['train', 'mnist', '--dataset', sys.argv[1], '--runs-dir', 'runs'])\n"
        "except SystemExit as e:\n    print('EXIT', e.code, 'TF-LOADED' if 'tensorflow' in sys.modules else 'TF-NOT-LOADED')\n"
    )
    for spec, message in cases.items():
        result = subprocess.run([sys.executable, "-c", code, spec], capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert "EXIT 2 TF-NOT-LOADED" in result.stdout, (spec, result.stdout, result.stderr)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, (spec, result.stderr)
        assert "training mnist" not in result.stdout
        assert not (tmp_path / "runs").exists(), spec


def test_a_run_that_fails_leaves_no_empty_task_folder(cli):
    result = cli("train", "mnist", "--epochs", "1", expect=1)  # offline: tensorflow-datasets cannot fetch mnist
    assert "not prepared" in result.stderr
    assert not (cli.root / "mnist").exists()


def test_resume_without_run_takes_the_newest_unfinished_or_says_nothing_to_resume(cli):
    cli("train", "linear", "--epochs", "2", "--run", "done", "--quiet")
    result = cli("train", "linear", "--resume", expect=2)
    assert "nothing to resume" in result.stderr and "done" in result.stderr
    assert "resuming" not in result.stdout


def test_offline_tfds_error_is_the_only_line(tmp_path):
    env = {**os.environ, "TFDS_DATA_DIR": str(tmp_path / "tfds"), "DLCLI_NETWORK_PROBE": "127.0.0.1:9"}
    result = subprocess.run([sys.executable, "-m", "dlcli", "train", "mnist", "--checkpoint-dir", str(tmp_path / "runs")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1
    assert result.stderr.startswith("error: data set 'mnist' is not prepared"), result.stderr  # no absl WARNING first
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_empty_image_file_is_called_empty(tmp_path):
    from dlcli.errors import UsageError
    from dlcli.data.images import read_image

    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(UsageError, match="zero.png: empty file"):
        read_image(tmp_path / "zero.png")


@pytest.mark.parametrize("width", [80, 120])
def test_live_display_stays_readable_at_80_and_120_columns(width):
    import io

    from rich.console import Console

    from dlcli.engine.progress import Reporter

    buf = io.StringIO()
    console = Console(file=buf, width=width, force_terminal=True, color_system=None)
    reporter = Reporter(console, live=True)
    reporter.status("loading the data and building the model")
    assert "loading the data" in buf.getvalue()  # something shows while data loads
    reporter.start(20)
    logs = {"loss": 0.12345, "accuracy": 0.98765, "val_loss": 0.23456, "val_accuracy": 0.95432, "lr": 0.00081}
    reporter.start_epoch(0, 1563)
    reporter.end_epoch(0, logs)
    reporter.start_epoch(1, 1563)
    reporter.batch(1000, {"loss": 0.2, "accuracy": 0.9, "top5_accuracy": 0.99, "another_metric": 1.5})
    bars = Console(file=io.StringIO(), width=width, color_system=None, record=True)
    bars.print(reporter._progress.get_renderable())
    lines = bars.export_text().splitlines()
    reporter.finish()
    assert all(len(line) <= width for line in lines)
    assert "1/20" in lines[0] and "1001/1563" in lines[1] and "0:00:00" in lines[1] and "-:--:--" in lines[1]
    assert "loss 0.2" in lines[1]
    assert "epoch 1/20  loss 0.1235  accuracy 0.9877  val_loss 0.2346  val_accuracy 0.9543" in buf.getvalue()


def test_the_old_checkpoint_dir_option_still_names_the_runs_folder_but_is_not_shown(cli, tmp_path):
    trained = cli.runner.invoke(app, ["train", "linear", "--epochs", "1", "--checkpoint-dir", str(tmp_path / "old"), "--json"])
    assert trained.exit_code == 0, trained.stderr
    assert json.loads(trained.stdout)["run"].startswith(str(tmp_path / "old" / "linear"))
    listed = cli.runner.invoke(app, ["tasks", f"--checkpoint-dir={tmp_path / 'old'}", "--json"])
    assert json.loads(listed.stdout)["tasks"][0]["trained"] is not None
    shown = cli.runner.invoke(app, ["train", "--help"]).stdout
    assert "--runs-dir" in shown and "--checkpoint-dir" not in shown
    after_dashes = cli.runner.invoke(app, ["predict", "linear", "--checkpoint-dir", str(tmp_path / "old"), "--", "--checkpoint-dir"])
    assert "--checkpoint-dir" in after_dashes.stderr  # after `--` it is an input, as written


def test_tasks_at_80_columns_cuts_nothing(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    shown = cli("tasks").stdout
    assert "…" not in shown and max(len(line) for line in shown.splitlines()) <= 80
    flat = " ".join(shown.split())
    from dlcli.tasks import TASK_NAMES, get_task

    for name in TASK_NAMES:  # every view and default data set whole, though wrapped
        task = get_task(name)
        assert all(view in flat for view in task.views) and task.default_dataset in flat
