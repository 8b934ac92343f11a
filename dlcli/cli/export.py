"""`dlcli export TASK`: a run's model as TFLite or a SavedModel, for predict's fast path and
for use outside dlcli."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from dlcli import api
from dlcli.cli.app import TaskHelp, app
from dlcli.cli.options import DEFAULT_RUNS_DIR, CheckpointOpt, JsonOpt, QuietOpt, RunOpt, RunsDirOpt, TaskArg
from dlcli.cli.output import ERR, emit_json, handle_errors, print_path, reporter as make_reporter


@app.command("export", cls=TaskHelp)
@handle_errors
def export_command(
    task_name: TaskArg,
    run_name: RunOpt = None,
    checkpoint: CheckpointOpt = None,
    runs_dir: RunsDirOpt = DEFAULT_RUNS_DIR,
    fmt: Annotated[str, typer.Option("--format", help="tflite (what predict can run without TensorFlow) or savedmodel.")] = "tflite",
    out: Annotated[Optional[Path], typer.Option("--out", help="The folder to write (default: the run's export/).", show_default=False)] = None,
    json_mode: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Export a run's model with its class names and preprocessing beside it.

    A current `<run>/export/model.tflite` makes `predict` start fast, without TensorFlow.
    `dlcli tasks` says which tasks can be exported.
    """
    path = api.export(task_name, run=run_name, runs_dir=runs_dir, checkpoint=checkpoint, format=fmt, out=out,
                      reporter=make_reporter(json_mode, quiet))
    meta = json.loads((path.parent / "export.json").read_text())
    if meta.get("keras_precision", "float32") != "float32":
        ERR.print(f"note: this model computes in {meta['keras_precision']} and its export in float32, whose "
                  f"probabilities differ by that rounding; predict uses the export only with --engine lite",
                  highlight=False, soft_wrap=True)
    if json_mode:
        emit_json({**meta, "folder": str(path.parent)})
    elif not quiet:
        for part in meta.get("files", {}).values() or [{"file": path.name}]:
            print_path(path.parent / part["file"])
