"""The models `predict` runs: a run's Keras model, or its exported `.tflite` (no TensorFlow).

`dlcli export TASK --format tflite` writes `<run>/export/`: `model.tflite`, `export.json`
(the task, the model file it came from with its size and modification time, the
preprocessing), `classes.json` and `config.yaml`. `predict` then uses the LiteRT interpreter
(PyPI `ai-edge-litert`) on it, so a one-file call starts in a fraction of a second instead of
paying TensorFlow's import (about 3 s). An export is only used where it is certainly the
run's current model: same task, and the model file unchanged since the export; otherwise
`predict` says so in one line and uses the Keras model.

The models `model_for` loads stay warm in the process (`WARM`, a few of them, keyed by the
model file, its size and modification time and the engine): a second predict of the same run
in one process (a notebook, `dlcli serve`) does not load it again, and a file that changed
is loaded afresh. Both model classes take one batch at a time (a lock), so threads may share
them.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
from collections import OrderedDict
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


def _padded(x: np.ndarray, rows: int) -> np.ndarray:
    """`x` with zero rows after it up to `rows` (inference treats each row on its own)."""
    if rows == len(x):
        return x
    return np.concatenate([x, np.zeros((rows - len(x), *x.shape[1:]), x.dtype)])


def _bucket(n: int, sizes) -> int | None:
    """The smallest batch size of `sizes` that holds n rows, or None."""
    return min((s for s in sizes if s >= n), default=None)


class LiteModel:
    """A `.tflite` classifier run by LiteRT on float32 batches of any size.

    One interpreter per batch size it has run, at most `KEEP` (resizing one costs a new tensor
    arena); a batch shorter than a size it has is padded up to the smallest such size, unless
    that would more than double it. Batches of ever-changing sizes (a server's) then cost no
    resize after the first few."""

    KEEP = 10  # the powers of two up to 512

    def __init__(self, path: Path, threads: int | None = None):
        self.path, self.threads = Path(path), threads or os.cpu_count() or 1
        self.interpreters: dict[int, object] = {}
        self.spare = self._interpreter(None)  # read for its details, then the first batch size's
        self.input = self.spare.get_input_details()[0]
        self.output = self.spare.get_output_details()[0]
        self.lock = threading.Lock()

    def _interpreter(self, rows: int | None):
        from ai_edge_litert.interpreter import Interpreter

        interpreter, self.spare = getattr(self, "spare", None), None
        try:
            if interpreter is None:
                with _quiet_stderr():
                    interpreter = Interpreter(model_path=str(self.path), num_threads=self.threads)
        except (ValueError, RuntimeError) as exc:
            raise UsageError(f"{self.path}: not a TFLite model ({str(exc).strip().splitlines()[0]})") from None
        if rows is not None:
            if len(self.interpreters) >= self.KEEP:
                del self.interpreters[min(self.interpreters)]
            self.interpreters[rows] = interpreter
        return interpreter

    def __call__(self, x: np.ndarray) -> np.ndarray:
        n = len(x)
        with self.lock:
            rows = _bucket(n, self.interpreters)
            if rows is None or rows > 2 * n:
                rows = n
            interpreter = self.interpreters.get(rows)
            if interpreter is None:
                interpreter = self._interpreter(rows)
                interpreter.resize_tensor_input(self.input["index"], [rows, *x.shape[1:]])
                with _quiet_stderr():
                    interpreter.allocate_tensors()
            interpreter.set_tensor(self.input["index"], np.ascontiguousarray(_padded(x, rows), np.float32))
            interpreter.invoke()
            return interpreter.get_tensor(self.output["index"])[:n].copy()


class KerasModel:
    """The Keras model behind the same call: one compiled predict step per batch.

    A batch is padded with zero images up to the smallest batch size already run that holds
    it (a stream's last batch, up to the full one), and the padding's rows dropped: each new
    batch shape makes Keras trace its predict step again, 0.1 s for cnn (more than two batches
    of 128 cost), and inference treats each image on its own, so the padding changes no other
    row. A server runs the powers of two up to its batch size once at start (`dlcli serve`'s
    warm-up), so that no batch pays a trace or more than twice its own size.
    """

    def __init__(self, model):
        self.model = model
        self.sizes: set[int] = set()
        self.lock = threading.Lock()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        n = len(x)
        with self.lock:
            rows = _bucket(n, self.sizes) or n
            self.sizes.add(rows)
            return np.asarray(self.model.predict_on_batch(_padded(x, rows)))[:n]


WARM_MODELS = 4  # models `model_for` keeps loaded in a process, the most recently used
WARM: "OrderedDict[tuple, object]" = OrderedDict()
_WARM_LOCK = threading.Lock()


def _warm(key: tuple, load: Callable[[], object]):
    """The model loaded for `key` (a file, its stamp, the engine), loading it once: callers in
    other threads wait for the first one's load rather than load it again."""
    with _WARM_LOCK:
        entry = WARM.get(key)
        if entry is None:
            entry = WARM[key] = [threading.Lock(), None]
        WARM.move_to_end(key)
        while len(WARM) > WARM_MODELS:
            WARM.popitem(last=False)
    with entry[0]:
        if entry[1] is None:
            entry[1] = load()
        return entry[1]


def _key(path: Path, engine: str, *more) -> tuple:
    path = Path(path)
    try:
        stamp = tuple(source_stamp(path).values())
    except OSError:
        stamp = None
    return (str(path.resolve()), stamp, engine, *more)


def model_for(ctx, task: str, load_keras: Callable[[], object] | None = None):
    """The model `predict` runs for this context: the export where it is usable, else Keras
    (`load_keras()`; by default the run's model without its optimizer, which predict never uses).

    `--checkpoint FILE.tflite` uses that export (refused, exit 2, if it is another task's or
    stale); otherwise the run's `export/model.tflite` is used when `--engine` is auto or lite
    and it passes `check_export`, and a refused one is named in one line. `auto` skips the
    export of a model that computes in mixed precision (cnn's bfloat16): the float32 export
    does not reproduce its probabilities to 1e-4, and on CPUs with bfloat16 Keras is faster."""
    custom = load_keras is not None
    if load_keras is None:
        def load_keras():
            from dlcli.runs.checkpoints import load_model

            return load_model(ctx.model_path, task, compile=False)

    def keras_model():
        _chose(ctx, "keras")
        if custom:  # a task's own loader: its model may be anything, so it is not kept
            return KerasModel(load_keras())
        return _warm(_key(ctx.model_path, "keras", task), lambda: KerasModel(load_keras()))

    def lite_model(path: Path):
        _chose(ctx, "lite")
        return _warm(_key(path, "lite"), lambda: LiteModel(path))

    engine = ctx.options.get("engine", "auto")
    explicit = ctx.checkpoint is not None and Path(ctx.checkpoint).suffix == ".tflite"
    if explicit:
        problem = check_export(Path(ctx.checkpoint), task, None)
        if problem:
            raise UsageError(problem)
        return lite_model(Path(ctx.checkpoint))
    if engine != "keras" and ctx.checkpoint is None:
        tflite = ctx.run.file(EXPORT_DIR) / "model.tflite"
        if tflite.exists():
            problem = check_export(tflite, task, ctx.run.file(ctx_model_file(task)))
            exact = (read_meta(tflite) or {}).get("keras_precision", "float32") == "float32"
            if problem is None and (exact or engine == "lite"):
                return lite_model(tflite)
            if problem is None:  # a mixed-precision model: Keras, unless --engine lite asks for the export
                return keras_model()
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
    return keras_model()


def _chose(ctx, engine: str) -> None:
    """Note on the context which engine it runs (what `dlcli serve` reports)."""
    try:
        ctx.engine = engine
    except AttributeError:
        pass


def ctx_model_file(task: str) -> str:
    from dlcli.tasks import get_task

    return get_task(task).model_file
