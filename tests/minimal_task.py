"""The smallest task that keeps the task contract (dlcli/contract.py): a Keras line fit to
y = 2x + 1, whose predict reads numbers from .txt files (streamed) and whose model exports.
tests/test_task_contract.py registers it and runs it through the CLI, so the contract that
docs/architecture.md's "Adding a task" describes stays true."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from dlcli.engine import training
from dlcli.errors import UsageError
from dlcli.engine.lazy import lazy_import
from dlcli.tasks import Context, DataRules, ExportSpec, FileInputs, Option, TaskSpec, View, common_defaults

keras = lazy_import("keras")

DEFAULTS = {**common_defaults(dataset="line", epochs=3, batch_size=16, lr=0.1), **training.keras_defaults()}


def points(n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    x = np.linspace(-1, 1, n, dtype=np.float32)[:, None]
    return x, 2 * x + 1


def build(cfg: dict):
    inputs = keras.Input((1,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs), name="minimal_line")  # rule 3: <task>_
    model.compile(keras.optimizers.Adam(cfg["lr"]), "mse")
    return model


def train(ctx: Context) -> dict:
    training.set_seed(ctx.cfg["seed"])
    x, y = points()
    train_data, steps = training.array_epochs(x, y, ctx.cfg["batch_size"], ctx.cfg["seed"])
    _, history = training.fit(ctx, lambda: build(ctx.cfg), train_data, steps_per_epoch=steps)
    return {"loss": history[-1]["loss"]}


def evaluate(ctx: Context) -> dict:
    model = training.load_model(ctx.model_path, "minimal")
    x, y = points()
    return {"mse": float(model.evaluate(x, y, verbose=0))}


def predict_stream(ctx: Context, items) -> Iterator[dict]:
    """Rule 8: `items` are the .txt files the engine found (paths) and the inputs it could not
    read (error rows), in order; one row each, as they come."""
    model = training.load_model(ctx.model_path, "minimal")
    for item in items:
        if isinstance(item, dict):
            yield item
            continue
        try:
            value = float(Path(item).read_text())
        except ValueError:
            yield {"input": item, "error": f"{item}: not a number"}  # rule 5: one failed input
            continue
        y = float(model.predict(np.array([[value]], np.float32), verbose=0)[0, 0])
        yield {"input": item, "y": round(y, ctx.options["digits"])}


def predict(ctx: Context, inputs: list[str]) -> list[dict]:
    if not inputs:
        raise UsageError("give .txt files that hold a number each: `dlcli predict minimal x.txt`")
    return list(predict_stream(ctx, inputs))


def view_fit(ctx: Context) -> Path:
    from dlcli.plots import pyplot, save_figure

    model = training.load_model(ctx.model_path, "minimal")
    x, y = points()
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot(x[:, 0], y[:, 0], "o", label="data")
    ax.plot(x[:, 0], model.predict(x, verbose=0)[:, 0], label="model")
    ax.legend()
    return save_figure(fig, ctx.view_path("minimal-fit"))


TASK = TaskSpec(
    name="minimal",
    summary="a line fit to y = 2x + 1 (the contract's test task)",
    defaults=DEFAULTS,
    train=train,
    evaluate=evaluate,
    predict=predict,
    predict_options={"digits": Option(int, 3, "digits to round to")},
    views={"minimal-fit": View(view_fit, "the data and the fitted line")},
    data=DataRules(kinds=(), builtin=("line",)),
    inputs=FileInputs(suffixes=(".txt",)),
    predict_stream=predict_stream,
    export=ExportSpec(preprocessing=lambda cfg: {"input": "one number", "shape": [1]}, output="y",
                      classes=lambda ctx: ["y"]),
    key_help={},
)
