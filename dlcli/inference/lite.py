"""The models `predict` runs: a run's Keras model, or its exported `.tflite` (no TensorFlow).

`dlcli export TASK --format tflite` writes `<run>/export/`: `model.tflite` (or one file per
part of a task that runs several models, `ExportSpec.models`), `export.json` (the task, the
model file it came from with its size and modification time, each file's inputs, the
preprocessing), `classes.json` and `config.yaml`. `predict` then uses the LiteRT interpreter
(PyPI `ai-edge-litert`) on it, so a one-file call starts in a fraction of a second instead of
paying TensorFlow's import (about 3 s). An export is only used where it is certainly the
run's current model: same task, and the model file unchanged since the export; otherwise
`predict` says so in one line and uses the Keras model.

The models `model_for` and `models_for` load stay warm in the process (`WARM`, a few of them, keyed by the
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
    return _meta_problem(read_meta(tflite), tflite, task, model_file)


def _meta_problem(meta: dict | None, tflite: Path, task: str, model_file: Path | None) -> str | None:
    """`check_export` on export.json as already read (`read_meta(tflite)`)."""
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
    """A `.tflite` model run by LiteRT on batches of any size.

    Called with the inputs in the Keras model's order (`inputs`: their names, as export.json
    records them; a one-input model needs none), it returns the output, or the list of
    outputs in the Keras model's order for a model with several (run through the file's
    signature, which resizes itself to each call's shapes).

    A one-input model keeps one interpreter per batch size it has run, at most `KEEP`
    (resizing one costs a new tensor arena); a batch shorter than a size it has is padded up
    to the smallest such size, unless that would more than double it. Batches of
    ever-changing sizes (a server's) then cost no resize after the first few. A file exported
    for a fixed batch size (`ExportSpec.batch`) runs every call in batches of that size, the
    last padded."""

    KEEP = 10  # the powers of two up to 512

    def __init__(self, path: Path, threads: int | None = None, inputs: list[str] | None = None):
        self.path, self.threads = Path(path), threads or os.cpu_count() or 1
        self.interpreters: dict[int, object] = {}
        self.spare = self._interpreter(None)  # read for its details, then the first batch size's
        details, outputs = self.spare.get_input_details(), self.spare.get_output_details()
        self.input, self.output = details[0], outputs[0]
        self.lock = threading.Lock()
        self.single = len(details) == 1 and len(outputs) == 1
        first = int(self.input.get("shape_signature", [-1])[0]) if len(self.input["shape"]) else -1
        self.fixed = first if first > 0 and self.single else None
        if not self.single:
            self.signed, self.spare = self.spare, None
            signature = self.signed.get_signature_list()["serving_default"]
            names = list(inputs or signature["inputs"])
            if sorted(names) != sorted(signature["inputs"]):
                raise UsageError(f"{path}: its inputs are {', '.join(signature['inputs'])}, not {', '.join(names)}")
            self.runner = self.signed.get_signature_runner()
            kinds = self.runner.get_input_details()
            self.inputs = [(name, kinds[name]["dtype"]) for name in names]
            self.outputs = sorted(signature["outputs"], key=lambda k: int(k.rpartition("_")[2]))  # output_0, output_1...
            self.shapes = None

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

    def __call__(self, *xs: np.ndarray):
        with self.lock:
            if not self.single:
                return self._run_signature(xs)
            (x,) = xs
            if self.fixed:
                return self._run_fixed(x)
            n = len(x)
            rows = _bucket(n, self.interpreters)
            if rows is None or rows > 2 * n:
                rows = n
            interpreter = self.interpreters.get(rows)
            if interpreter is None:
                interpreter = self._interpreter(rows)
                interpreter.resize_tensor_input(self.input["index"], [rows, *x.shape[1:]])
                with _quiet_stderr():
                    interpreter.allocate_tensors()
            interpreter.set_tensor(self.input["index"], np.ascontiguousarray(_padded(x, rows), self.input["dtype"]))
            interpreter.invoke()
            return interpreter.get_tensor(self.output["index"])[:n].copy()

    def _run_fixed(self, x: np.ndarray) -> np.ndarray:
        """A model of a fixed batch size B: batches of B, the last padded with zeros (each row
        is computed on its own, so the padding changes no other row)."""
        b, n, out = self.fixed, len(x), []
        interpreter = self.interpreters.get(b)
        if interpreter is None:
            interpreter = self._interpreter(b)
            with _quiet_stderr():
                interpreter.allocate_tensors()
        x = np.ascontiguousarray(x, self.input["dtype"])
        for s in range(0, n, b):
            interpreter.set_tensor(self.input["index"], _padded(x[s: s + b], b))
            interpreter.invoke()
            out.append(interpreter.get_tensor(self.output["index"])[: n - s].copy())
        return np.concatenate(out) if out else np.zeros((0, *self.output["shape"][1:]), self.output["dtype"])

    def _run_signature(self, xs):
        if len(xs) != len(self.inputs):
            raise ValueError(f"{self.path.name} takes {len(self.inputs)} inputs, got {len(xs)}")
        feed = {name: np.ascontiguousarray(x, dtype) for (name, dtype), x in zip(self.inputs, xs)}
        shapes = [v.shape for v in feed.values()]
        if shapes != self.shapes:  # the runner resizes and allocates for new shapes, which logs
            with _quiet_stderr():
                out = self.runner(**feed)
            self.shapes = shapes
        else:
            out = self.runner(**feed)
        return [np.array(out[name]) for name in self.outputs]


class KerasModel:
    """The Keras model behind the same call: one compiled predict step per batch.

    A batch is padded with zero images up to the smallest batch size already run that holds
    it (a stream's last batch, up to the full one), and the padding's rows dropped: each new
    batch shape makes Keras trace its predict step again, 0.1 s for cnn (more than two batches
    of 128 cost), and inference treats each image on its own, so the padding changes no other
    row. A server runs the powers of two up to its batch size once at start (`dlcli serve`'s
    warm-up), so that no batch pays a trace or more than twice its own size. A model of several
    inputs takes them in order, and one of several outputs returns their list.
    """

    def __init__(self, model):
        self.model = model
        self.sizes: set[int] = set()
        self.lock = threading.Lock()

    def __call__(self, *xs: np.ndarray):
        n = len(xs[0])
        with self.lock:
            rows = _bucket(n, self.sizes) or n
            self.sizes.add(rows)
            padded = [_padded(x, rows) for x in xs]
            out = self.model.predict_on_batch(padded if len(padded) > 1 else padded[0])
        if isinstance(out, (list, tuple)):
            return [np.asarray(o)[:n] for o in out]
        return np.asarray(out)[:n]


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


def _default_loader(ctx, task: str) -> Callable[[], object]:
    def load_keras():
        from dlcli.runs.checkpoints import load_model

        return load_model(ctx.model_path, task, compile=False)

    return load_keras


def export_folder(ctx, task: str) -> tuple[Path, dict] | None:
    """The export `predict` runs for this context with its export.json (read once), or None
    for the Keras model.

    `--checkpoint FILE.tflite` uses the export that file belongs to (refused, exit 2, if it is
    another task's or stale); otherwise the run's `export/` is used when `--engine` is auto or
    lite and it passes `check_export`, and a refused one is named in one line. `auto` skips the
    export of a model that computes in mixed precision (cnn's bfloat16): the float32 export
    does not reproduce its outputs to 1e-4, and on CPUs with bfloat16 Keras is faster."""
    engine = ctx.options.get("engine", "auto")
    if ctx.checkpoint is not None and Path(ctx.checkpoint).suffix == ".tflite":
        tflite = Path(ctx.checkpoint)
        meta = read_meta(tflite)
        problem = _meta_problem(meta, tflite, task, None) or _missing_parts(tflite.parent, task, meta)
        if problem:
            raise UsageError(problem)
        return tflite.parent, meta
    if engine == "keras" or ctx.checkpoint is not None:
        return None
    folder = ctx.run.file(EXPORT_DIR)
    meta = read_meta(folder / META)
    main = _main_file(folder, meta)
    if main is None:
        if engine == "lite":
            raise UsageError(f"run {ctx.run.name} has no export; run `dlcli export {task} --run {ctx.run.name} "
                             f"--format tflite` first")
        return None
    problem = (_meta_problem(meta, main, task, ctx.run.file(ctx_model_file(task)))
               or _missing_parts(folder, task, meta))
    exact = (meta or {}).get("keras_precision", "float32") == "float32"
    if problem is None:
        return (folder, meta) if exact or engine == "lite" else None  # mixed precision: Keras, unless --engine lite
    if engine == "lite":
        raise UsageError(problem)
    from rich.markup import escape

    from dlcli.engine.streams import console, printable

    console(stderr=True).print(
        f"[yellow]warning:[/] not using the export: {escape(printable(problem))}; predicting with the Keras model",
        soft_wrap=True)
    return None


def _main_file(folder: Path, meta: dict | None) -> Path | None:
    """The export's main .tflite file (export.json's `file`), if the folder holds a TFLite export."""
    name = meta.get("file") if meta else "model.tflite"
    path = folder / str(name)
    return path if path.suffix == ".tflite" and path.exists() else None


def _files(meta: dict | None) -> dict:
    """An export's files by part (export.json's `files`; an export without it has one, `model`)."""
    return (meta or {}).get("files") or {"model": {"file": "model.tflite"}}


def _missing_parts(folder: Path, task: str, meta: dict | None) -> str | None:
    """Why an export lacks some of the parts the task runs (an export of an older dlcli), or None."""
    from dlcli.tasks import get_task

    files = _files(meta)
    missing = [p for p in get_task(task).export.parts if p not in files or not (folder / files[p]["file"]).exists()]
    if not missing:
        return None
    run = (meta or {}).get("run", "NAME")
    return f"{folder} lacks the part(s) {', '.join(missing)} that {task} runs; run `dlcli export {task} --run {run}` again"


def models_for(ctx, task: str, load_keras: Callable[[], object] | None = None) -> dict:
    """The models `predict` runs for this context, by part name (`ExportSpec.parts`): each
    part's .tflite where the export is usable (`export_folder`), else the Keras model of each
    part, picked by the task's `ExportSpec` from `load_keras()` (by default the run's model
    without its optimizer, which predict never uses). They stay warm in the process (`WARM`),
    except those of a task's own loader, whose model may be anything."""
    from dlcli.tasks import get_task

    ex = get_task(task).export
    parts = ex.parts if ex is not None else ["model"]
    usable = export_folder(ctx, task)
    if usable is not None:
        _chose(ctx, "lite")
        folder, meta = usable
        files = _files(meta)
        return {p: _warm(_key(folder / files[p]["file"], "lite"),
                         lambda p=p: LiteModel(folder / files[p]["file"], inputs=files[p].get("inputs")))
                for p in parts}
    _chose(ctx, "keras")

    def keras_parts():
        model = (load_keras or _default_loader(ctx, task))()
        picked = ex.pick(model, ctx) if ex is not None else {"model": model}
        return {name: KerasModel(part) for name, part in picked.items()}

    if load_keras is not None:
        return keras_parts()
    return dict(_warm(_key(ctx.model_path, "keras", task), keras_parts))


def model_for(ctx, task: str, load_keras: Callable[[], object] | None = None):
    """The one model `predict` runs for a task that exports one file (`models_for`'s `model`);
    `--checkpoint FILE.tflite` runs that file."""
    if ctx.checkpoint is not None and Path(ctx.checkpoint).suffix == ".tflite":
        problem = check_export(Path(ctx.checkpoint), task, None)
        if problem:
            raise UsageError(problem)
        _chose(ctx, "lite")
        return _warm(_key(Path(ctx.checkpoint), "lite"), lambda: LiteModel(Path(ctx.checkpoint)))
    return models_for(ctx, task, load_keras)["model"]


def _chose(ctx, engine: str) -> None:
    """Note on the context which engine it runs (what `dlcli serve` reports)."""
    try:
        ctx.engine = engine
    except AttributeError:
        pass


def ctx_model_file(task: str) -> str:
    from dlcli.tasks import get_task

    return get_task(task).model_file
