"""Checkpoints: what one holds, loading a model file, and where a run resumes.

Shared by the Keras loop (`training.fit`) and the NumPy loop of `linear`: the resume
point read from the newest checkpoint, and the one-line messages for a non-finite loss
or weights and for a stop by signal.
"""

from __future__ import annotations

import dataclasses
import json
import math
import zipfile
from pathlib import Path
from typing import Callable

from dlcli.errors import RunError, UsageError
from dlcli.data.files import NotRegularFile, check_regular
from dlcli.runs.files import Snapshot
from dlcli.engine import custom_objects
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
        check_regular(path)  # a FIFO would be waited on
    except NotRegularFile as exc:
        raise UsageError(f"checkpoint {path} is {exc.kind}, not a Keras model file") from None
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
    custom_objects.register()  # dlcli's own layers and optimizer, which a model file may hold
    try:
        return keras.models.load_model(path, safe_mode=True, compile=compile)
    except Exception as exc:
        raise UsageError(f"cannot load checkpoint {path}: {_load_failure(exc)}") from None


def _load_failure(exc: Exception) -> str:
    """Why Keras could not load a model file, in a few words (its messages run to hundreds)."""
    text = " ".join(str(exc).split())
    if "Lambda" in text and ("safe_mode" in text or "arbitrary code" in text):
        return "it holds a Lambda layer (Python code inside the file), which dlcli never runs (Keras's safe mode)"
    first = text.split(". ")[0] if text else "Keras gave no reason"
    return first if len(first) <= 160 else first[:160] + "..."


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
        """The checkpoint's files as of now: name -> writer(path), for `Run.save_backup`; a
        `Snapshot` (the model, `model_file`) may be written after training has gone on."""
        return {"model.keras": model_file(model)}

    def outputs(self) -> dict[str, str]:
        """Checkpoint file -> run file, put in place from the last checkpoint at the end."""
        return {"model.keras": self.model_file}


def model_file(model) -> Snapshot:
    """The .keras file of the model (with its optimizer state) as it is now, written later."""
    from dlcli.engine.keras_workarounds import model_snapshot

    return Snapshot(model_snapshot(model))


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
    if getattr(ctx, "continuing", False):
        return point  # this command's own earlier stage (finetune's phase 1): nothing is resumed
    if start >= ctx.cfg["epochs"]:
        ctx.reporter.info(f"{ctx.run.dir} had trained all {start} epochs when it stopped; finishing it")
    else:
        ctx.reporter.info(f"resuming {ctx.run.dir} after epoch {start}" + (f", step {skip} of epoch {start + 1}" if skip else ""))
    return point


# What makes a checkpoint sound, beyond finite: each records (state.json) the largest
# trainable weight and the loss when it was saved. A diverging run's last finite checkpoints
# hold weights in the millions and more (a rate of 1e9 moves each weight by about 1e9 a
# step), where a trained network's stay within a few units; its loss runs away from the best.
WEIGHT_BOUND = 1e4
LOSS_FACTOR = 10.0


def weight_extent(model) -> tuple[bool, float]:
    """(every weight finite, the largest absolute trainable weight) of a Keras model."""
    import numpy as np

    trainable = {id(v) for v in model.trainable_weights}
    finite, extent = True, 0.0
    for v in model.weights:
        values = np.asarray(v.numpy())
        if values.size == 0:
            continue
        finite = finite and bool(np.isfinite(values).all())
        if id(v) in trainable:
            extent = max(extent, float(np.max(np.abs(values))))
    return finite, extent


def soundness(loss, extent) -> dict:
    """What a checkpoint's state.json records of its soundness (see `sound_backup`)."""
    record = {}
    if isinstance(loss, (int, float)) and math.isfinite(loss):
        record["loss"] = float(loss)
    if isinstance(extent, (int, float)):
        record["max_weight"] = float(extent)
    return record


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def sound_backup(run) -> tuple[Path | None, list[Path]]:
    """(the newest sound checkpoint, the newer unsound ones). Sound: its largest trainable
    weight within WEIGHT_BOUND and its loss within LOSS_FACTOR of the run's best (what it
    does not record is not held against it)."""
    backups = run.complete_backups()
    states = {}
    for backup in backups:
        try:
            states[backup] = run.read_backup_state(backup)
        except UsageError:
            states[backup] = None
    losses = [_number(s.get("loss")) for s in states.values() if s]
    losses += [_number(row.get("loss")) for s in states.values() if s for row in s.get("history", [])
               if isinstance(row, dict)]
    losses = [x for x in losses if x is not None and math.isfinite(x)]
    best = min(losses, default=None)
    unsound = []
    for backup in reversed(backups):
        state = states[backup]
        extent, loss = (_number(state.get("max_weight")), _number(state.get("loss"))) if state else (None, None)
        if state is None or (extent is not None and not extent <= WEIGHT_BOUND) or (
                loss is not None and best is not None and best > 0 and not loss <= LOSS_FACTOR * best):
            unsound.append(backup)
            continue
        return backup, unsound
    return None, unsound


def _train_command(run, cfg: dict, lr: float, resume: bool) -> str:
    """A `dlcli train` line that continues the run (`resume`) or starts it again, at rate `lr`."""
    import shlex

    from dlcli import config as config_lib
    from dlcli.tasks import get_task

    root = run.dir.parent.parent
    words = ["dlcli", "train", run.task]
    if resume:
        words += ["--run", run.name, "--resume"]
    else:
        defaults = config_lib.flatten(get_task(run.task).defaults)
        for key, value in config_lib.flatten(cfg).items():
            if key == "lr" or key not in defaults or value == defaults[key]:
                continue
            shown = config_lib.to_yaml({"v": value}).strip()[3:] if not isinstance(value, str) else value
            if config_lib.parse_set(f"{key}={shown}")[1] != value:
                shown = json.dumps(value)
            words += ["--set", f"{key}={shown}"]
    from dlcli.runs.run import DEFAULT_ROOT

    if root != DEFAULT_ROOT:
        words += ["--runs-dir", str(root)]
    words += ["--lr", f"{lr:g}"]
    return " ".join(shlex.quote(w) for w in words)


def non_finite_error(run, what: str) -> RunError:
    """`what` ("the loss became NaN or infinite in epoch 3, by step 40"), the newest sound
    checkpoint, and a command that works: continue from that checkpoint at a lower rate, or
    start again at one where no checkpoint is sound. Unsound newer checkpoints (finite, but
    of diverged weights) are removed, so that `--resume` takes the sound one."""
    sound, unsound = sound_backup(run)
    for backup in unsound:
        run._discard(backup)
    try:
        cfg = run.read_config()
    except UsageError:
        cfg = {}
    lr = _number(cfg.get("lr"))
    if lr is None or lr <= 0:
        return RunError(f"{what}; " + (f"the last sound checkpoint is {sound}" if sound else "no sound checkpoint was saved")
                        + " (try a lower --lr)")
    try:
        from dlcli.tasks import get_task

        default = _number(get_task(run.task).defaults.get("lr"))
    except Exception:  # noqa: BLE001 - a task outside the registry: a tenth of the rate
        default = None
    lower = min(lr / 10, default) if default is not None and default > 0 else lr / 10
    removed = f" ({len(unsound)} newer checkpoint{'s' if len(unsound) > 1 else ''} of diverged weights removed)" \
        if unsound else ""
    if sound is not None:
        return RunError(f"{what}; the last sound checkpoint is {sound}{removed}; continue from it at a lower rate: "
                        f"`{_train_command(run, cfg, lower, resume=True)}`")
    return RunError(f"{what}; no sound checkpoint was saved{removed}; start again at a lower rate: "
                    f"`{_train_command(run, cfg, lower, resume=False)}`")


def stopped(stop, run, where: str, saved: str = "progress saved") -> Interrupted:
    """A stop by SIGINT/SIGTERM `where` ("after epoch 2") as one line that says how to go on."""
    name = stop.signal_name
    return Interrupted(name, f"stopped by {name} {where}; {saved}; "
                             f"continue with `dlcli train {run.task} --run {run.name} --resume`")
