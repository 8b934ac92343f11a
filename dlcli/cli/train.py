"""`dlcli train TASK`: train a task's model into a new run, or resume one."""

from __future__ import annotations


import typer
from typing_extensions import Annotated

from dlcli import api, config as config_lib
from dlcli.cli.app import TaskHelp, app
from dlcli.cli.options import (
    DEFAULT_RUNS_DIR, EXTRA_ARGS, BatchOpt, ConfigOpt, DataDirOpt, DatasetOpt, EpochsOpt, JsonOpt, LrOpt, QuietOpt,
    ResumeOpt, RunsDirOpt, SeedOpt, SetOpt, TaskArg, TrainRunOpt,
)
from dlcli.cli.output import emit_json, handle_errors, reporter as make_reporter
from dlcli.cli.parsing import config_flags
from dlcli.engine import streams
from dlcli.tasks import get_task


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
    runs_dir: RunsDirOpt = DEFAULT_RUNS_DIR,
    resume: ResumeOpt = False,
    print_config: Annotated[bool, typer.Option("--print-config", help="Print the resolved config as YAML and exit.", show_default=False)] = False,
    json_mode: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a task's model and save the run under RUNS_DIR/TASK/RUN/.

    Config precedence: task defaults < --config FILE < --set KEY=VALUE < flags. Any
    top-level config key is also a flag: `dlcli train mnist --model cnn`; `dlcli tasks TASK`
    lists a task's keys.
    """
    task = get_task(task_name)
    flags = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "dataset": dataset, "data_dir": data_dir}
    flags.update(config_flags(list(ctx.args), task.defaults, task_name))
    flags = {k: v for k, v in flags.items() if v is not None}
    options = dict(config=config_file, runs_dir=runs_dir, run=run_name, resume=resume, sets=sets or [], **flags)
    if print_config:
        streams.write(config_lib.to_yaml(api.train_config(task_name, **options)))
        return
    reporter = make_reporter(json_mode, quiet)
    run = api.train(task_name, reporter=reporter, **options)
    reporter.table(f"{task_name} / {run.name}", run.metrics)
    if json_mode:
        emit_json({"task": task_name, "run": str(run.dir), "config": run.config, "metrics": run.metrics})
