"""`dlcli tasks [TASK]`: every task at a glance, or one task's config keys, options and views."""

from __future__ import annotations

from typing import Optional

import typer
from rich.markup import escape
from rich.padding import Padding
from rich.table import Table
from typing_extensions import Annotated

from dlcli import config as config_lib
from dlcli.cli.app import TaskHelp, app, shown_default
from dlcli.cli.options import DEFAULT_RUNS_DIR, JsonOpt, RunsDirOpt, complete_task
from dlcli.cli.output import emit_json, handle_errors
from dlcli.engine import streams
from dlcli.runs.run import Run
from dlcli.tasks import TASK_NAMES, get_task


@app.command("tasks", cls=TaskHelp)
@handle_errors
def tasks_command(
    task_name: Annotated[
        Optional[str],
        typer.Argument(help="Show this task's config keys, predict options and views.", show_default=False,
                       metavar="TASK", autocompletion=complete_task),
    ] = None,
    runs_dir: RunsDirOpt = DEFAULT_RUNS_DIR,
    json_mode: JsonOpt = False,
) -> None:
    """List every task with its default data set, its views and its newest trained run."""
    from dlcli import plots

    if task_name:
        _describe_task(task_name, json_mode)
        return
    rows = []
    for name in TASK_NAMES:
        task = get_task(name)
        finished = [r for r in Run.all(runs_dir, name) if r.finished]
        rows.append({
            "task": name,
            "summary": task.summary,
            "dataset": task.default_dataset,
            "views": list(task.views),
            "exports": task.export is not None,
            "trained": finished[-1].name if finished else None,
        })
    generic = list(plots.GENERIC_VIEWS)
    if json_mode:
        emit_json({"tasks": rows, "views_for_any_task": generic})
        return
    # One task a block, its details wrapped under its name: nothing is cut at 80 columns.
    grid = Table.grid(padding=(0, 2))
    grid.add_column(no_wrap=True, style="bold")
    grid.add_column()
    for row in rows:
        details = (f"{escape(row['summary'])}\n[dim]data[/] {escape(row['dataset'])}   "
                   f"[dim]views[/] {escape(', '.join(row['views']))}   "
                   f"[dim]export[/] {'yes' if row['exports'] else 'no'}   "
                   f"[dim]trained[/] {escape(streams.printable(row['trained'])) if row['trained'] else 'no'}")
        grid.add_row(row["task"], details)
        grid.add_row("", "")
    console = streams.console()
    console.print(grid)
    console.print(f"Any task's run also has the view{'s' if len(generic) > 1 else ''} [bold]{', '.join(generic)}[/]. "
                  "`dlcli tasks TASK` shows a task's config keys and options.")


def _describe_task(task_name: str, json_mode: bool) -> None:
    """One task's config keys with defaults and allowed values, predict options and views."""
    task = get_task(task_name)

    def option_rows(options: dict) -> list[dict]:
        return [{"option": "--" + k.replace("_", "-"), "default": o.default, "help": o.help} for k, o in options.items()]

    flat = config_lib.flatten(task.defaults)
    allowed = {k: task.choices.get(k) or config_lib.COMMON_CHOICES.get(k) for k in flat}
    info = {
        "task": task_name,
        "summary": task.summary,
        "config": task.defaults,
        "choices": task.choices,
        "keys": {k: {"default": v, "allowed": allowed[k], "help": config_lib.key_help(task.key_help, k)} for k, v in flat.items()},
        "predict_options": option_rows(task.predict_options),
        "views": {name: {"help": v.help, "options": option_rows(v.options)} for name, v in task.views.items()},
    }
    if json_mode:
        emit_json(info)
        return
    console = streams.console()
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
        keys.add_row(escape(key), escape(shown_default(row["default"])), meaning)
    console.print(keys)

    def options_table(title: str, rows: list[dict]):
        table = Table(title=title, title_justify="left", header_style="bold", box=None, padding=(0, 1))
        for column in ("option", "default", "meaning"):
            table.add_column(column, no_wrap=column != "meaning")
        for row in rows:
            table.add_row(row["option"], escape(shown_default(row["default"])), escape(row["help"]))
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

