"""`dlcli eval TASK`: a trained run's metrics on its test data, or on other data."""

from __future__ import annotations

from dlcli import api
from dlcli.cli.app import TaskHelp, app
from dlcli.cli.options import (
    DEFAULT_RUNS_DIR, BatchOpt, CheckpointOpt, DataDirOpt, DatasetOpt, JsonOpt, QuietOpt, RunOpt, RunsDirOpt, TaskArg,
)
from dlcli.cli.output import emit_json, handle_errors, reporter as make_reporter


@app.command("eval", cls=TaskHelp)
@handle_errors
def eval_command(
    task_name: TaskArg,
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    batch_size: BatchOpt = None,
    run_name: RunOpt = None,
    checkpoint: CheckpointOpt = None,
    runs_dir: RunsDirOpt = DEFAULT_RUNS_DIR,
    json_mode: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Evaluate a trained run on its task's test data (the newest finished run by default)."""
    run = api.open_run(task_name, run=run_name, runs_dir=runs_dir, checkpoint=checkpoint)
    reporter = make_reporter(json_mode, quiet)
    metrics = api.evaluate(task_name, run=run, dataset=dataset, data_dir=data_dir, batch_size=batch_size,
                           checkpoint=checkpoint, reporter=reporter)
    reporter.table(f"{task_name} / {run.name}: evaluation", metrics)
    if json_mode:
        emit_json({"task": task_name, "run": str(run.dir), "metrics": metrics})
