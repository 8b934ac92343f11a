"""dlcli as a library: train, evaluate, predict, export and visualize any task from Python.

The command line is a thin layer over these five functions; a notebook, a test or a server
calls them directly. The life of a run lives here: creating it, locking it while it
trains, choosing which run `resume` continues, a cluster worker's private run, and removing
a new run that failed before it saved anything.

Nothing here prints or exits the process unless a `reporter` is given (`dlcli.engine.progress.
Reporter`); failures raise `UsageError` (something the caller can fix) or `RunError` (work that
failed). Importing this module loads no TensorFlow: a task loads it when it does real work.

Example:
    >>> import dlcli
    >>> run = dlcli.train("linear", runs_dir="runs", epochs=2)
    >>> round(run.metrics["val_accuracy"], 2)
    0.92
    >>> next(dlcli.predict("linear", ["0.5,-1"], run=run))
    {'input': '0.5,-1', 'probability': 0.905802, 'label': 1}
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from dlcli import config as config_lib
from dlcli.contract import Context, Option, TaskSpec
from dlcli.data import sources as data_lib
from dlcli.engine import cluster
from dlcli.engine.progress import Reporter
from dlcli.errors import UsageError
from dlcli.runs.run import DEFAULT_ROOT, Run
from dlcli.tasks import TASK_NAMES, all_views, get_task

__all__ = ["train", "evaluate", "predict", "export", "visualize", "train_config", "open_run", "view_task"]


class _Discard:
    """A file that forgets what is written to it: the console of a silent reporter."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def silent_reporter() -> Reporter:
    """The reporter of a call that was given none: it shows nothing."""
    from rich.console import Console

    return Reporter(Console(file=_Discard(), highlight=False), quiet=True, live=False)


def _root(runs_dir: str | Path | None) -> Path:
    return Path(runs_dir) if runs_dir is not None else DEFAULT_ROOT


# -- which run -----------------------------------------------------------------------


def open_run(task: str, *, run: str | Run | None = None, runs_dir: str | Path | None = None,
             checkpoint: str | Path | None = None) -> Run:
    """The run whose model evaluate, predict, export and visualize use: a `Run` as given, the
    folder of `checkpoint` (a model file), the run named `run`, else the task's newest finished run."""
    get_task(task)
    if isinstance(run, Run):
        chosen = run
    elif checkpoint is not None:
        checkpoint = Path(checkpoint)
        if not checkpoint.exists():
            raise UsageError(f"checkpoint {checkpoint} does not exist")
        chosen = Run(task, checkpoint.resolve().parent)
    else:
        chosen = Run.find(_root(runs_dir), task, run)
    _check_run_task(task, chosen, chosen.config)
    return chosen


def _check_run_task(task: str, run: Run, saved: dict) -> None:
    """Refuse a run (or a checkpoint) of another task by name, not by its first odd config key."""
    owner = run.dir.parent.name if run.dir.parent.name in TASK_NAMES else None
    keys = set(config_lib.flat_keys(saved))
    if keys and not keys <= set(config_lib.flat_keys(get_task(task).defaults)):
        owner = next((n for n in TASK_NAMES if keys <= set(config_lib.flat_keys(get_task(n).defaults))), owner)
    elif owner is not None and keys:
        owner = None  # the config fits this task: trust it over the folder's name
    if owner is not None and owner != task:
        raise UsageError(f"{run.dir} holds a {owner} model, not a {task} model; "
                         f"give {owner} as the task, or a {task} run")


def run_to_resume(root: Path, task: str, run_name: str | None) -> Run:
    """The named run, else the newest unfinished one; a clear error where there is none."""
    if run_name:
        return Run.find(root, task, run_name, finished=False)
    runs = Run.all(root, task)
    unfinished = [r for r in runs if not r.finished]
    if unfinished:
        return unfinished[-1]
    if runs:
        raise UsageError(
            f"nothing to resume: every run of task {task} in {Path(root) / task} has finished "
            f"(the newest: {runs[-1].name}); train a new run without resume, or continue a finished "
            f"one for more epochs with --run NAME --resume --epochs N"
        )
    return Run.find(root, task, None, finished=False)  # its error: no run of the task


def _remove_empty_parents(run_dir: Path, root: Path) -> None:
    """After a failed new run: remove RUNS_DIR/TASK/ (and the default runs folder) if left empty."""
    for folder in (run_dir.parent, Path(root)) if Path(root) == DEFAULT_ROOT else (run_dir.parent,):
        try:
            folder.rmdir()  # only ever removes an empty directory
        except OSError:
            break


def _run_config(task: str, run: Run, overrides: Mapping[str, Any]) -> dict:
    """A trained run's config with the call's overrides (eval's --dataset, predict's --seed)."""
    spec = get_task(task)
    base = config_lib.check_saved(spec.defaults, run.config, spec.choices, run.config_path)
    return config_lib.resolve(spec.defaults, base=base, flags=overrides, choices=spec.choices)


# -- train ---------------------------------------------------------------------------


def train_config(task: str, *, config: str | Path | Mapping | None = None, runs_dir: str | Path | None = None,
                 run: str | None = None, resume: bool = False, sets: Iterable[str] = (), **overrides) -> dict:
    """The configuration `train` would use, resolved and checked, without training.

    Precedence: the task's defaults < `config` (a YAML file, or a dict of keys) < `sets`
    (`"KEY=VALUE"` strings, dotted keys allowed) < `overrides` (top-level keys as keywords).
    On `resume`, the run's saved config stands in for `config`.
    """
    return _train_config(get_task(task), config, _root(runs_dir), run, resume, sets, overrides)[0]


def _train_config(spec: TaskSpec, config, root: Path, run_name: str | None, resume: bool, sets, overrides):
    """(config, the run to resume or None)."""
    run = run_to_resume(root, spec.name, run_name) if resume else None
    sets = list(sets or [])
    if run is not None and (run.config_path.exists() or run.latest_backup() is not None):
        if config:
            raise UsageError("--config cannot change a run being resumed; use --set or flags")
        base = config_lib.check_saved(spec.defaults, run.read_config(), spec.choices, run.config_path)
        cfg = config_lib.resolve(spec.defaults, sets=sets, flags=overrides, choices=spec.choices, base=base)
    else:  # a new run, or one stopped before its config was saved (nothing trained yet: start it afresh)
        cfg = config_lib.resolve(spec.defaults, config, sets, overrides, spec.choices)
    return cfg, run


def train(task: str, *, config: str | Path | Mapping | None = None, runs_dir: str | Path | None = None,
          run: str | None = None, resume: bool = False, sets: Iterable[str] = (), reporter: Reporter | None = None,
          **overrides) -> Run:
    """Train a task's model into a run folder (RUNS_DIR/TASK/RUN/) and return the finished `Run`.

    `run` names the new run (default: a time stamp); with `resume`, the run to continue
    (default: the newest unfinished one). The config's layers are those of `train_config`.
    A new run that fails before its first checkpoint is removed; one that has checkpoints
    stays, for `resume`.

    Example:
        >>> run = train("linear", epochs=2, runs_dir="runs", run="first")
        >>> run.path, round(run.metrics["val_accuracy"], 2)
        (PosixPath('runs/linear/first'), 0.92)
    """
    spec = get_task(task)
    root = _root(runs_dir)
    reporter = reporter or silent_reporter()
    cluster.check_worker_sees_chief(root, task, run, resume)
    cfg, existing = _train_config(spec, config, root, run, resume, sets, overrides)
    data_lib.check_dataset(task, cfg["dataset"], spec.data)  # before TensorFlow loads and before the run is made
    # Before any other TensorFlow work. A worker other than the chief writes a private run,
    # deleted at the end; on resume it loads the chief's checkpoints.
    strategy, chief_run, worker_run = cluster.start(cfg, root, task, run, reporter.info)
    target = worker_run or existing
    new_run = target is None
    target = target or Run.create(root, task, run)
    target.lock()
    try:
        target.write_config(cfg)
        reporter.info(f"training [bold]{task}[/] -> {target.dir}")
        if strategy is not None:
            reporter.info(f"strategy {cfg['strategy']}: {strategy.num_replicas_in_sync} replicas in sync")
        reporter.status("loading the data and building the model")  # until the first epoch's bars
        context = Context(cfg=cfg, run=target, reporter=reporter, resume=resume, strategy=strategy,
                          resume_from=chief_run)
        metrics = spec.train(context)
        target.write_metrics(metrics)
    except BaseException:
        reporter.finish()  # the spinner or the bars, before the error line
        if new_run and target.latest_backup() is None:
            shutil.rmtree(target.dir, ignore_errors=True)  # nothing to resume: leave no half-made run
            _remove_empty_parents(target.dir, root)
        raise
    finally:
        target.unlock()
    if chief_run is not None:
        shutil.rmtree(target.dir, ignore_errors=True)
        target = chief_run
    target.metrics = metrics  # what this process trained (on a worker, the chief writes its own file)
    return target


# -- evaluate, predict, export, visualize ---------------------------------------------------


def evaluate(task: str, *, run: str | Run | None = None, runs_dir: str | Path | None = None,
             dataset: str | None = None, data_dir: str | None = None, batch_size: int | None = None,
             checkpoint: str | Path | None = None, reporter: Reporter | None = None) -> dict:
    """A trained run's metrics on its task's test data, or on `dataset` (all of it, or its test split)."""
    spec = get_task(task)
    if dataset:
        data_lib.check_dataset(task, dataset, spec.data, training=False)
    chosen = open_run(task, run=run, runs_dir=runs_dir, checkpoint=checkpoint)
    cfg = _run_config(task, chosen, {"dataset": dataset, "data_dir": data_dir, "batch_size": batch_size})
    reporter = reporter or silent_reporter()
    reporter.status(f"evaluating {task} / {chosen.name}: loading the model and the data")
    try:
        return spec.evaluate(Context(cfg=cfg, run=chosen, reporter=reporter,
                                     checkpoint=Path(checkpoint) if checkpoint else None))
    finally:
        reporter.finish()


def predict(task: str, inputs: Iterable[str] = (), *, run: str | Run | None = None, runs_dir: str | Path | None = None,
            checkpoint: str | Path | None = None, seed: int | None = None, engine: str = "auto",
            out: str | Path | None = None, reporter: Reporter | None = None, **options) -> Iterator[dict]:
    """The task's model on new inputs: one dict per input, as `dlcli predict --jsonl` prints them.

    `inputs` are what the task reads: files, folders (searched for the task's file types),
    glob patterns and `-` (paths on stdin) for tasks that read files; points (`"0.5,-1.2"`)
    for linear; nothing for tasks that sample (names, gan). A file that cannot be read is a
    row with an `error` key, and the others are still predicted. `options` are the task's
    predict options (`top_k=3`); `engine` is auto, keras or lite. Rows stream where the task
    streams: a caller that stops early stops the work.
    """
    spec = get_task(task)
    context = predict_context(task, run=run, runs_dir=runs_dir, checkpoint=checkpoint, seed=seed, engine=engine,
                              out=out, reporter=reporter, **options)
    inputs = [str(i) for i in inputs]
    if spec.inputs is None or not inputs:
        return iter(spec.predict(context, inputs))
    from dlcli.inference import inputs as inputs_lib

    items = inputs_lib.expand(inputs, spec.inputs.suffixes)
    if spec.predict_stream is not None:
        return iter(spec.predict_stream(context, items))
    return _predict_paths(spec, context, items)


def predict_context(task: str, *, run: str | Run | None = None, runs_dir: str | Path | None = None,
                    checkpoint: str | Path | None = None, seed: int | None = None, engine: str = "auto",
                    out: str | Path | None = None, reporter: Reporter | None = None, **options) -> Context:
    """The context `predict` hands the task: the run chosen, its config, the predict options
    checked (`task_options`) and the engine. A server builds it once per set of options and
    reuses it (with the task's `predictor`) for every request."""
    spec = get_task(task)
    chosen_options = task_options(options, spec.predict_options, f"predict {task}")
    from dlcli.inference.lite import ENGINES

    if engine not in ENGINES:
        raise UsageError(f"--engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    chosen_options["engine"] = engine  # read by `dlcli.inference.lite.model_for`
    chosen = open_run(task, run=run, runs_dir=runs_dir, checkpoint=checkpoint)
    cfg = _run_config(task, chosen, {"seed": seed})
    return Context(cfg=cfg, run=chosen, reporter=reporter or silent_reporter(), options=chosen_options,
                   checkpoint=Path(checkpoint) if checkpoint else None, out=Path(out) if out else None)


def _predict_paths(spec: TaskSpec, context: Context, items) -> Iterator[dict]:
    paths, errors = [], []
    for item in items:
        (errors if isinstance(item, dict) else paths).append(item)
    yield from spec.predict(context, paths) if paths else []
    yield from errors


def task_options(given: Mapping[str, Any], spec: Mapping[str, Option], where: str) -> dict:
    """A task's options (predict's, a view's) from Python keywords: defaults filled in, names
    and types checked."""
    values = {name: option.default for name, option in spec.items()}
    for name, value in given.items():
        if name not in spec:
            valid = ", ".join(spec) or "none"
            raise UsageError(f"unknown option {name!r} for {where}; its options: {valid}")
        option = spec[name]
        if value is None and option.default is None:  # not given (an option without a default value)
            continue
        items = value if option.nargs > 1 else [value]
        if option.nargs > 1 and (not isinstance(value, (list, tuple)) or len(value) != option.nargs):
            raise UsageError(f"option {name!r} of {where} takes {option.nargs} values")
        if not all(_of_type(v, option.type) for v in items):
            raise UsageError(f"option {name!r} of {where} must be {option.type.__name__}; got {value!r}")
        values[name] = list(value) if option.nargs > 1 else (float(value) if option.type is float else value)
    return values


def _of_type(value: Any, kind: type) -> bool:
    """Whether a Python value fits an option's type: a bool is not an int; an int is a float."""
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def export(task: str, *, run: str | Run | None = None, runs_dir: str | Path | None = None,
           checkpoint: str | Path | None = None, format: str = "tflite", out: str | Path | None = None,
           reporter: Reporter | None = None) -> Path:
    """Export a run's model (`format`: tflite, what predict runs without TensorFlow, or
    savedmodel) with its class names and preprocessing beside it; returns the model's path
    (of a task that exports several parts, the first part's; export.json lists them all).
    A current RUN/export/model.tflite makes `predict` start fast."""
    from dlcli.inference import export as export_lib

    spec = get_task(task)
    export_lib.exportable(spec)
    if format not in export_lib.FORMATS:
        raise UsageError(f"--format must be one of {', '.join(export_lib.FORMATS)}; got {format!r}")
    chosen = open_run(task, run=run, runs_dir=runs_dir, checkpoint=checkpoint)
    cfg = _run_config(task, chosen, {})
    reporter = reporter or silent_reporter()
    context = Context(cfg=cfg, run=chosen, reporter=reporter, checkpoint=Path(checkpoint) if checkpoint else None)
    classes = spec.export.classes(context) if spec.export.classes is not None else None
    reporter.status(f"exporting {task} / {chosen.name} as {format}")
    try:
        meta = export_lib.export(spec, chosen, context.model_path, format, Path(out) if out else None, classes,
                                 context)
    finally:
        reporter.finish()
    folder = Path(out) if out is not None else chosen.file("export")
    return folder / meta["file"]


def visualize(view: str, *, task: str | None = None, run: str | Run | None = None, runs_dir: str | Path | None = None,
              checkpoint: str | Path | None = None, dataset: str | None = None, data_dir: str | None = None,
              seed: int | None = None, out: str | Path | None = None, reporter: Reporter | None = None,
              **options) -> Path:
    """Draw a view (a picture of a trained run: `mnist-confusion`, `training-curves`) and
    return the PNG's path: `out`, else RUN/views/VIEW.png. `task` picks the run of a view of
    any task (default: the task trained last); `options` are the view's own (`n=16`)."""
    task = view_task(view, task=task, runs_dir=runs_dir)
    spec = all_views()[view][1]
    chosen_options = task_options(options, spec.options, f"view {view}")
    if out is not None and Path(out).suffix.lower() != ".png":
        raise UsageError(f"--out {out}: views are PNG files; give a path ending in .png")
    chosen = open_run(task, run=run, runs_dir=runs_dir, checkpoint=checkpoint)
    cfg = _run_config(task, chosen, {"dataset": dataset, "data_dir": data_dir, "seed": seed})
    return spec.draw(Context(cfg=cfg, run=chosen, reporter=reporter or silent_reporter(), options=chosen_options,
                             checkpoint=Path(checkpoint) if checkpoint else None, out=Path(out) if out else None))


def view_task(view: str, *, task: str | None = None, runs_dir: str | Path | None = None) -> str:
    """The task whose run a view draws: the view's own task, else `task`, else the task that
    finished a run last (for views of any task, such as training-curves)."""
    views = all_views()
    if view not in views:
        raise UsageError(f"unknown view {view!r}; valid views: {', '.join(views)}")
    owner = views[view][0]
    if owner and task and task != owner:
        raise UsageError(f"view {view} belongs to task {owner}, not {task}")
    return owner or task or _newest_task(_root(runs_dir))


def _newest_task(root: Path) -> str:
    finished = [r for name in TASK_NAMES for r in Run.all(root, name) if r.finished]
    if not finished:
        raise UsageError(f"no finished run in {root}; train one first, or pass --task")
    return max(finished, key=lambda r: r.metrics_path.stat().st_mtime).task
