"""The task contract (dlcli/contract.py): a minimal task runs through every command, and a
task that breaks a rule is refused when it is registered, with one line naming the rule."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest

from dlcli import contract, tasks
from dlcli.errors import TaskError
from tests import minimal_task
from tests.conftest import assert_drawn


def test_a_minimal_task_runs_through_train_eval_predict_visualize(cli, minimal, tmp_path):
    trained = cli.json("train", "minimal", "--run", "a", "--quiet")
    run_dir = cli.root / "minimal" / "a"
    assert {p.name for p in run_dir.iterdir()} >= {"config.yaml", "model.keras", "history.csv", "metrics.json", "backup"}
    history = (run_dir / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 3 and history[0].startswith("epoch,")
    mse = cli.json("eval", "minimal", "--run", "a")["metrics"]["mse"]
    assert mse < 0.5  # the line is learnt (predicting the mean of y would score 4/3)
    assert mse == pytest.approx(trained["metrics"]["loss"], rel=0.5)
    numbers = tmp_path / "numbers"
    (numbers / "more").mkdir(parents=True)
    (numbers / "one.txt").write_text("1")
    (numbers / "more" / "two.txt").write_text("2")
    (numbers / "skipped.png").write_text("not a .txt: the folder's other files are not inputs")
    (tmp_path / "word.txt").write_text("x")
    rows = json.loads(cli("predict", "minimal", str(numbers), str(tmp_path / "word.txt"), "--digits", "1",
                          "--run", "a", "--json", expect=2).stdout)
    assert [r["input"] for r in rows] == [str(numbers / "one.txt"), str(numbers / "more" / "two.txt"),
                                          str(tmp_path / "word.txt")]  # rule 8: the folder searched for .txt
    assert rows[2] == {"input": str(tmp_path / "word.txt"), "error": f"{tmp_path / 'word.txt'}: not a number"}  # rule 5
    assert rows[0]["y"] == round(rows[0]["y"], 1) and abs(rows[0]["y"] - 3) < 1.0  # y = 2x + 1, learnt
    assert rows[1]["y"] > rows[0]["y"]
    exported = cli.json("export", "minimal", "--run", "a")  # rule 9: the spec says what goes in the export
    folder = cli.root / "minimal" / "a" / "export"
    assert exported["preprocessing"] == {"input": "one number", "shape": [1]} and exported["output"] == "y"
    assert json.loads((folder / "classes.json").read_text()) == ["y"] and (folder / "model.tflite").stat().st_size > 0
    out = tmp_path / "fit.png"
    shown = cli("visualize", "minimal-fit", "--run", "a", "--out", str(out))
    assert shown.stdout.strip() == str(out)
    assert_drawn(out, size=(440, 330))
    refused = cli("train", "minimal", "--dataset", "mnist", expect=2).stderr  # its DataRules, before TensorFlow
    assert "task minimal cannot use --dataset 'mnist'; it takes line (the default)" in refused
    listed = cli("tasks").stdout
    assert "minimal" in listed and "minimal-fit" in listed


def _module(tmp_path, monkeypatch, name: str, **changes) -> str:
    """A task module `name` that is the minimal task with `changes` to its spec."""
    monkeypatch.syspath_prepend(str(tmp_path))
    text = ("from dataclasses import replace\nfrom tests import minimal_task as m\n"
            f"TASK = replace(m.TASK, name={changes.pop('spec_name', name)!r}, **m.CHANGES[{name!r}])\n")
    (tmp_path / f"{name}.py").write_text(text)
    monkeypatch.setattr(minimal_task, "CHANGES", {name: changes}, raising=False)
    sys.modules.pop(name, None)
    return name


@pytest.mark.parametrize("name, changes, message", [
    ("dupview", {"views": {"training-curves": minimal_task.TASK.views["minimal-fit"]}},
     "view 'training-curves' is already a view of every task; view names must be unique (rule 4)"),
    ("dupview2", {"views": {"gan-samples": minimal_task.TASK.views["minimal-fit"]}},
     "view 'gan-samples' is already a view of task gan"),
    ("badname", {"spec_name": "other"}, "TASK.name is 'other'; it must be the module's name 'badname' (rule 1)"),
    ("nokeras", {"defaults": {k: v for k, v in minimal_task.DEFAULTS.items() if k != "strategy"}},
     "a Keras task's defaults need training.keras_defaults() (strategy missing) (rule 2)"),
    ("nocommon", {"defaults": {k: v for k, v in minimal_task.DEFAULTS.items() if k != "seed"}},
     "defaults lack seed; start them with common_defaults(...) (rule 2)"),
    ("badoption", {"predict_options": {"digits": 3}}, "predict option digits must be an Option"),
    ("badinputs", {"inputs": minimal_task.FileInputs(suffixes=("txt",))}, "suffixes are a tuple like ('.png',) (rule 8)"),
    ("streamalone", {"inputs": None}, "predict_stream must be a function, and needs inputs"),
    ("badexport", {"export": minimal_task.ExportSpec(preprocessing=None)}, "export must be an ExportSpec with a preprocessing(cfg)"),
    ("badparts", {"export": minimal_task.ExportSpec(preprocessing=dict, models={"Encoder/1": lambda m, ctx: m})},
     "export.models must be a non-empty dict of part name"),
    ("bothparts", {"export": minimal_task.ExportSpec(preprocessing=dict, model=lambda m: m, models={"a": lambda m, ctx: m})},
     "and excludes export.model (rule 9)"),
    ("nohelp", {"defaults": {**minimal_task.DEFAULTS, "wobble": 1}}, "config keys without a help line: wobble; add them to the spec's key_help (rule 10)"),
])
def test_a_task_breaking_a_rule_is_refused_at_registration(tmp_path, monkeypatch, cli, name, changes, message):
    module = _module(tmp_path, monkeypatch, name, **changes)
    tasks.get_task("gan")  # its views are registered
    with pytest.raises(TaskError) as info:
        tasks.add_task(name, module)
    assert message in str(info.value)
    assert name not in tasks.TASK_NAMES  # a refused task is not half-registered
    # through the CLI: one line, exit 1, no traceback
    monkeypatch.setattr(tasks, "_MODULES", {**tasks._MODULES, name: module})
    monkeypatch.setattr(tasks, "TASK_NAMES", tasks.TASK_NAMES)
    result = cli("eval", name, expect=1)
    assert message in result.stderr and "Traceback" not in result.stderr


def test_a_model_without_the_task_prefix_is_refused():
    contract.check_model_name("mnist", "mnist_cnn")
    with pytest.raises(TaskError, match=r"named 'cnn_default'; a task's Keras models must be named 'mnist_<variant>'"):
        contract.check_model_name("mnist", "cnn_default")


def test_the_contract_module_is_the_bottom_floor():
    """contract imports dlcli's errors and (in functions) config and data, which import no
    task and not the contract: so every module may import the contract, with no circle."""
    import ast
    from pathlib import Path

    def dlcli_imports(module) -> set:
        tree = ast.parse(Path(module.__file__).read_text())
        return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and node.module.startswith("dlcli")}

    from dlcli import errors
    from dlcli.data import files, sources as data

    assert dlcli_imports(contract) == {"dlcli.errors", "dlcli.config", "dlcli.data.sources"}
    assert dlcli_imports(data) <= {"dlcli.errors", "dlcli.engine.lazy", "dlcli.data.files"} and dlcli_imports(errors) == set()
    assert dlcli_imports(files) == set()
    assert dataclasses.is_dataclass(contract.TaskSpec)


def test_a_task_of_another_package_joins_through_its_entry_point(tmp_path, monkeypatch, cli):
    """A package declares `[project.entry-points."dlcli.tasks"] plugged = "its.module"`: the
    registry lists it and runs it like a built-in task."""
    from importlib.metadata import EntryPoint

    module = _module(tmp_path, monkeypatch, "plugged")
    declared = [EntryPoint(name="plugged", value=module, group=tasks.ENTRY_POINT_GROUP)]
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: declared if group == tasks.ENTRY_POINT_GROUP else [])
    before = list(tasks.TASK_NAMES)  # the list every module shares: changed in place, and restored
    tasks._installed_tasks()
    try:
        assert tasks.TASK_NAMES[-1] == "plugged" and tasks.get_task("plugged").name == "plugged"
        assert "plugged" in cli("tasks").stdout
    finally:
        tasks.remove_task("plugged")
        tasks.TASK_NAMES[:] = before
