"""`dlcli predict TASK INPUTS`: a trained model on new inputs, one line (or JSON object) each."""

from __future__ import annotations

from typing import List, Optional

import typer
from typing_extensions import Annotated

from dlcli import api
from dlcli.engine import streams
from dlcli.cli.app import TaskHelp, app
from dlcli.cli.options import (
    DEFAULT_RUNS_DIR, EXTRA_ARGS, CheckpointOpt, JsonOpt, OutOpt, QuietOpt, RunOpt, RunsDirOpt, SampleSeedOpt, TaskArg,
)
from dlcli.cli.output import handle_errors, print_predictions, reporter as make_reporter
from dlcli.cli.parsing import parse_task_options
from dlcli.errors import UsageError
from dlcli.tasks import get_task


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
    runs_dir: RunsDirOpt = DEFAULT_RUNS_DIR,
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
    streams.check_stdout()  # predictions are always printed: refuse before any work where they cannot be
    reporter = make_reporter(json_mode or jsonl, quiet)
    rows = api.predict(task_name, files, run=run_name, runs_dir=runs_dir, checkpoint=checkpoint, seed=seed,
                       engine=engine, out=out, reporter=reporter, **options)
    print_predictions(rows, reporter, json_mode, jsonl)
