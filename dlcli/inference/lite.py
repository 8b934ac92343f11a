"""The models `predict` runs: a run's Keras model, or its exported `.tflite` (no TensorFlow).

`dlcli export TASK --format tflite` writes `<run>/export/`: `model.tflite`, `export.json`
(the task, the model file it came from with its size and modification time, the
preprocessing), `classes.json` and `config.yaml`. `predict` then uses the LiteRT interpreter
(PyPI `ai-edge-litert`) on it, so a one-file call starts in a fraction of a second instead of
paying TensorFlow's import (about 3 s). An export is only used where it is certainly the
run's current model: same task, and the model file unchanged since the export; otherwise
`predict` says so in one line and uses the Keras model.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from dlcli.errors import UsageError

EXPORT_DIR = "export"
META = "export.json"
ENGINES = ("auto", "keras", "lite")


def source_stamp(model_file: Path) -> dict:
    """What identifies the exported model file's version: its size and modification time."""
    st = os.stat(model_file)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def read_meta(tflite: Path) -> dict | None:
    """export.json beside the model, or None where it is missing or not a dlcli export's
    (its fields of the wrong types: then no field of it is trusted)."""
    try:
        meta = json.loads((Path(tflite).parent / META).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(meta, dict):
        return None
    stamp = meta.get("source_stamp")
    fields = [(meta.get("task"), str), (meta.get("source", ""), str), (meta.get("run", ""), str),
              (meta.get("keras_precision", "float32"), str), (stamp if stamp is not None else {}, dict)]
    if not all(isinstance(value, kind) for value, kind in fields):
        return None
    return meta


def check_export(tflite: Path, task: str, model_file: Path | None) -> str | None:
    """Why this export must not be used for `task` (None when it may be).

    `model_file`: the Keras model the export should come from (the run's), or None to check
    against the file recorded in the export itself (`--checkpoint x.tflite`)."""
    meta = read_meta(tflite)
    if meta is None:
        return f"{tflite} has no readable {META} beside it (not a dlcli export)"
    if meta.get("task") != task:
        return f"{tflite} is an export of task {meta.get('task')!r}, not {task}"
    source = Path(model_file) if model_file is not None else Path(meta.get("source", ""))
    if model_file is None and not meta.get("source"):
        return None
    if not source.exists():
        return None if model_file is None else f"{source} does not exist"
    if source_stamp(source) != meta.get("source_stamp"):
        return (f"{tflite} is stale: {source} changed after the export; "
                f"run `dlcli export {task} --run {meta.get('run', 'NAME')} --format tflite` again")
    return None


@contextlib.contextmanager
def _quiet_stderr():
    """LiteRT's C++ side prints "INFO: Created TensorFlow Lite XNNPACK delegate" on fd 2."""
    if sys.stderr is not None:  # None: Python started with stderr closed
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # fd 2 closed: nothing to keep quiet
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class LiteModel:
    """A `.tflite` classifier run by LiteRT on float32 batches of any size."""

    def __init__(self, path: Path, threads: int | None = None):
        from ai_edge_litert.interpreter import Interpreter

        try:
            with _quiet_stderr():
                self.interpreter = Interpreter(model_path=str(path), num_threads=threads or os.cpu_count() or 1)
        except (ValueError, RuntimeError) as exc:
            raise UsageError(f"{path}: not a TFLite model ({str(exc).strip().splitlines()[0]})") from None
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.batch = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.batch != len(x):
            self.interpreter.resize_tensor_input(self.input["index"], [len(x), *x.shape[1:]])
            with _quiet_stderr():
                self.interpreter.allocate_tensors()
            self.batch = len(x)
        self.interpreter.set_tensor(self.input["index"], np.ascontiguousarray(x, np.float32))
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output["index"]).copy()


class KerasModel:
    """The Keras model behind the same call: one compiled predict step per batch.

    A batch shorter than the largest one so far (a stream's last) is padded up to it with
    zero images and the padding's rows dropped: each new batch shape makes Keras trace its
    predict step again, 0.1 s for cnn (more than two batches of 128 cost), and inference
    treats each image on its own, so the padding changes no other row.
    """

    def __init__(self, model):
        self.model = model
        self.rows = 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        n = len(x)
        self.rows = max(self.rows, n)
        if n < self.rows:
            x = np.concatenate([x, np.zeros((self.rows - n, *x.shape[1:]), x.dtype)])
        return np.asarray(self.model.predict_on_batch(x))[:n]


def model_for(ctx, task: str, load_keras: Callable[[], object] | None = None):
    """The model `predict` runs for this context: the export where it is usable, else Keras
    (`load_keras()`; by default the run's model without its optimizer, which predict never uses).

    `--checkpoint FILE.tflite` uses that export (refused, exit 2, if it is another task's or
    stale); otherwise the run's `export/model.tflite` is used when `--engine` is auto or lite
    and it passes `check_export`, and a refused one is named in one line. `auto` skips the
    export of a model that computes in mixed precision (cnn's bfloat16): the float32 export
    does not reproduce its probabilities to 1e-4, and on CPUs with bfloat16 Keras is faster."""
    if load_keras is None:
        def load_keras():
            from dlcli.runs.checkpoints import load_model

            return load_model(ctx.model_path, task, compile=False)
    engine = ctx.options.get("engine", "auto")
    explicit = ctx.checkpoint is not None and Path(ctx.checkpoint).suffix == ".tflite"
    if explicit:
        problem = check_export(Path(ctx.checkpoint), task, None)
        if problem:
            raise UsageError(problem)
        return LiteModel(Path(ctx.checkpoint))
    if engine != "keras" and ctx.checkpoint is None:
        tflite = ctx.run.file(EXPORT_DIR) / "model.tflite"
        if tflite.exists():
            problem = check_export(tflite, task, ctx.run.file(ctx_model_file(task)))
            exact = (read_meta(tflite) or {}).get("keras_precision", "float32") == "float32"
            if problem is None and (exact or engine == "lite"):
                return LiteModel(tflite)
            if problem is None:  # a mixed-precision model: Keras, unless --engine lite asks for the export
                return KerasModel(load_keras())
            if engine == "lite":
                raise UsageError(problem)
            from rich.markup import escape

            from dlcli.engine.streams import console, printable

            console(stderr=True).print(
                f"[yellow]warning:[/] not using the export: {escape(printable(problem))}; predicting with the Keras model",
                soft_wrap=True)
        elif engine == "lite":
            raise UsageError(f"run {ctx.run.name} has no export; run `dlcli export {task} --run {ctx.run.name} "
                             f"--format tflite` first")
    return KerasModel(load_keras())


def ctx_model_file(task: str) -> str:
    from dlcli.tasks import get_task

    return get_task(task).model_file
