"""The task registry: one module per task, each exporting a `TASK` spec.

A task module owns its data, model, prediction and pictures. It imports TensorFlow
lazily (see `dlcli.engine.lazy`), so reading its spec for `dlcli tasks` or `--help` is cheap.
The contract a task module follows (TaskSpec, Context, View, Option and their rules) is
in `dlcli.contract`; `get_task` checks each spec against it when it first loads a task.

A task kept in another package registers itself with an entry point in the group
`dlcli.tasks`, its name the task's and its value the module (`wordcount = "mypkg.wordcount"`
under `[project.entry-points."dlcli.tasks"]`); it then lists and runs like a built-in one.
"""

from __future__ import annotations

import importlib

from dlcli.contract import (  # noqa: F401  (what task modules import from here)
    Context, DataRules, ExportSpec, FileInputs, Option, Predictor, TaskSpec, View, common_defaults, register, unregister,
)
from dlcli.errors import UsageError

ENTRY_POINT_GROUP = "dlcli.tasks"

# In the order `dlcli tasks` lists them; `add_task` appends to it (a list the CLI shares).
TASK_NAMES = ["linear", "mnist", "cnn", "finetune", "autoencoder", "gan", "names", "caption"]
_MODULES = {name: f"dlcli.tasks.{name}" for name in TASK_NAMES}


def _installed_tasks() -> None:
    """Add the tasks that other installed packages declare (entry points of `dlcli.tasks`)."""
    from importlib.metadata import entry_points

    for entry in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if entry.name not in _MODULES:
            _MODULES[entry.name] = entry.value.split(":")[0]
            TASK_NAMES.append(entry.name)


_installed_tasks()


def get_task(name: str) -> TaskSpec:
    """The task's spec, its module imported and its spec checked on first use."""
    if name not in _MODULES:
        raise UsageError(f"unknown task {name!r}; valid tasks: {', '.join(TASK_NAMES)}")
    from dlcli import plots

    return register(importlib.import_module(_MODULES[name]).TASK, name, plots.GENERIC_VIEWS)


def add_task(name: str, module: str) -> TaskSpec:
    """Register a task kept outside dlcli/tasks/ (a test's minimal task): `module` is its
    importable name; its spec is checked at once."""
    _MODULES[name] = module
    try:
        spec = get_task(name)
    except BaseException:
        del _MODULES[name]
        raise
    if name not in TASK_NAMES:
        TASK_NAMES.append(name)
    return spec


def remove_task(name: str) -> None:
    """Undo `add_task`."""
    _MODULES.pop(name, None)
    if name in TASK_NAMES:
        TASK_NAMES.remove(name)
    unregister(name)


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
