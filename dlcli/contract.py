"""The task contract: what a task module gives the CLI, and what the CLI gives it back.

A task is a module (`dlcli/tasks/<name>.py`) with a module-level `TASK = TaskSpec(...)`.
The registry (`dlcli.tasks`) imports it on first use and checks the spec with
`check_spec` before the CLI sees it, so a task that breaks a rule below fails at once with
one line naming the rule, not later with a traceback or a silently replaced view. The rules:

1. `TaskSpec.name` is the module's name, and the name of the task's run folder.
2. `defaults` holds `common_defaults(...)` (dataset, data_dir, epochs, batch_size, lr,
   seed). A Keras task (its `model_file` ends in `.keras`) also holds
   `training.keras_defaults()` (jit_compile, save_every_steps, save_interval_seconds, strategy): the CLI reads
   `cfg["strategy"]` to set up distribution before the task runs.
3. Every Keras model a task saves is named `<task>_<variant>` (`mnist_cnn`): loading a
   checkpoint tells a model of another task apart by that prefix before Keras builds it
   (`checkpoints.load_model`), and `training.fit` refuses to train a model without it.
4. View names are unique across all tasks and the generic views (`training-curves`): the
   CLI looks a view up by its name alone.
5. `predict` returns one dict per input. The CLI reads three keys: `input` (what the row
   is about, printed before it), `error` (this input failed: printed on stderr, and the
   command exits 2 after the other rows), `text` (the human line; otherwise the row's other
   keys are printed as `key value`); `note` is printed after the line in brackets. Every
   value must be JSON-serialisable for `--json`.
6. Task functions raise `UsageError` for what the user can fix and `RunError` for work
   that failed, never a bare exception; they import TensorFlow lazily (`dlcli.engine.lazy`), so
   reading a spec for `--help` or `dlcli tasks` stays fast.
7. `data` says what `--dataset` takes (`DataRules`), so the CLI can refuse bad data in
   milliseconds, before TensorFlow loads and before a run is made.
8. A task whose predict reads files says which (`inputs`, a `FileInputs`): the engine expands
   folders, globs and `-` (paths on stdin) into files of those types and hands them over in
   order, each file that cannot be read as an error row in its place. With `predict_stream`
   (`(ctx, items) -> rows`, items being paths and error rows) rows come out as their batch is
   done; without it `predict(ctx, paths)` gets the readable paths at once. A task that predicts
   files in batches may also give a `predictor` (`ctx -> Predictor`: per-input `prepare`,
   per-batch `finish`), which `dlcli serve` uses to decode requests in their own threads and
   run one model call for the inputs of many requests. A path may be a
   `dlcli.data.images.ImageBytes` (a file's bytes under a name), which `read_image` reads.
9. A task that can be exported says how (`export`, an `ExportSpec`): the model to export (or
   its named parts, one file each), the preprocessing its users must apply, what it outputs
   and its class names.
10. Every config key has a help line: the task's own in `key_help`, or the shared one in
    `dlcli.config.KEY_HELP`.

This module imports nothing of dlcli but its errors (and, inside functions, `config` and
`data.sources`, which import no task): every other module may import it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from dlcli.errors import TaskError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
COMMON_KEYS = ("dataset", "data_dir", "epochs", "batch_size", "lr", "seed")
KERAS_KEYS = ("jit_compile", "save_every_steps", "save_interval_seconds", "strategy")
ROW_KEYS = ("input", "error", "text", "note")  # the prediction-row keys the CLI reads (rule 5)
OPTION_TYPES = (int, float, str, bool)


@dataclass
class Option:
    """A task-specific option of `predict` or `visualize` (`--top-k 5`): its type (int,
    float, str or bool), default, help line, and how many values it takes."""

    type: type
    default: Any
    help: str
    nargs: int = 1


@dataclass
class View:
    """A picture a task can draw from a run: `dlcli visualize NAME`. `draw(ctx)` writes a
    PNG at `ctx.view_path(NAME)` and returns its path."""

    draw: Callable[["Context"], Path]
    help: str
    options: dict[str, Option] = field(default_factory=dict)


@dataclass
class DataRules:
    """What a task's `--dataset` takes, checked before TensorFlow loads (`data.check_dataset`):
    the kinds its loader accepts (`tfds` for a tensorflow-datasets name, `npz`, `folder`,
    `text`, `captions`), its built-in data names, the arrays an npz must hold, and whether
    a folder is split into <split>/<label>/ (an image-classification folder)."""

    kinds: tuple[str, ...]
    builtin: tuple[str, ...] = ()
    npz_keys: tuple[str, ...] = ()
    labelled_folder: bool = False


@dataclass
class FileInputs:
    """The files a task's predict reads (rule 8): folders are searched recursively, and globs
    matched, for these suffixes (lower case, with the dot)."""

    suffixes: tuple[str, ...] = IMAGE_SUFFIXES


@dataclass
class Predictor:
    """A task's predict in the two steps a scheduler needs (rule 8): `prepare(path) -> x` for
    one input (decoding and per-input preprocessing; a `UsageError` names a bad input), and
    `finish(paths, xs) -> rows` for a batch (the model, one row per input, in order), at most
    `batch_size` inputs a call. `predict_stream` is `inputs.stream(items, prepare, finish,
    batch_size)`; `dlcli serve` prepares each request's inputs in its own thread and calls
    `finish` once for the inputs of the requests that arrive together."""

    prepare: Callable[[str], Any]
    finish: Callable[[list, list], list]
    batch_size: int


@dataclass
class ExportSpec:
    """What `dlcli export` writes for a task (rule 9).

    `preprocessing(cfg) -> dict` is what a user of the exported file must do to an input
    (recorded in export.json); `model(keras_model)` picks the part to export (the whole model
    when None), written as `model.tflite`; `output` says what the file returns;
    `classes(ctx) -> list` gives the class names written to classes.json (None: none).

    A task that runs several models exports them as `models`, a mapping of part name ->
    `picker(keras_model, ctx)` returning the Keras model of that part, each written as
    `<name>.tflite` (the first is the main file). `files` names run files that a user of the
    export needs beside it (a vocabulary): they are copied into the export folder. `predict` runs the same pickers' models
    on the Keras path (`dlcli.inference.lite.models_for`), so both paths compute the same
    functions. `model` and `models` exclude each other.

    Example:
        ExportSpec(preprocessing=lambda cfg: {"shape": [28, 28], "range": [0.0, 1.0]},
                   classes=lambda ctx: [str(d) for d in range(10)])
        ExportSpec(preprocessing=..., models={"encoder": lambda m, ctx: m.get_layer("encoder"),
                                              "decoder": lambda m, ctx: m.get_layer("decoder")})
    """

    preprocessing: Callable[[dict], dict]
    model: Callable[[Any], Any] | None = None
    output: str = "class probabilities (softmax)"
    classes: Callable[["Context"], list] | None = None
    models: dict[str, Callable[[Any, "Context"], Any]] | None = None
    files: tuple[str, ...] = ()  # run files the export needs beside it (a vocabulary), copied in
    batch: int | None = None  # a fixed batch size of the exported files (None: any)

    @property
    def parts(self) -> list[str]:
        """The exported files' names without `.tflite`: `model`, or the keys of `models`."""
        return list(self.models) if self.models else ["model"]

    def pick(self, keras_model, ctx: "Context") -> dict:
        """The Keras model of each part (`parts`) of a run's loaded model: what `dlcli export`
        converts and what predict's Keras path runs, so that both compute the same functions."""
        if self.models:
            return {name: picker(keras_model, ctx) for name, picker in self.models.items()}
        return {"model": self.model(keras_model) if self.model is not None else keras_model}


@dataclass
class TaskSpec:
    """One task, as the CLI sees it (the rules are in this module's docstring).

    `train(ctx) -> metrics` trains `ctx.run` and returns its final metrics (written to
    metrics.json); `evaluate(ctx) -> metrics`; `predict(ctx, inputs) -> rows`; `choices`
    lists the allowed values of config keys; `views` maps view names to pictures;
    `predict_options` are predict's own options; `model_file` is the run's model file,
    which `ctx.model_path` points at; `inputs`, `predict_stream`, `predictor`, `export` and
    `key_help` follow rules 8-10.
    """

    name: str
    summary: str
    defaults: dict
    train: Callable[["Context"], dict]
    evaluate: Callable[["Context"], dict]
    predict: Callable[["Context", list], list]
    choices: dict[str, list] = field(default_factory=dict)
    views: dict[str, View] = field(default_factory=dict)
    predict_options: dict[str, Option] = field(default_factory=dict)
    model_file: str = "model.keras"
    data: DataRules | None = None
    inputs: FileInputs | None = None
    predict_stream: Callable[["Context", Any], Any] | None = None
    export: ExportSpec | None = None
    key_help: dict[str, str] = field(default_factory=dict)
    predictor: Callable[["Context"], Predictor] | None = None

    @property
    def default_dataset(self) -> str:
        return self.defaults["dataset"]

    @property
    def is_keras(self) -> bool:
        return self.model_file.endswith(".keras")


@dataclass
class Context:
    """Everything a task function needs: the resolved config, the run, the reporter."""

    cfg: dict
    run: Any  # dlcli.runs.run.Run
    reporter: Any  # dlcli.engine.progress.Reporter
    options: dict = field(default_factory=dict)
    resume: bool = False
    checkpoint: Path | None = None  # an explicit model file instead of the run's
    out: Path | None = None
    strategy: Any = None  # a tf.distribute strategy, or None for the default
    resume_from: Any = None  # on a non-chief worker: the chief's run, whose checkpoints it loads
    continuing: bool = False  # a later stage of this same command goes on from its own checkpoint (no "resuming")
    engine: str | None = None  # the engine `lite.model_for` chose for this context: lite or keras

    @property
    def model_path(self) -> Path:
        return self.checkpoint or self.run.file(registered(self.run.task).model_file)

    def view_path(self, view: str) -> Path:
        """Where a view's PNG goes: `--out`, else the run's views/VIEW.png."""
        return self.out or self.run.views_path(view)

    @property
    def on_other_data(self) -> bool:
        """Whether `cfg["dataset"]` names other data than the run trained on (`eval --dataset OTHER`).

        Then a task evaluates all of that data (or its test split), not the part its seed
        would have held out for validation, and says how many items it scored.
        """
        if not self.run.config_path.exists():
            return False
        from dlcli.data.sources import data_identity

        trained = self.run.read_config()
        return (data_identity(self.cfg.get("dataset"), self.cfg.get("data_dir"))
                != data_identity(trained.get("dataset"), trained.get("data_dir")))


def common_defaults(dataset: str, epochs: int, batch_size: int, lr: float, seed: int = 42) -> dict:
    """The keys every task's config has, with the task's own values."""
    return {
        "dataset": dataset,
        "data_dir": None,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
    }


_REGISTERED: dict[str, TaskSpec] = {}
_VIEW_OWNERS: dict[str, str] = {}  # view name -> the task (or "generic") that has it


def register(spec: Any, name: str, generic_views: dict | None = None) -> TaskSpec:
    """Check a task module's `TASK` against the contract and remember it (idempotent)."""
    check_spec(spec, name)
    for view_name in generic_views or {}:
        _VIEW_OWNERS.setdefault(view_name, "generic")
    for view_name in spec.views:
        owner = _VIEW_OWNERS.get(view_name, name)
        if owner != name:
            raise TaskError(f"task {name}: view {view_name!r} is already a view of "
                            f"{'every task' if owner == 'generic' else 'task ' + owner}; view names must be unique (rule 4)")
    for view_name in spec.views:
        _VIEW_OWNERS[view_name] = name
    _REGISTERED[name] = spec
    return spec


def unregister(name: str) -> None:
    """Forget a task (tests that register a task of their own)."""
    spec = _REGISTERED.pop(name, None)
    for view_name in spec.views if spec else ():
        if _VIEW_OWNERS.get(view_name) == name:
            del _VIEW_OWNERS[view_name]


def registered(name: str) -> TaskSpec:
    """A registered task's spec (the registry's `get_task` registers a task when it loads it)."""
    if name not in _REGISTERED:
        raise TaskError(f"task {name} is not registered; load it with dlcli.tasks.get_task first")
    return _REGISTERED[name]


def check_spec(spec: Any, name: str) -> None:
    """Rules 1, 2 and 7, and the shape of views and options: one clear line per broken rule."""
    where = f"task module {name}"
    if not isinstance(spec, TaskSpec):
        raise TaskError(f"{where}: TASK must be a dlcli.contract.TaskSpec, got {type(spec).__name__}")
    if spec.name != name:
        raise TaskError(f"{where}: TASK.name is {spec.name!r}; it must be the module's name {name!r} (rule 1)")
    missing = [k for k in COMMON_KEYS if k not in spec.defaults]
    if missing:
        raise TaskError(f"task {name}: defaults lack {', '.join(missing)}; start them with common_defaults(...) (rule 2)")
    missing = [k for k in KERAS_KEYS if k not in spec.defaults] if spec.is_keras else []
    if missing:
        raise TaskError(f"task {name}: a Keras task's defaults need training.keras_defaults() ({', '.join(missing)} missing) (rule 2)")
    for view_name, view in spec.views.items():
        if not isinstance(view, View) or not callable(view.draw):
            raise TaskError(f"task {name}: view {view_name!r} must be a View with a draw(ctx) function")
    options = {**{f"predict option {k}": o for k, o in spec.predict_options.items()},
               **{f"view {v} option {k}": o for v, view in spec.views.items() for k, o in view.options.items()}}
    for label, option in options.items():
        if not isinstance(option, Option) or option.type not in OPTION_TYPES:
            raise TaskError(f"task {name}: {label} must be an Option of type int, float, str or bool")
    if spec.data is not None and not isinstance(spec.data, DataRules):
        raise TaskError(f"task {name}: data must be a DataRules (rule 7)")
    if spec.inputs is not None:
        suffixes = getattr(spec.inputs, "suffixes", None)
        if (not isinstance(spec.inputs, FileInputs) or not suffixes or not isinstance(suffixes, tuple)
                or not all(isinstance(s, str) and s.startswith(".") and s == s.lower() for s in suffixes)):
            raise TaskError(f"task {name}: inputs must be a FileInputs whose suffixes are a tuple like ('.png',) (rule 8)")
    if spec.predict_stream is not None and (not callable(spec.predict_stream) or spec.inputs is None):
        raise TaskError(f"task {name}: predict_stream must be a function, and needs inputs (the files it reads) (rule 8)")
    if spec.predictor is not None and (not callable(spec.predictor) or spec.inputs is None):
        raise TaskError(f"task {name}: predictor must be a function of the context, and needs inputs (the files it reads) (rule 8)")
    if spec.export is not None:
        ex = spec.export
        if (not isinstance(ex, ExportSpec) or not callable(ex.preprocessing)
                or any(f is not None and not callable(f) for f in (ex.model, ex.classes))):
            raise TaskError(f"task {name}: export must be an ExportSpec with a preprocessing(cfg) function (rule 9)")
        if ex.models is not None:
            if (not isinstance(ex.models, dict) or not ex.models or ex.model is not None
                    or not all(isinstance(k, str) and re.fullmatch(r"[a-z][a-z0-9_]*", k) for k in ex.models)
                    or not all(callable(f) for f in ex.models.values())):
                raise TaskError(f"task {name}: export.models must be a non-empty dict of part name (lower case, "
                                f"like 'encoder') -> picker(keras_model, ctx), and excludes export.model (rule 9)")
        if ex.batch is not None and (not isinstance(ex.batch, int) or ex.batch < 1):
            raise TaskError(f"task {name}: export.batch must be a positive int or None (rule 9)")
        if not isinstance(ex.files, tuple) or not all(isinstance(f, str) and "/" not in f for f in ex.files):
            raise TaskError(f"task {name}: export.files must be a tuple of run file names like ('vocab.json',) (rule 9)")
        if not spec.is_keras:
            raise TaskError(f"task {name}: only a Keras task (model_file *.keras) can be exported (rule 9)")
    from dlcli.config import flat_keys, key_help

    if not isinstance(spec.key_help, dict):
        raise TaskError(f"task {name}: key_help must be a dict of config key -> one line (rule 10)")
    unexplained = [k for k in flat_keys(spec.defaults) if not key_help(spec.key_help, k)]
    if unexplained:
        raise TaskError(f"task {name}: config keys without a help line: {', '.join(unexplained)}; "
                        f"add them to the spec's key_help (rule 10)")


def check_model_name(task: str, model_name: str) -> None:
    """Rule 3: a task's Keras models are named `<task>_<variant>`."""
    if not str(model_name).startswith(f"{task}_"):
        raise TaskError(f"task {task} built a model named {model_name!r}; a task's Keras models must be named "
                        f"'{task}_<variant>' so their checkpoints can be told apart (rule 3)")
