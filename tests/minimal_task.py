"""The smallest task that keeps the task contract (dlcli/contract.py): a Keras line fit to
y = 2x + 1. tests/test_task_contract.py registers it and runs it through the CLI, so
the contract the README's "Adding a task" section describes stays true."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dlcli import training
from dlcli.errors import UsageError
from dlcli.lazy import lazy_import
from dlcli.tasks import Context, DataRules, Option, TaskSpec, View, common_defaults

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


def predict(ctx: Context, inputs: list[str]) -> list[dict]:
    model = training.load_model(ctx.model_path, "minimal")
    rows = []
    for text in inputs:
        try:
            value = float(text)
        except ValueError:
            rows.append({"input": text, "error": f"{text!r} is not a number"})  # rule 5: one failed input
            continue
        y = float(model.predict(np.array([[value]], np.float32), verbose=0)[0, 0])
        rows.append({"input": text, "y": round(y, ctx.options["digits"])})
    if not rows:
        raise UsageError("give numbers to predict: `dlcli predict minimal 0.5 1`")
    return rows


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
)
