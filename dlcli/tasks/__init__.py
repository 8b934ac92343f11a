"""The task registry: one module per task, each exporting a `TASK` spec.

A task module owns its data, model, prediction and pictures. It imports TensorFlow
lazily (see `dlcli.lazy`), so reading its spec for `dlcli tasks` or `--help` is cheap.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from dlcli.errors import UsageError

# In the order `dlcli tasks` lists them. Later issues add their modules here.
TASK_NAMES = ("linear", "mnist", "cnn", "finetune", "autoencoder", "gan", "names", "caption")


@dataclass
class Option:
    """A task-specific option of `predict` or `visualize` (`--top-k 5`)."""

    type: type
    default: Any
    help: str
    nargs: int = 1


@dataclass
class View:
    """A picture a task can draw from a run: `dlcli visualize NAME`."""

    draw: Callable[["Context"], Path]
    help: str
    options: dict[str, Option] = field(default_factory=dict)


@dataclass
class TaskSpec:
    name: str
    summary: str
    defaults: dict
    train: Callable[["Context"], dict]
    evaluate: Callable[["Context"], dict]
    predict: Callable[["Context", list], list]
    choices: dict[str, list] = field(default_factory=dict)
    views: dict[str, View] = field(default_factory=dict)
    predict_options: dict[str, Option] = field(default_factory=dict)
    model_file: str = "model.keras"

    @property
    def default_dataset(self) -> str:
        return self.defaults["dataset"]


@dataclass
class Context:
    """Everything a task function needs: the resolved config, the run, the reporter."""

    cfg: dict
    run: Any  # dlcli.runs.Run
    reporter: Any  # dlcli.progress.Reporter
    options: dict = field(default_factory=dict)
    resume: bool = False
    checkpoint: Path | None = None  # an explicit model file instead of the run's
    out: Path | None = None
    strategy: Any = None  # a tf.distribute strategy, or None for the default
    resume_from: Any = None  # on a non-chief worker: the chief's run, whose checkpoints it loads

    @property
    def model_path(self) -> Path:
        return self.checkpoint or self.run.path(get_task(self.run.task).model_file)

    @property
    def on_other_data(self) -> bool:
        """Whether `cfg["dataset"]` names other data than the run trained on (`eval --dataset OTHER`).

        Then a task evaluates all of that data (or its test split), not the part its seed
        would have held out for validation, and says how many items it scored.
        """
        if not self.run.config_path.exists():
            return False
        from dlcli.data import data_identity

        trained = self.run.read_config()
        return (data_identity(self.cfg.get("dataset"), self.cfg.get("data_dir"))
                != data_identity(trained.get("dataset"), trained.get("data_dir")))


def common_defaults(dataset: str, epochs: int, batch_size: int, lr: float, seed: int = 42) -> dict:
    """The keys every task's config has, with the task's own values."""
    return {
        "dataset": dataset,
        "data_dir": None,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
    }


def get_task(name: str) -> TaskSpec:
    if name not in TASK_NAMES:
        raise UsageError(f"unknown task {name!r}; valid tasks: {', '.join(TASK_NAMES)}")
    return importlib.import_module(f"dlcli.tasks.{name}").TASK


def all_views() -> dict[str, tuple[str | None, View]]:
    """View name -> (task name or None for views of any task, view)."""
    from dlcli import plots

    views: dict[str, tuple[str | None, View]] = {
        name: (None, view) for name, view in plots.GENERIC_VIEWS.items()
    }
    for task_name in TASK_NAMES:
        for view_name, view in get_task(task_name).views.items():
            views[view_name] = (task_name, view)
    return views
