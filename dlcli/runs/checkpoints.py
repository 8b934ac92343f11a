"""Checkpoints: what one holds, loading a model file, and where a run resumes.

Shared by the Keras loop (`training.fit`) and the NumPy loop of `linear`: the resume
point read from the newest checkpoint, and the one-line messages for a non-finite loss
or weights and for a stop by signal.
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path
from typing import Callable

from dlcli.errors import RunError, UsageError
from dlcli.engine.interrupts import Interrupted
from dlcli.engine.lazy import lazy_import

keras = lazy_import("keras")


def load_model(path: Path, task: str | None = None, compile: bool = True):
    """Load a .keras file in safe mode, with a clear error for missing, corrupt or foreign files.
    `compile=False` (what `predict` asks for, `lite.model_for`) skips the optimizer, its state and the losses:
    30 ms less for cnn.

    dlcli names every model `<task>_<variant>`, which is how a checkpoint of another task
    is told apart before Keras is asked to build it.
    """
    path = Path(path)
    if not path.exists():
        raise UsageError(f"checkpoint {path} does not exist")
    try:
        with zipfile.ZipFile(path) as archive:
            model_config = json.loads(archive.read("config.json"))
    except (zipfile.BadZipFile, KeyError, ValueError, OSError):
        raise UsageError(f"checkpoint {path} is not a Keras model file (corrupt or another format)") from None
    inner = model_config.get("config") if isinstance(model_config, dict) else None
    if not isinstance(inner, dict):
        raise UsageError(f"checkpoint {path} is not a Keras model file (its config.json describes no model)")
    name = str(inner.get("name", ""))
    if task and not name.startswith(f"{task}_"):
        raise UsageError(f"checkpoint {path} holds model {name!r}, not a {task} model")
    try:
        return keras.models.load_model(path, safe_mode=True, compile=compile)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot load checkpoint {path}: {first}") from None


class CheckpointState:
    """What a task's checkpoints hold and how its model is made from nothing or from one.

    The default: one Keras model, saved with its optimizer state as `model.keras` in every
    checkpoint and linked into the run as `model_file` when training ends. A task with more
    to keep subclasses it (the gan: two networks as .keras files and both optimizers'
    variables); `build` and `restore` run inside the distribution strategy's scope.
    """

    def __init__(self, build: Callable[[], "keras.Model"] | None = None, model_file: str = "model.keras"):
        self._build, self.model_file = build, model_file

    def build(self):
        """A new model, compiled, to train from the first epoch."""
        return self._build()

    def restore(self, backup: Path):
        """The model as a checkpoint directory saved it (weights and optimizer state)."""
        return load_model(backup / "model.keras")

    def files(self, model) -> dict[str, Callable[[Path], object]]:
        """The checkpoint's files: name -> writer(path), for `Run.save_backup`."""
        return {"model.keras": model.save}

    def outputs(self) -> dict[str, str]:
        """Checkpoint file -> run file, put in place from the last checkpoint at the end."""
        return {"model.keras": self.model_file}


@dataclasses.dataclass
class ResumePoint:
    """Where training starts: a checkpoint and the state saved with it, or the beginning."""

    backup: Path | None = None
    epochs_done: int = 0
    steps_done: int = 0  # batches of epoch `epochs_done + 1` already trained (a mid-epoch checkpoint)
    history: list = dataclasses.field(default_factory=list)
    seed_states: list | None = None
    metric_states: list | None = None  # the running sums of the interrupted epoch's metrics
    extra: dict = dataclasses.field(default_factory=dict)  # what a task saved beside (finetune's phase)


def saved_point(run) -> ResumePoint:
    """The run's newest checkpoint, read without a word (the beginning where there is none)."""
    backup = run.latest_backup()
    if backup is None:
        return ResumePoint()
    state = dict(run.read_backup_state(backup))
    known = [state.pop(key, default) for key, default in (("epochs_done", 0), ("steps_done", 0), ("history", []),
                                                          ("seed_states", None), ("metric_states", None))]
    return ResumePoint(backup, *known, extra=state)


def resume_point(ctx) -> ResumePoint:
    """With --resume, the newest checkpoint (on a worker other than the chief, the chief's);
    refuses a run that has already done `epochs` epochs."""
    source = ctx.resume_from or ctx.run
    point = saved_point(source) if ctx.resume else ResumePoint()
    if point.backup is None:
        return point
    start, skip = point.epochs_done, point.steps_done
    source.refuse_if_done(start, ctx.cfg["epochs"])
    if start >= ctx.cfg["epochs"]:
        ctx.reporter.info(f"{ctx.run.dir} had trained all {start} epochs when it stopped; finishing it")
    else:
        ctx.reporter.info(f"resuming {ctx.run.dir} after epoch {start}" + (f", step {skip} of epoch {start + 1}" if skip else ""))
    return point


def non_finite_error(run, what: str) -> RunError:
    """`what` ("the loss became NaN or infinite in epoch 3, by step 40") and the last good checkpoint."""
    kept = run.latest_backup()
    return RunError(f"{what}; " + (f"the last good checkpoint is {kept}" if kept else "no checkpoint was saved yet")
                    + " (try a lower --lr)")


def stopped(stop, run, where: str, saved: str = "progress saved") -> Interrupted:
    """A stop by SIGINT/SIGTERM `where` ("after epoch 2") as one line that says how to go on."""
    name = stop.signal_name
    return Interrupted(name, f"stopped by {name} {where}; {saved}; "
                             f"continue with `dlcli train {run.task} --run {run.name} --resume`")
