"""The `dlcli` command line: train, eval, predict and visualize every task.

This module imports no TensorFlow: help and `dlcli tasks` answer at once, and the
task modules pull in TensorFlow only when a command does real work.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.padding import Padding
from rich.panel import Panel
from rich.table import Table
from typer.core import TyperCommand, TyperGroup
from typing_extensions import Annotated

try:  # Typer >= 0.22 carries its own copy of Click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException, NoArgsIsHelpError

from dlcli import __version__, cluster, config as config_lib, data as data_lib
from dlcli.errors import DlcliError, UsageError
from dlcli.interrupts import stop_by_exception
from dlcli.keyhelp import key_help
from dlcli.lazy import quiet_tensorflow
from dlcli.progress import Reporter
from dlcli.runs import DEFAULT_ROOT, Run
from dlcli.tasks import TASK_NAMES, Context, Option, all_views, get_task

quiet_tensorflow()

ERR = Console(stderr=True, highlight=False)


class OneLineErrors(TyperGroup):
    """Click's usage errors (`--epochs abc`, a missing argument) as one line, like dlcli's own."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError as exc:  # `dlcli` alone: the help was printed
            sys.exit(exc.exit_code)
        except ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            message = " ".join(exc.format_message().split())
            ERR.print(f"[red]error:[/] {escape(message)}{hint}", markup=True, highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            ERR.print("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    def format_help(self, ctx, formatter):
        _hide_flag_types(self, ctx)
        super().format_help(ctx, formatter)


def _hide_flag_types(command, ctx) -> None:
    for param in command.get_params(ctx):
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""  # a flag takes no value: no `<bool>` beside it in --help


def _first_known(args: list[str], known) -> str | None:
    return next((a for a in args if a in known), None)


class TaskHelp(TyperCommand):
    """A command whose `--help` also lists the options of the task or view named before it.

    `dlcli predict names --help` shows names' --n, --prefix, --temperature; `dlcli train
    mnist --help` the config keys usable as flags; `dlcli visualize mnist-errors --help` --n.
    """

    def parse_args(self, ctx, args):
        ctx.meta["dlcli.help_args"] = list(args)  # --help is eager: the task argument is not parsed yet
        # Click drops `--`; what followed it are inputs even where they look like options (--x.png).
        ctx.meta["dlcli.after_dashes"] = list(args[args.index("--") + 1:]) if "--" in args else []
        return super().parse_args(ctx, args)

    def format_help(self, ctx, formatter):
        _hide_flag_types(self, ctx)
        super().format_help(ctx, formatter)
        title, rows = _help_extra(ctx.info_name, ctx.meta.get("dlcli.help_args", []))
        if rows:
            table = Table.grid(padding=(0, 2))
            for row in rows:
                table.add_row(*row)
            Console(highlight=False).print(Panel(table, title=title, title_align="left", border_style="dim"))


def _help_extra(command: str, args: list[str]) -> tuple[str, list[tuple[str, str]]]:
    """The extra panel of `--help` for a command given a task (or view) name."""
    if command == "visualize":
        views = all_views()
        name = _first_known(args, views)
        if name is None:
            return "", []
        options = views[name][1].options
        return f"Options of view {name}", [(_flag(k), _option_help(o)) for k, o in options.items()]
    name = _first_known(args, TASK_NAMES)
    if name is None:
        return "", []
    task = get_task(name)
    if command == "predict":
        return f"Options of task {name}", [(_flag(k), _option_help(o)) for k, o in task.predict_options.items()]
    if command == "train":
        rows = []
        for key, default in task.defaults.items():
            if isinstance(default, dict) or key in ("dataset", "data_dir", "epochs", "batch_size", "lr", "seed"):
                continue
            allowed = task.choices.get(key) or config_lib.COMMON_CHOICES.get(key)
            shown = f"one of {', '.join(map(str, allowed))}" if allowed else f"default {_shown_default(default)}"
            rows.append((_flag(key), f"{key_help(name, key)} [dim]({escape(shown)})[/]"))
        return f"Config keys of task {name} (also --set KEY=VALUE)", rows
    return "", []


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _shown_default(value: Any) -> str:
    if value is None or value == "":
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _option_help(option: Option) -> str:
    default = "" if option.type is bool and option.default is False else f" [dim](default {escape(_shown_default(option.default))})[/]"
    return escape(option.help) + default


# -- shell completion -----------------------------------------------------------------


def complete_task(incomplete: str) -> list[str]:
    return [name for name in TASK_NAMES if name.startswith(incomplete)]


def complete_view(incomplete: str) -> list[str]:
    return [name for name in all_views() if name.startswith(incomplete)]


def complete_set(ctx: typer.Context, incomplete: str) -> list[str]:
    """`--set KEY=` for every config key of the task on the line (all tasks' keys without one)."""
    task_name = ctx.params.get("task_name") or _first_known(ctx.args, TASK_NAMES)  # completion parses leniently
    names = [task_name] if task_name in TASK_NAMES else list(TASK_NAMES)
    keys = dict.fromkeys(k for n in names for k in config_lib.flat_keys(get_task(n).defaults))
    return [f"{k}=" for k in keys if f"{k}=".startswith(incomplete)]


app = typer.Typer(
    name="dlcli",
    help="Train, evaluate and use the deep-learning course's models from the shell.\n\n"
    "Tasks: " + ", ".join(TASK_NAMES) + ". Run `dlcli tasks` to see them with their views.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    cls=OneLineErrors,
)

EXTRA_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}

# -- options shared by the commands ----------------------------------------------------

TaskArg = Annotated[
    str,
    typer.Argument(help="Task: " + ", ".join(TASK_NAMES) + ".", show_default=False, metavar="TASK",
                   autocompletion=complete_task),
]
EpochsOpt = Annotated[Optional[int], typer.Option("--epochs", help="Training epochs.", show_default=False)]
BatchOpt = Annotated[Optional[int], typer.Option("--batch-size", help="Examples per batch.", show_default=False)]
LrOpt = Annotated[Optional[float], typer.Option("--lr", help="Learning rate.", show_default=False)]
SeedOpt = Annotated[
    Optional[int], typer.Option("--seed", help="Random seed: the same seed gives the same run, to the last digit.", show_default=False)
]
SampleSeedOpt = Annotated[
    Optional[int],
    typer.Option("--seed", help="Random seed of tasks that sample (names, gan): the same seed gives the same output.", show_default=False),
]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="YAML file of config keys.", show_default=False)]
SET_EXAMPLE = "epochs=5"
SetOpt = Annotated[
    Optional[List[str]],
    typer.Option(
        "--set", metavar="KEY=VALUE", autocompletion=complete_set, show_default=False,
        help=f"Set a config key: --set {SET_EXAMPLE} (repeatable; `dlcli tasks TASK` lists the keys).",
    ),
]
DatasetOpt = Annotated[
    Optional[str],
    typer.Option(
        "--dataset",
        help="Data: a tensorflow-datasets NAME, folder:PATH, npz:PATH, text:PATH or captions:DIR "
        "(which ones a task takes: `dlcli tasks TASK`).",
        show_default=False,
    ),
]
DataDirOpt = Annotated[
    Optional[str], typer.Option("--data-dir", help="tensorflow-datasets data directory (or TFDS_DATA_DIR).", show_default=False)
]
TrainRunOpt = Annotated[
    Optional[str],
    typer.Option("--run", help="Name of the new run (default: a time stamp); with --resume, the run to continue "
                 "(default: the newest unfinished one).", show_default=False),
]
RunOpt = Annotated[
    Optional[str], typer.Option("--run", help="Run to use (default: the task's newest finished run).", show_default=False)
]
RootOpt = Annotated[Path, typer.Option("--checkpoint-dir", help="Where runs live.")]
CheckpointOpt = Annotated[
    Optional[Path], typer.Option("--checkpoint", help="Use this model file instead of a run's.", show_default=False)
]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its last checkpoint.", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout; all else goes to stderr.", show_default=False)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors (and --json output).", show_default=False)]
OutOpt = Annotated[Optional[Path], typer.Option("--out", help="Where to write the output.", show_default=False)]


def _reporter(json_mode: bool, quiet: bool) -> Reporter:
    console = Console(stderr=json_mode, highlight=False)
    return Reporter(console, quiet=quiet)


def _human(value: Any) -> str:
    """One format for numbers in human output: 4 decimals (0.9965, 0.0000), 4 digits when large."""
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value)


def _emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def handle_errors(command):
    """Turn every failure into one line on stderr and the right exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except DlcliError as exc:
            ERR.print(f"[red]error:[/] {exc}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code)
        except KeyboardInterrupt as exc:
            what = "stopped by SIGTERM" if getattr(exc, "exit_code", 130) == 143 else "interrupted"
            ERR.print(f"{what}; `--resume` continues a training run from its last checkpoint")
            raise typer.Exit(getattr(exc, "exit_code", 130))
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as exc:  # the last resort: still one line, never a traceback
            if os.environ.get("DLCLI_DEBUG"):
                raise
            if isinstance(exc, OSError) and exc.strerror:  # a read-only or full disk, a missing folder
                where = f"{exc.filename}: " if exc.filename else ""
                ERR.print(f"[red]error:[/] {where}{exc.strerror}", markup=True, highlight=False, soft_wrap=True)
                raise typer.Exit(1)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            ERR.print(
                f"[red]error:[/] {type(exc).__name__}: {first} (set DLCLI_DEBUG=1 for the traceback)",
                markup=True, highlight=False, soft_wrap=True,
            )
            raise typer.Exit(1)

    return wrapper


def parse_task_options(tokens: list[str], spec: dict[str, Option], where: str) -> tuple[dict, list[str]]:
    """Split leftover tokens into task options (`--top-k 5`) and positional inputs."""
    values = {name: opt.default for name, opt in spec.items()}
    inputs: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token == "--":  # the end of the options: the rest are inputs, whatever they look like
            inputs.extend(tokens[i + 1:])
            break
        if not token.startswith("--"):
            inputs.append(token)
            i += 1
            continue
        name, eq, inline = token[2:].partition("=")
        key = name.replace("-", "_")
        negated = key.startswith("no_") and key[3:] in spec and spec[key[3:]].type is bool
        if key not in spec and not negated:
            valid = ", ".join("--" + k.replace("_", "-") for k in spec) or "none"
            raise UsageError(f"unknown option --{name} for {where}; its options: {valid}")
        if negated:
            values[key[3:]] = False
            i += 1
            continue
        opt = spec[key]
        if opt.type is bool and not eq:
            values[key] = True
            i += 1
            continue
        raw = [inline] if eq else tokens[i + 1 : i + 1 + opt.nargs]
        if len(raw) < opt.nargs or any(r.startswith("--") for r in raw if not eq):
            raise UsageError(f"--{name} needs {opt.nargs} value(s)")
        converted = [_convert(r, opt.type, name) for r in raw]
        values[key] = converted[0] if opt.nargs == 1 else converted
        i += 1 + (0 if eq else opt.nargs)
    return values, inputs


def _convert(raw: str, kind: type, name: str) -> Any:
    if kind is bool:
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise UsageError(f"--{name} must be true or false; got {raw!r}")
    try:
        return kind(raw)
    except ValueError:
        raise UsageError(f"--{name} must be {'an integer' if kind is int else 'a number' if kind is float else kind.__name__}; got {raw!r}") from None


def _config_flags(tokens: list[str], defaults: dict, task: str) -> dict:
    """Top-level config keys given as flags on `train`: `--model cnn` means model=cnn."""
    spec = {k: Option(str, None, "") for k, v in defaults.items() if not isinstance(v, dict)}
    values, inputs = parse_task_options(tokens, spec, f"`dlcli train {task}` (or use --set KEY=VALUE)")
    if inputs:
        raise UsageError(f"unexpected argument {inputs[0]!r}")
    return {k: config_lib.parse_set(f"{k}={v}")[1] for k, v in values.items() if v is not None}


def _open_run(task: str, root: Path, run_name: str | None, checkpoint: Path | None) -> Run:
    """The run whose model eval/predict/visualize use."""
    if checkpoint is not None:
        if not checkpoint.exists():
            raise UsageError(f"checkpoint {checkpoint} does not exist")
        return Run(task, checkpoint.resolve().parent)
    return Run.find(root, task, run_name)


def _check_run_task(task_name: str, run: Run, saved: dict) -> None:
    """Refuse a run (or --checkpoint) of another task by name, not by its first odd config key."""
    owner = run.dir.parent.name if run.dir.parent.name in TASK_NAMES else None
    keys = set(config_lib.flat_keys(saved))
    if keys and not keys <= set(config_lib.flat_keys(get_task(task_name).defaults)):
        owner = next((n for n in TASK_NAMES if keys <= set(config_lib.flat_keys(get_task(n).defaults))), owner)
    elif owner is not None and keys:
        owner = None  # the config fits this task: trust it over the folder's name
    if owner is not None and owner != task_name:
        raise UsageError(f"{run.dir} holds a {owner} model, not a {task_name} model; "
                         f"give {owner} as the task, or a {task_name} run")


def _run_to_resume(root: Path, task_name: str, run_name: str | None) -> Run:
    """The named run, else the newest unfinished one; a clear error where there is none."""
    if run_name:
        return Run.find(root, task_name, run_name, finished=False)
    runs = Run.all(root, task_name)
    unfinished = [r for r in runs if not r.finished]
    if unfinished:
        return unfinished[-1]
    if runs:
        raise UsageError(
            f"nothing to resume: every run of task {task_name} in {Path(root) / task_name} has finished "
            f"(the newest: {runs[-1].name}); train a new run without --resume, or continue a finished "
            f"one for more epochs with --run NAME --resume --epochs N"
        )
    return Run.find(root, task_name, None, finished=False)  # its error: no run of the task


def _remove_empty_parents(run_dir: Path, root: Path) -> None:
    """After a failed new run: remove checkpoints/TASK/ (and the default checkpoints/) if left empty."""
    for folder in (run_dir.parent, Path(root)) if Path(root) == DEFAULT_ROOT else (run_dir.parent,):
        try:
            folder.rmdir()  # only ever removes an empty directory
        except OSError:
            break


def _run_config(task_name: str, run: Run, overrides: dict) -> dict:
    task = get_task(task_name)
    base = run.read_config() if run.config_path.exists() else {}
    _check_run_task(task_name, run, base)
    return config_lib.resolve(task.defaults, base=base, flags=overrides, choices=task.choices)


# -- commands -------------------------------------------------------------------------


@app.command("tasks", cls=TaskHelp)
@handle_errors
def tasks_command(
    task_name: Annotated[
        Optional[str],
        typer.Argument(help="Show this task's config keys, predict options and views.", show_default=False,
                       metavar="TASK", autocompletion=complete_task),
    ] = None,
    root: RootOpt = DEFAULT_ROOT,
    json_mode: JsonOpt = False,
) -> None:
    """List every task with its default data set, its views and its newest trained run."""
    if task_name:
        _describe_task(task_name, json_mode)
        return
    rows = []
    for name in TASK_NAMES:
        task = get_task(name)
        finished = [r for r in Run.all(root, name) if r.finished]
        rows.append(
            {
                "task": name,
                "summary": task.summary,
                "dataset": task.default_dataset,
                "views": list(task.views),
                "trained": finished[-1].name if finished else None,
            }
        )
    if json_mode:
        _emit_json({"tasks": rows, "views_for_any_task": ["training-curves"]})
        return
    table = Table(title="dlcli tasks", header_style="bold")
    for column in ("task", "what it does", "default data", "views", "trained"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["task"], row["summary"], row["dataset"], ", ".join(row["views"]),
            row["trained"] or "[dim]no[/]",
        )
    console = Console()
    console.print(table)
    console.print("Any task's run also has the view [bold]training-curves[/]. "
                  "`dlcli tasks TASK` shows a task's config keys and options.")


def _describe_task(task_name: str, json_mode: bool) -> None:
    """One task's config keys with defaults and allowed values, predict options and views."""
    task = get_task(task_name)

    def option_rows(options: dict) -> list[dict]:
        return [{"option": "--" + k.replace("_", "-"), "default": o.default, "help": o.help} for k, o in options.items()]

    flat = config_lib._flatten(task.defaults)
    allowed = {k: task.choices.get(k) or config_lib.COMMON_CHOICES.get(k) for k in flat}
    info = {
        "task": task_name,
        "summary": task.summary,
        "config": task.defaults,
        "choices": task.choices,
        "keys": {k: {"default": v, "allowed": allowed[k], "help": key_help(task_name, k)} for k, v in flat.items()},
        "predict_options": option_rows(task.predict_options),
        "views": {name: {"help": v.help, "options": option_rows(v.options)} for name, v in task.views.items()},
    }
    if json_mode:
        _emit_json(info)
        return
    console = Console(highlight=False)
    console.print(f"[bold]{task_name}[/]: {escape(task.summary)}\n")
    keys = Table(title="config keys (`--set KEY=VALUE`; top-level keys also as `--KEY VALUE`)", title_justify="left",
                 header_style="bold", box=None, padding=(0, 1))
    keys.add_column("key", no_wrap=True)
    keys.add_column("default", no_wrap=True)
    keys.add_column("meaning (and allowed values)")
    for key, row in info["keys"].items():
        meaning = escape(row["help"])
        if row["allowed"]:
            meaning += "\n[italic]allowed:[/] " + escape(", ".join(map(str, row["allowed"])))
        keys.add_row(escape(key), escape(_shown_default(row["default"])), meaning)
    console.print(keys)

    def options_table(title: str, rows: list[dict]):
        table = Table(title=title, title_justify="left", header_style="bold", box=None, padding=(0, 1))
        for column in ("option", "default", "meaning"):
            table.add_column(column, no_wrap=column != "meaning")
        for row in rows:
            table.add_row(row["option"], escape(_shown_default(row["default"])), escape(row["help"]))
        return table

    if task.predict_options:
        console.print()
        console.print(options_table(f"`dlcli predict {task_name}` options", info["predict_options"]))
    console.print("\n[bold]views[/] (`dlcli visualize VIEW`):")
    for name, view in task.views.items():
        console.print(f"  {name}: {escape(view.help)}")
        if view.options:
            table = options_table("", option_rows(view.options))
            console.print(Padding(table, (0, 0, 0, 4)))


@app.command("train", context_settings=EXTRA_ARGS, cls=TaskHelp)
@handle_errors
def train_command(
    ctx: typer.Context,
    task_name: TaskArg,
    epochs: EpochsOpt = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    seed: SeedOpt = None,
    config_file: ConfigOpt = None,
    sets: SetOpt = None,
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    run_name: TrainRunOpt = None,
    root: RootOpt = DEFAULT_ROOT,
    resume: ResumeOpt = False,
    print_config: Annotated[bool, typer.Option("--print-config", help="Print the resolved config as YAML and exit.", show_default=False)] = False,
    json_mode: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a task's model and save the run under checkpoints/TASK/RUN/.

    Config precedence: task defaults < --config FILE < --set KEY=VALUE < flags. Any
    top-level config key is also a flag: `dlcli train mnist --model cnn`; `dlcli tasks TASK`
    lists a task's keys.
    """
    task = get_task(task_name)
    flags = {
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
        "dataset": dataset, "data_dir": data_dir,
    }
    flags.update(_config_flags(list(ctx.args), task.defaults, task_name))
    run = None
    cluster.check_worker_sees_chief(root, task_name, run_name, resume)
    if resume:
        run = _run_to_resume(root, task_name, run_name)
    if run is not None and (run.config_path.exists() or run.latest_backup() is not None):
        if config_file:
            raise UsageError("--config cannot change a run being resumed; use --set or flags")
        cfg = config_lib.resolve(task.defaults, sets=sets or [], flags=flags, choices=task.choices, base=run.read_config())
    else:  # a new run, or one stopped before its config was saved (nothing trained yet: start it afresh)
        cfg = config_lib.resolve(task.defaults, config_file, sets or [], flags, task.choices)
    if print_config:
        sys.stdout.write(config_lib.to_yaml(cfg))
        return
    data_lib.check_dataset(task_name, cfg["dataset"], task.data)  # before TensorFlow loads and before the run is made
    reporter = _reporter(json_mode, quiet)
    # Before any other TensorFlow work. A worker other than the chief writes a private run,
    # deleted at the end; on --resume it loads the chief's checkpoints.
    strategy, chief_run, worker_run = cluster.start(cfg, root, task_name, run_name, reporter.info)
    run = worker_run or run
    new_run = run is None
    run = run or Run.create(root, task_name, run_name)
    run.lock()
    try:
        run.write_config(cfg)
        reporter.info(f"training [bold]{task_name}[/] -> {run.dir}")
        if strategy is not None:
            reporter.info(f"strategy {cfg['strategy']}: {strategy.num_replicas_in_sync} replicas in sync")
        reporter.status("loading the data and building the model")  # until the first epoch's bars
        context = Context(cfg=cfg, run=run, reporter=reporter, resume=resume, strategy=strategy, resume_from=chief_run)
        metrics = task.train(context)
        run.write_metrics(metrics)
    except BaseException:
        reporter.finish()  # the spinner or the bars, before the error line
        if new_run and run.latest_backup() is None:
            shutil.rmtree(run.dir, ignore_errors=True)  # nothing to resume: leave no half-made run
            _remove_empty_parents(run.dir, root)
        raise
    finally:
        run.unlock()
        if chief_run is not None:
            shutil.rmtree(run.dir, ignore_errors=True)
            run = chief_run
    reporter.table(f"{task_name} / {run.name}", metrics)
    if json_mode:
        _emit_json({"task": task_name, "run": str(run.dir), "config": cfg, "metrics": metrics})


@app.command("eval", cls=TaskHelp)
@handle_errors
def eval_command(
    task_name: TaskArg,
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    batch_size: BatchOpt = None,
    run_name: RunOpt = None,
    checkpoint: CheckpointOpt = None,
    root: RootOpt = DEFAULT_ROOT,
    json_mode: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Evaluate a trained run on its task's test data (the newest finished run by default)."""
    task = get_task(task_name)
    if dataset:
        data_lib.check_dataset(task_name, dataset, task.data, training=False)
    run = _open_run(task_name, root, run_name, checkpoint)
    cfg = _run_config(task_name, run, {"dataset": dataset, "data_dir": data_dir, "batch_size": batch_size})
    reporter = _reporter(json_mode, quiet)
    reporter.status(f"evaluating {task_name} / {run.name}: loading the model and the data")
    try:
        metrics = task.evaluate(Context(cfg=cfg, run=run, reporter=reporter, checkpoint=checkpoint))
    finally:
        reporter.finish()
    reporter.table(f"{task_name} / {run.name}: evaluation", metrics)
    if json_mode:
        _emit_json({"task": task_name, "run": str(run.dir), "metrics": metrics})


@app.command("predict", context_settings=EXTRA_ARGS, cls=TaskHelp)
@handle_errors
def predict_command(
    ctx: typer.Context,
    task_name: TaskArg,
    inputs: Annotated[
        Optional[List[str]],
        typer.Argument(help="Input files (images for image tasks), and the task's options.", show_default=False, metavar="INPUTS"),
    ] = None,
    run_name: RunOpt = None,
    checkpoint: CheckpointOpt = None,
    root: RootOpt = DEFAULT_ROOT,
    seed: SampleSeedOpt = None,
    out: OutOpt = None,
    json_mode: JsonOpt = False,
    jsonl: Annotated[bool, typer.Option("--jsonl", help="Print one JSON object per input, as soon as its batch is done.", show_default=False)] = False,
    engine: Annotated[str, typer.Option("--engine", help="auto: the run's exported .tflite where it is current and the model computes in float32 (no TensorFlow), else Keras; keras; lite.")] = "auto",
    quiet: QuietOpt = False,
) -> None:
    """Use a trained model on new inputs: `dlcli predict mnist digit.png more.png`.

    Inputs may be files, directories (searched recursively for the task's file types), quoted
    glob patterns ('photos/**/*.jpg') and `-` for paths on standard input, one a line.
    Task options (for example `--top-k 3`) come after the task; `dlcli tasks TASK` lists them.
    Files that cannot be read are reported by name; the others are still predicted.
    """
    task = get_task(task_name)
    verbatim = ctx.meta.get("dlcli.after_dashes", [])
    tokens = list(inputs or []) + list(ctx.args)
    if verbatim and tokens[len(tokens) - len(verbatim):] == verbatim:
        tokens = tokens[: len(tokens) - len(verbatim)] + ["--", *verbatim]
    options, files = parse_task_options(tokens, task.predict_options, f"`dlcli predict {task_name}`")
    if json_mode and jsonl:
        raise UsageError("--json and --jsonl exclude each other: one document, or one object a line")
    from dlcli import batchpredict, lite

    if engine not in lite.ENGINES:
        raise UsageError(f"--engine must be one of {', '.join(lite.ENGINES)}; got {engine!r}")
    options["engine"] = engine
    run = _open_run(task_name, root, run_name, checkpoint)
    cfg = _run_config(task_name, run, {"seed": seed})
    reporter = _reporter(json_mode or jsonl, quiet)
    context = Context(cfg=cfg, run=run, reporter=reporter, options=options, checkpoint=checkpoint, out=out)
    rows = _predict_rows(task_name, task, context, files, batchpredict)
    _print_predictions(rows, reporter, json_mode, jsonl)


def _predict_rows(task_name: str, task, context: Context, files: list[str], batchpredict):
    """The task's rows, lazily where the task streams (`predict_stream`), for the expanded inputs."""
    if task_name not in batchpredict.FILE_TASKS or not files:
        return task.predict(context, files)
    items = batchpredict.expand(files, batchpredict.FILE_TASKS[task_name])
    stream = getattr(sys.modules[f"dlcli.tasks.{task_name}"], "predict_stream", None)
    if stream is not None:
        return stream(context, items)
    paths, errors = [], []
    for item in items:
        (errors if isinstance(item, dict) else paths).append(item)
    return (task.predict(context, paths) if paths else []) + errors


def _print_predictions(rows, reporter: Reporter, json_mode: bool, jsonl: bool) -> None:
    """Each row as it comes (human lines, or JSON lines), errors on stderr; exit 2 if any failed."""
    if json_mode:
        rows = list(rows)
        _emit_json(rows)
    failed = total = 0
    try:
        for row in rows:
            total += 1
            if "error" in row:
                failed += 1
                ERR.print(f"[red]error:[/] {escape(row['error'])}", markup=True, highlight=False, soft_wrap=True)
            if jsonl:
                sys.stdout.write(json.dumps(row, default=str) + "\n")
                sys.stdout.flush()
            elif not json_mode and "error" not in row:
                shown = row.get("text") or "  ".join(f"{k} {_human(v)}" for k, v in row.items() if k not in ("input", "note"))
                if row.get("note"):
                    shown += f"  ({row['note']})"
                # one line per input, never wrapped: scripts read it line by line
                reporter.console.print(f"{row['input']}: {shown}" if "input" in row else shown, highlight=False,
                                       markup=False, soft_wrap=True)
    except BrokenPipeError:  # `dlcli predict ... --jsonl | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(141)
    if failed:
        ERR.print(f"{failed} of {total} inputs failed", highlight=False)
        raise typer.Exit(2)


@app.command("export", cls=TaskHelp)
@handle_errors
def export_command(
    task_name: TaskArg,
    run_name: RunOpt = None,
    checkpoint: CheckpointOpt = None,
    root: RootOpt = DEFAULT_ROOT,
    fmt: Annotated[str, typer.Option("--format", help="tflite (what predict can run without TensorFlow) or savedmodel.")] = "tflite",
    out: Annotated[Optional[Path], typer.Option("--out", help="The folder to write (default: the run's export/).", show_default=False)] = None,
    json_mode: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Export a run's model (mnist, cnn, finetune; the autoencoder's encoder) with its class names
    and preprocessing beside it. A current `<run>/export/model.tflite` makes `predict` start fast."""
    from dlcli import export as export_lib

    if task_name not in export_lib.EXPORTABLE:
        raise UsageError(f"task {task_name} cannot be exported; these can: {', '.join(export_lib.EXPORTABLE)}")
    if fmt not in export_lib.FORMATS:
        raise UsageError(f"--format must be one of {', '.join(export_lib.FORMATS)}; got {fmt!r}")
    run = _open_run(task_name, root, run_name, checkpoint)
    cfg = _run_config(task_name, run, {})
    reporter = _reporter(json_mode, quiet)
    context = Context(cfg=cfg, run=run, reporter=reporter, checkpoint=checkpoint)
    module = sys.modules[f"dlcli.tasks.{task_name}"]
    classes = module._classes(context) if hasattr(module, "_classes") else None
    reporter.status(f"exporting {task_name} / {run.name} as {fmt}")
    try:
        meta = export_lib.export(task_name, run, context.model_path, fmt, out, classes)
    finally:
        reporter.finish()
    folder = Path(out) if out is not None else run.path("export")
    if meta.get("keras_precision", "float32") != "float32":
        ERR.print(f"note: this model computes in {meta['keras_precision']} and its export in float32, whose "
                  f"probabilities differ by that rounding; predict uses the export only with --engine lite",
                  highlight=False, soft_wrap=True)
    if json_mode:
        _emit_json({**meta, "folder": str(folder)})
    elif not quiet:
        Console().print(str(folder / meta["file"]), highlight=False)


@app.command("visualize", context_settings=EXTRA_ARGS, cls=TaskHelp)
@handle_errors
def visualize_command(
    ctx: typer.Context,
    view_name: Annotated[
        str,
        typer.Argument(help="View, for example mnist-confusion or training-curves (`dlcli tasks` lists them).",
                       show_default=False, metavar="VIEW", autocompletion=complete_view),
    ],
    task_name: Annotated[
        Optional[str],
        typer.Option("--task", help="Task whose run to draw (for views of any task).", show_default=False, autocompletion=complete_task),
    ] = None,
    run_name: RunOpt = None,
    checkpoint: CheckpointOpt = None,
    root: RootOpt = DEFAULT_ROOT,
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Random seed of views that sample.", show_default=False)] = None,
    out: OutOpt = None,
    json_mode: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Draw a picture from a trained run and print the PNG's path.

    View options (for example `--n 16`) come after the view; `dlcli tasks TASK` lists them.
    """
    views = all_views()
    if view_name not in views:
        raise UsageError(f"unknown view {view_name!r}; valid views: {', '.join(views)}")
    owner, view = views[view_name]
    if owner and task_name and task_name != owner:
        raise UsageError(f"view {view_name} belongs to task {owner}, not {task_name}")
    task_name = owner or task_name or _newest_task(root)
    options, extra = parse_task_options(list(ctx.args), view.options, f"`dlcli visualize {view_name}`")
    if extra:
        raise UsageError(f"unexpected argument {extra[0]!r}")
    run = _open_run(task_name, root, run_name, checkpoint)
    cfg = _run_config(task_name, run, {"dataset": dataset, "data_dir": data_dir, "seed": seed})
    reporter = _reporter(json_mode, quiet)
    if out is not None and out.suffix.lower() != ".png":
        raise UsageError(f"--out {out}: views are PNG files; give a path ending in .png")
    path = view.draw(Context(cfg=cfg, run=run, reporter=reporter, options=options, checkpoint=checkpoint, out=out))
    if json_mode:
        _emit_json({"view": view_name, "task": task_name, "run": str(run.dir), "path": str(path)})
    elif not quiet:
        Console().print(str(path), highlight=False)


def _newest_task(root: Path) -> str:
    finished = [r for name in TASK_NAMES for r in Run.all(root, name) if r.finished]
    if not finished:
        raise UsageError(f"no finished run in {root}; train one first, or pass --task")
    return max(finished, key=lambda r: r.metrics_path.stat().st_mtime).task


def version_callback(value: bool) -> None:
    if value:
        print(f"dlcli {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Show the version and exit.")] = False,
) -> None:
    """Train, evaluate and use the deep-learning course's models from the shell."""


def main() -> None:
    stop_by_exception()
    try:
        app()
    except SystemExit as exc:
        if exc.code not in (0, None) and os.environ.get("TF_CONFIG") and "tensorflow" in sys.modules:
            # A failed cluster run: TensorFlow's collective ops leave thread pools whose
            # teardown at interpreter exit prints "Exception ignored in Pool.__del__" after our
            # one-line error. Everything is on disk (atomic writes), so leave at once.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(exc.code if isinstance(exc.code, int) else 1)
        raise
