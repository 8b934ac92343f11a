"""The Keras training loop every Keras task shares.

`fit` runs `model.fit` one epoch at a time so that each epoch is a checkpoint: after
every epoch it writes `backup/epoch-NNNN/` (model with optimizer state, plus the history
so far) as a temporary directory renamed into place, so a killed process leaves only
complete checkpoints. `--resume` loads the newest one and carries on. Each epoch's
shuffle order and dropout noise are derived from (seed, epoch), which is what makes a
resumed run give the same history as an uninterrupted one, to the last digit.
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path
from typing import Callable, Iterable

from dlcli.errors import RunError, UsageError
from dlcli.lazy import lazy_import
from dlcli.runs import link_or_copy

keras = lazy_import("keras")
tf = lazy_import("tensorflow")


def keras_defaults() -> dict:
    """Config keys of every Keras task, beside `common_defaults`."""
    return {"jit_compile": False}


def set_seed(seed: int | None) -> None:
    """Seed Python, NumPy and TensorFlow, and ask TensorFlow for deterministic kernels."""
    if seed is None:
        return
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def epoch_seed(seed: int | None, epoch: int) -> int | None:
    return None if seed is None else seed * 100_003 + epoch


def _seed_generators(model) -> list:
    from keras.src.random.seed_generator import SeedGenerator

    found = []
    for layer in model._flatten_layers(include_self=True, recursive=True):
        found.extend(v for v in vars(layer).values() if isinstance(v, SeedGenerator))
    return found


def reseed_model(model, seed: int | None, epoch: int) -> None:
    """Give every random layer (dropout, augmentation) a state derived from (seed, epoch)."""
    if seed is None:
        return
    import numpy as np

    for i, gen in enumerate(_seed_generators(model)):
        gen.state.assign(np.array([epoch_seed(seed, epoch) + 7919 * i, 0], dtype=gen.state.dtype))


def make_callback(reporter, steps: int | None):
    """A Keras callback that feeds the reporter and stops on a NaN or infinite loss."""

    class ReporterCallback(keras.callbacks.Callback):
        bad_loss_at: tuple[int, int] | None = None

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch
            reporter.start_epoch(epoch, steps)

        def on_train_batch_end(self, batch, logs=None):
            logs = logs or {}
            loss = logs.get("loss")
            if loss is not None and not math.isfinite(float(loss)):
                self.bad_loss_at = (self.epoch, batch)
                self.model.stop_training = True
            reporter.batch(batch, {k: float(v) for k, v in logs.items()})

    return ReporterCallback()


def load_model(path: Path, task: str | None = None):
    """Load a .keras file in safe mode, with a clear error for missing, corrupt or foreign files.

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
    name = str(model_config.get("config", {}).get("name", ""))
    if task and not name.startswith(f"{task}_"):
        raise UsageError(f"checkpoint {path} holds model {name!r}, not a {task} model")
    try:
        return keras.models.load_model(path, safe_mode=True, compile=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot load checkpoint {path}: {first}") from None


def fit(
    ctx,
    build_model: Callable[[], "keras.Model"],
    train_data: Callable[[int], "tf.data.Dataset"],
    val_data=None,
    steps_per_epoch: int | None = None,
    callbacks: Iterable = (),
    model_file: str = "model.keras",
):
    """Train epoch by epoch with checkpoints; returns (model, history rows).

    `train_data(epoch)` returns that epoch's (shuffled) data set, so the order depends
    only on the seed and the epoch number.
    """
    cfg, run, reporter = ctx.cfg, ctx.run, ctx.reporter
    seed = cfg.get("seed")
    history: list[dict] = []
    start = 0
    backup = run.latest_backup() if ctx.resume else None
    if backup is not None:
        model = load_model(backup / "model.keras")
        state = json.loads((backup / "state.json").read_text())
        start, history = state["epochs_done"], state["history"]
        reporter.info(f"resuming {run.dir} after epoch {start}")
    else:
        model = build_model()
    epochs = cfg["epochs"]
    if start >= epochs:
        raise UsageError(
            f"run {run.dir} has already done {start} epochs; pass --epochs N with N > {start} to train on"
        )
    watcher = make_callback(reporter, steps_per_epoch)
    tensorboard = keras.callbacks.TensorBoard(log_dir=str(run.logs_dir), profile_batch=0)
    all_callbacks = [watcher, tensorboard, *callbacks]
    reporter.start(epochs, initial_epoch=start)
    try:
        for epoch in range(start, epochs):
            reseed_model(model, seed, epoch)
            result = model.fit(
                train_data(epoch),
                validation_data=val_data,
                initial_epoch=epoch,
                epochs=epoch + 1,
                steps_per_epoch=steps_per_epoch,
                callbacks=all_callbacks,
                shuffle=False,  # train_data(epoch) is already shuffled, by (seed, epoch)
                verbose=0,
            )
            if watcher.bad_loss_at is not None:
                bad_epoch, step = watcher.bad_loss_at
                kept = run.latest_backup()
                raise RunError(
                    f"the loss became NaN or infinite at epoch {bad_epoch + 1}, step {step + 1}; "
                    + (f"the last good checkpoint is {kept}" if kept else "no checkpoint was saved yet")
                    + " (try a lower --lr)"
                )
            logs = {k: float(v[-1]) for k, v in result.history.items()}
            row = {"epoch": epoch + 1, **logs}
            history.append(row)
            run.save_backup(epoch, history, {"model.keras": model.save})
            run.write_history(history)
            reporter.end_epoch(epoch, logs)
    finally:
        reporter.finish()
    link_or_copy(run.latest_backup() / "model.keras", run.path(model_file))
    return model, history
