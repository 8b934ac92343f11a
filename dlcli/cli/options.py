"""The arguments and options that several commands share, with their shell completion.

Each is an `Annotated` type: a command takes `epochs: EpochsOpt = None`, and its `--help`,
its completion and its parsing follow from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from typing_extensions import Annotated

from dlcli import config as config_lib
from dlcli.cli.app import first_known
from dlcli.runs.run import DEFAULT_ROOT
from dlcli.tasks import TASK_NAMES, all_views, get_task


def complete_task(incomplete: str) -> list[str]:
    return [name for name in TASK_NAMES if name.startswith(incomplete)]


def complete_view(incomplete: str) -> list[str]:
    return [name for name in all_views() if name.startswith(incomplete)]


def complete_set(ctx: typer.Context, incomplete: str) -> list[str]:
    """`--set KEY=` for every config key of the task on the line (all tasks' keys without one)."""
    task_name = ctx.params.get("task_name") or first_known(ctx.args, TASK_NAMES)  # completion parses leniently
    names = [task_name] if task_name in TASK_NAMES else list(TASK_NAMES)
    keys = dict.fromkeys(k for n in names for k in config_lib.flat_keys(get_task(n).defaults))
    return [f"{k}=" for k in keys if f"{k}=".startswith(incomplete)]


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
RunsDirOpt = Annotated[Path, typer.Option("--runs-dir", help="Where runs live: RUNS_DIR/TASK/RUN/.")]
DEFAULT_RUNS_DIR = DEFAULT_ROOT
CheckpointOpt = Annotated[
    Optional[Path], typer.Option("--checkpoint", help="Use this model file instead of a run's (its folder is the run).", show_default=False)
]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its last checkpoint.", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout; all else goes to stderr.", show_default=False)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors (and --json output).", show_default=False)]
OutOpt = Annotated[Optional[Path], typer.Option("--out", help="Where to write the output.", show_default=False)]
