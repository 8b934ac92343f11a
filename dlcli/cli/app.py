"""The Typer app every command module registers on, its one-line errors and its `main`.

This package imports no TensorFlow: `--help` and `dlcli tasks` answer at once, and the task
modules pull TensorFlow in only when a command does real work.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import typer
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from typer.core import TyperCommand, TyperGroup
from typing_extensions import Annotated

try:  # Typer >= 0.22 carries its own copy of Click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException, NoArgsIsHelpError

from dlcli import __version__, config as config_lib
from dlcli.cli.output import ERR, print_error
from dlcli.contract import Option
from dlcli.engine.interrupts import stop_by_exception
from dlcli.engine.lazy import quiet_tensorflow
from dlcli.engine import streams
from dlcli.tasks import TASK_NAMES, all_views, get_task

quiet_tensorflow()

# Old spellings of options that scripts may still use: accepted, and not shown in --help.
OPTION_ALIASES = {"--checkpoint-dir": "--runs-dir"}


def _with_aliases(args: list[str]) -> list[str]:
    """The arguments with each old option name replaced by its new one (up to a `--`)."""
    out = []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + args[i:]
        name, eq, value = arg.partition("=")
        out.append(OPTION_ALIASES[name] + eq + value if name in OPTION_ALIASES else arg)
    return out


class OneLineErrors(TyperGroup):
    """Click's usage errors (`--epochs abc`, a missing argument) as one line, like dlcli's own."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = _with_aliases(list(sys.argv[1:] if args is None else args))
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
            print_error(message, hint)
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


def first_known(args: list[str], known) -> str | None:
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
            streams.console().print(Panel(table, title=title, title_align="left", border_style="dim"))


def _help_extra(command: str, args: list[str]) -> tuple[str, list[tuple[str, str]]]:
    """The extra panel of `--help` for a command given a task (or view) name."""
    if command == "visualize":
        views = all_views()
        name = first_known(args, views)
        if name is None:
            return "", []
        options = views[name][1].options
        return f"Options of view {name}", [(flag(k), option_help(o)) for k, o in options.items()]
    name = first_known(args, TASK_NAMES)
    if name is None:
        return "", []
    task = get_task(name)
    if command == "predict":
        return f"Options of task {name}", [(flag(k), option_help(o)) for k, o in task.predict_options.items()]
    if command == "train":
        rows = []
        for key, default in task.defaults.items():
            if isinstance(default, dict) or key in ("dataset", "data_dir", "epochs", "batch_size", "lr", "seed"):
                continue
            allowed = task.choices.get(key) or config_lib.COMMON_CHOICES.get(key)
            shown = f"one of {', '.join(map(str, allowed))}" if allowed else f"default {shown_default(default)}"
            rows.append((flag(key), f"{config_lib.key_help(task.key_help, key)} [dim]({escape(shown)})[/]"))
        return f"Config keys of task {name} (also --set KEY=VALUE)", rows
    return "", []


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def shown_default(value: Any) -> str:
    if value is None or value == "":
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def option_help(option: Option) -> str:
    default = "" if option.type is bool and option.default is False else f" [dim](default {escape(shown_default(option.default))})[/]"
    return escape(option.help) + default


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
    streams.guard_standard_streams()
    stop_by_exception()
    try:
        app()
    except SystemExit as exc:
        if exc.code not in (0, None) and os.environ.get("TF_CONFIG") and "tensorflow" in sys.modules:
            # A failed cluster run: TensorFlow's collective ops leave thread pools whose
            # teardown at interpreter exit prints "Exception ignored in Pool.__del__" after our
            # one-line error. Everything is on disk (atomic writes), so leave at once.
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (AttributeError, OSError, ValueError):  # closed, or a reader gone
                    pass
            os._exit(exc.code if isinstance(exc.code, int) else 1)
        raise
