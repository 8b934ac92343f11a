"""The library API: every operation from Python alone, with no process exit and no output."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import dlcli
from dlcli.runs.run import Run
from tests.conftest import assert_drawn, digit_images


def test_linear_train_evaluate_predict_visualize_from_python(tmp_path, capsys):
    runs = tmp_path / "runs"
    run = dlcli.train("linear", runs_dir=runs, run="first", epochs=3, sets=["l2=0.001"])
    assert isinstance(run, Run) and run.task == "linear" and run.path == runs / "linear" / "first"
    assert run.config["epochs"] == 3 and run.config["l2"] == 0.001
    assert run.metrics["val_accuracy"] > 0.8  # the circles are learnt (a constant scores about 0.5)
    assert run.metrics == Run("linear", run.path).metrics  # what metrics.json holds
    evaluated = dlcli.evaluate("linear", runs_dir=runs)  # the newest finished run
    assert evaluated["val_accuracy"] == pytest.approx(run.metrics["val_accuracy"])
    rows = list(dlcli.predict("linear", ["0,0", "3,3", "nope"], run=run))
    assert [r["input"] for r in rows] == ["0,0", "3,3", "nope"] and "error" in rows[2]
    assert {rows[0]["label"], rows[1]["label"]} == {0, 1}  # inside the circle and outside it
    png = dlcli.visualize("training-curves", task="linear", run="first", runs_dir=runs)
    assert png == run.path / "views" / "training-curves.png"
    assert_drawn(png)
    assert capsys.readouterr() == ("", "")  # a library call prints nothing without a reporter


def test_mnist_through_every_operation_from_python(tmp_path):
    x_train, y_train = digit_images(30, seed=1)
    x_test, y_test = digit_images(5, seed=2)
    data = tmp_path / "digits.npz"
    np.savez(data, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    runs = tmp_path / "runs"
    run = dlcli.train("mnist", dataset=f"npz:{data}", epochs=3, batch_size=32, runs_dir=runs, sets=["val_size=50"])
    assert run.metrics["test_accuracy"] > 0.5  # ten classes: chance is 0.1
    metrics = dlcli.evaluate("mnist", run=run.name, runs_dir=runs)
    assert metrics["test_accuracy"] == pytest.approx(run.metrics["test_accuracy"])
    folder = tmp_path / "digits"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(x_test[i]).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    rows = dlcli.predict("mnist", [str(folder)], run=run, top_k=2)
    first = next(rows)  # a stream: the first row before the others are asked for
    rest = list(rows)
    assert [r["input"] for r in [first, *rest]] == [str(folder / n) for n in ("0.png", "1.png", "2.png", "broken.png")]
    assert "error" in rest[-1] and len(first["top"]) == 2 and first["digit"] == first["top"][0]["digit"]
    exported = dlcli.export("mnist", run=run)
    assert exported == run.path / "export" / "model.tflite" and exported.stat().st_size > 1000
    assert json.loads((exported.parent / "classes.json").read_text()) == [str(d) for d in range(10)]
    lite_rows = list(dlcli.predict("mnist", [str(folder / "0.png")], run=run, engine="lite"))
    keras_rows = list(dlcli.predict("mnist", [str(folder / "0.png")], run=run, engine="keras"))
    assert lite_rows[0]["digit"] == keras_rows[0]["digit"]
    assert lite_rows[0]["probability"] == pytest.approx(keras_rows[0]["probability"], abs=2e-4)  # both rounded to 4 digits
    png = dlcli.visualize("mnist-errors", run=run, n=4)
    assert png.parent == run.path / "views"
    assert_drawn(png)


def test_api_errors_are_exceptions_not_exits(tmp_path):
    with pytest.raises(dlcli.UsageError, match="unknown task 'nope'"):
        dlcli.train("nope")
    with pytest.raises(dlcli.UsageError, match="unknown config key 'wobble'"):
        dlcli.train("linear", runs_dir=tmp_path, wobble=1)
    with pytest.raises(dlcli.UsageError, match="no finished run of task linear"):
        dlcli.evaluate("linear", runs_dir=tmp_path)
    assert not (tmp_path / "linear").exists()  # a refused call leaves no half-made run
    dlcli.train("linear", runs_dir=tmp_path, epochs=1)
    with pytest.raises(dlcli.UsageError, match="unknown option 'digits' for predict linear"):
        dlcli.predict("linear", ["0,0"], runs_dir=tmp_path, digits=3)
    with pytest.raises(dlcli.UsageError, match="unknown view"):
        dlcli.visualize("no-such-view", runs_dir=tmp_path)
    with pytest.raises(dlcli.UsageError, match="cannot be exported; these can: mnist, cnn, finetune, autoencoder"):
        dlcli.export("linear", runs_dir=tmp_path)


def test_train_config_resolves_without_training(tmp_path):
    cfg = dlcli.train_config("linear", config={"epochs": 7, "l2": 0.5}, sets=["l2=0.25"], lr=0.5, runs_dir=tmp_path)
    assert (cfg["epochs"], cfg["l2"], cfg["lr"]) == (7, 0.25, 0.5)  # defaults < config < sets < keywords
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
