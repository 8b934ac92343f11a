"""`dlcli visualize VIEW`: draw a picture of a trained run and print the PNG's path."""

from __future__ import annotations

from typing import Optional

import typer
from typing_extensions import Annotated

from dlcli import api
from dlcli.cli.app import TaskHelp, app
from dlcli.cli.options import (
    DEFAULT_RUNS_DIR, EXTRA_ARGS, CheckpointOpt, DataDirOpt, DatasetOpt, JsonOpt, OutOpt, QuietOpt, RunOpt, RunsDirOpt,
    complete_task, complete_view,
)
from dlcli.cli.output import emit_json, handle_errors, print_path, reporter as make_reporter
from dlcli.cli.parsing import parse_task_options
from dlcli.errors import UsageError
from dlcli.tasks import all_views


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
    runs_dir: RunsDirOpt = DEFAULT_RUNS_DIR,
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
    options, extra = parse_task_options(list(ctx.args), views[view_name][1].options, f"`dlcli visualize {view_name}`")
    if extra:
        raise UsageError(f"unexpected argument {extra[0]!r}")
    task = api.view_task(view_name, task=task_name, runs_dir=runs_dir)
    run = api.open_run(task, run=run_name, runs_dir=runs_dir, checkpoint=checkpoint)
    path = api.visualize(view_name, task=task, run=run, checkpoint=checkpoint, dataset=dataset, data_dir=data_dir,
                         seed=seed, out=out, reporter=make_reporter(json_mode, quiet), **options)
    if json_mode:
        emit_json({"view": view_name, "task": task, "run": str(run.dir), "path": str(path)})
    elif not quiet:
        print_path(path)
