"""The Keras training loop every Keras task shares, and what a task's `train` calls.

`fit` runs the epochs in as few `model.fit` calls as their data allow (`fit_calls`: all
epochs in one call, as plain Keras does, where their data sets' graphs are small), and makes
checkpoints from a callback: at the end of an epoch once `save_interval_seconds` have passed
since the last checkpoint, after the last epoch, every `save_every_steps` steps, and on
SIGINT/SIGTERM, it writes a checkpoint directory (model with optimizer state, the history so
far) under `backup/`, renamed into place when complete, so a killed process leaves only
complete checkpoints.
`--resume` loads the newest one and carries on. Each epoch's shuffle order and dropout
noise are derived from (seed, epoch), which is what makes a resumed run give the same
history as an uninterrupted one, to the last digit.

The engine's other pieces live in modules named for what they hold: `checkpoints` (what a
checkpoint holds, model loading, resume points), `seeding`, `precision`, `cluster`
(strategies and cluster roles) and `keras_workarounds`. The names a task's `train` uses
from them are imported here too, so a task imports this one module.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Callable, Iterable

from dlcli.runs.checkpoints import (CheckpointState, load_model, model_file, non_finite_error,  # noqa: F401
                                    resume_point, soundness, stopped, weight_extent)
from dlcli.engine.cluster import ClusterWait, strategy_scope  # noqa: F401
from dlcli.contract import check_model_name
from dlcli.errors import RunError
from dlcli.engine.interrupts import StopOnSignal
from dlcli.engine import keras_workarounds
from dlcli.engine.keras_workarounds import build_before_fit, without_autotune_thread
from dlcli.engine.lazy import lazy_import
from dlcli.engine.precision import PRECISIONS, precision  # noqa: F401
from dlcli.runs.files import Snapshot, link_or_copy  # noqa: F401
from dlcli.runs.run import BackupWriter
from dlcli.engine.seeding import epoch_seed, reseed_model, restore_seed_states, seed_states, set_seed  # noqa: F401

keras = lazy_import("keras")
tf = lazy_import("tensorflow")


def keras_defaults() -> dict:
    """Config keys of every Keras task, beside `common_defaults`.

    jit_compile: XLA; off by default because on CPU it measured about 6x slower here.
    save_every_steps: also checkpoint inside an epoch every N steps (0: at epoch ends only).
    save_interval_seconds: an epoch's end checkpoints once this long has passed since the
        last checkpoint (0: every epoch). Epochs of a few seconds would otherwise spend a
        tenth of their time on checkpoints; a crash loses at most this much training.
    """
    return {"jit_compile": False, "save_every_steps": 0, "save_interval_seconds": 30.0, "strategy": "default"}


def array_epochs(x, y, batch_size: int, seed: int | None, x_map=None):
    """Training data from in-memory arrays, as `fit` wants it: (train_data(epoch), steps).

    Each epoch draws a permutation from (seed, epoch) and gathers whole batches from the
    arrays, which costs far less per step than shuffling examples one at a time. `x_map`
    turns each gathered batch of x into the model's input (uint8 pixels into floats): the
    arrays stay as small as they came, and a copy four times their size, touched for the
    first time, costs more than the whole epoch's casts (mnist: 0.8 s against 0.05).
    """
    import numpy as np

    xs, ys = tf.constant(x), tf.constant(y)

    def batch(i):
        return (x_map(tf.gather(xs, i)) if x_map else tf.gather(xs, i)), tf.gather(ys, i)

    def train_data(epoch: int):
        order = np.random.default_rng(epoch_seed(seed, epoch)).permutation(len(x))
        batches = tf.data.Dataset.from_tensor_slices(order).batch(batch_size)
        return batches.map(batch, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)

    return train_data, -(-len(x) // batch_size)


def decay_per_epoch(lr: float, decay: float):
    """The learning rate times `decay` each epoch (a function of the epoch: resume-safe)."""
    return keras.callbacks.LearningRateScheduler(lambda epoch: lr * decay**epoch)


def metric_states(model) -> list:
    """The running sums of the model's metrics (loss and metric totals and counts) inside an
    epoch: a mid-epoch checkpoint keeps them, so the resumed epoch's history row covers all
    of its steps, not only those after the resume."""
    return [v.numpy().tolist() for v in model.metrics_variables]


def add_metric_states(model, states: list) -> None:
    """Add a checkpoint's running sums to the metrics after the resumed epoch's first step
    (Keras builds the compiled metrics' variables in that step). The states are totals and
    counts, and a + b == b + a in floating point, so the sums come out exactly as if the
    epoch had not been interrupted."""
    import numpy as np

    variables = model.metrics_variables
    if len(variables) != len(states):
        return  # a checkpoint of an older version: the epoch's figures cover the resumed steps only
    for variable, value in zip(variables, states):
        variable.assign(variable + np.asarray(value, dtype=variable.dtype))


def all_finite(model) -> bool:
    """Whether every weight of the model is finite (no checkpoint is written otherwise)."""
    return weight_extent(model)[0]


# The running mean loss stays NaN once a step made it so: checking every few steps is enough
# (and at every step that saves a checkpoint).
NAN_CHECK_EVERY = 20


@functools.cache
def step_watcher_class():
    """The StepWatcher callback class, defined on first use (importing this module loads no Keras)."""

    class StepWatcher(keras.callbacks.Callback):
        """Feeds the reporter, checks the loss every few steps, honours SIGINT/SIGTERM and
        saves a mid-epoch checkpoint every `save_every` steps; `fit` reads what it saw.

        It reads the step's logs as tensors (`StepCallbacks`) and turns them into floats only
        where a bar, a NaN check or a checkpoint needs them. It must come first in
        `model.fit`'s callbacks: at an epoch's end it checks the epoch (finite training logs
        and weights) before the per-epoch extras (`after_each_epoch`) run, and a failed check
        stops training, which tells the extras to skip the epoch."""

        reads_tensor_logs = True

        def __init__(self, reporter, steps: int | None, stop, save_mid_epoch: Callable[[int, int], None],
                     save_every: int = 0, backups=None, seed: int | None = None):
            super().__init__()
            self.reporter, self.steps, self.stop, self.seed = reporter, steps, stop, seed
            self.save_mid_epoch, self.save_every = save_mid_epoch, save_every
            self.backups = backups  # the BackupWriter finishing the last checkpoint while training goes on
            self.bad_loss_at: tuple[int, int] | None = None
            self.bad_weights_at: int | None = None
            self.stopped_at: tuple[int, int] | None = None
            self.skipped = 0  # batches of this epoch a mid-epoch checkpoint had trained
            self.metric_states = None  # that checkpoint's running metric sums, added after the first step
            self.seed_states = None  # that checkpoint's random layers' states, restored as its epoch begins
            self.epoch = self.done = 0
            self.loss, self.extent = None, None  # at the last check of the weights: what a checkpoint records

        def on_epoch_begin(self, epoch, logs=None):
            reseed_model(self.model, self.seed, epoch)
            if self.seed_states is not None:  # the resumed epoch goes on from its checkpoint's states
                restore_seed_states(self.model, self.seed_states)
                self.seed_states = None
            self.epoch, self.done = epoch, self.skipped
            self.reporter.start_epoch(epoch, self.steps)

        def on_epoch_end(self, epoch, logs=None):
            if self.backups is not None:  # the last checkpoint in place before the extras write the run's files
                self.backups.wait()
            if self.model.stop_training:  # cut short: raise_if_stopped says why
                return
            train_logs = [v for k, v in (logs or {}).items() if not k.startswith("val_")]
            if not all(math.isfinite(float(v)) for v in train_logs):
                self.bad_loss_at = (epoch, self.done)
                self.model.stop_training = True
            else:
                finite, self.extent = weight_extent(self.model)
                if not finite:  # no checkpoint of non-finite weights
                    self.bad_weights_at = epoch
                    self.model.stop_training = True

        def on_train_batch_end(self, batch, logs=None):
            ClusterWait.joined()  # the workers took their first step together
            if self.backups is not None:  # a checkpoint that failed in its thread stops training here
                self.backups.check()
            if self.metric_states is not None:  # the running sums of a mid-epoch checkpoint
                add_metric_states(self.model, self.metric_states)
                self.metric_states = None
            done = self.done = self.skipped + batch + 1
            last_step = self.steps is not None and done >= self.steps
            saving = not last_step and (self.stop.requested or bool(self.save_every and done % self.save_every == 0))
            # Reading a metric waits for the step to finish: do it only where it is needed.
            if self.reporter.live or last_step or saving or done % NAN_CHECK_EVERY == 0:
                values = {k: float(v) for k, v in (logs or {}).items()}
                if saving:
                    finite, self.extent = weight_extent(self.model)
                    self.loss = values.get("loss")
                if not math.isfinite(values.get("loss", 0.0)) or (saving and not finite):
                    self.bad_loss_at = (self.epoch, done)
                    self.model.stop_training = True
                    return
                self.reporter.batch(done - 1, values)
            if saving:
                if self.stop.requested:
                    self.stopped_at = (self.epoch, done)
                    self.model.stop_training = True
                self.save_mid_epoch(self.epoch, done)

        @property
        def cut_short(self) -> bool:
            """Whether the epoch ended early: a NaN, non-finite weights or a mid-epoch stop."""
            return (self.bad_loss_at, self.bad_weights_at, self.stopped_at) != (None, None, None)

        def raise_if_stopped(self, run, epoch_done: int | None = None) -> None:
            """After a `fit` call: raise for a non-finite loss or weights or a mid-epoch stop;
            after the epoch's checkpoint (`epoch_done`), raise if a signal came during its last step."""
            if self.bad_loss_at is not None:
                bad_epoch, step = self.bad_loss_at
                raise non_finite_error(run, f"the loss became NaN or infinite in epoch {bad_epoch + 1}, by step {step}")
            if self.bad_weights_at is not None:
                raise non_finite_error(run, f"the weights became NaN or infinite in epoch {self.bad_weights_at + 1}")
            if self.stopped_at is not None:
                stop_epoch, step = self.stopped_at
                raise stopped(self.stop, run, f"at epoch {stop_epoch + 1}, step {step}",
                              f"progress saved in {run.latest_backup()}")
            if epoch_done is not None and self.stop.requested:
                raise stopped(self.stop, run, f"after epoch {epoch_done}")

        def resume_within(self, skip: int, states, metrics=None) -> None:
            """The next epoch goes on from a mid-epoch checkpoint that had trained `skip` of its
            batches: its random layers' states and metric sums are restored, its step count
            starts at `skip`."""
            self.skipped = skip
            self.seed_states, self.metric_states = (states or []), metrics

        def whole_epochs(self) -> None:
            self.skipped, self.seed_states, self.metric_states = 0, None, None

    return StepWatcher


def tf_error_line(exc) -> str:
    """The readable first line of a TensorFlow error, without its `{{function_node ...}}`
    prefixes, `[Op:...]` suffixes and `(__inference_...)` graph names."""
    text = str(getattr(exc, "message", None) or exc)
    text = re.sub(r"\{\{[^}]*\}\}", " ", text)
    text = re.sub(r"\[Op:[^\]]*\]", " ", text)
    text = re.sub(r"\(?\s*__inference_[\w.]*\]?\)?", " ", text)
    lines = [" ".join(line.split()).strip(" :;,") for line in text.splitlines()]
    first = next((line for line in lines if line), "") or type(exc).__name__
    return first if len(first) <= 300 else first[:300] + "..."


def raise_op_error(exc, ctx, epoch: int) -> None:
    """A TensorFlow failure inside an epoch as one line: a worker that stopped answering, a
    full disk (TensorBoard's log writer is the first to notice), anything else by its message."""
    run = ctx.run
    line = tf_error_line(exc)
    lost = (tf.errors.UnavailableError, tf.errors.CancelledError, tf.errors.DeadlineExceededError)
    if isinstance(exc, lost) and isinstance(ctx.strategy, tf.distribute.MultiWorkerMirroredStrategy):
        raise RunError(
            f"a worker of the cluster stopped answering in epoch {epoch + 1} ({line}); the last checkpoint is "
            f"{(ctx.resume_from or run).latest_backup()}; start every worker again with --resume"
        ) from None
    if "no space left" in line.lower():
        raise RunError(f"no space left on the device while writing {run.dir} in epoch {epoch + 1}; "
                       f"free some space and continue with --resume") from None
    raise RunError(f"TensorFlow failed in epoch {epoch + 1}: {line}") from None


def after_each_epoch(action: Callable[[object, int, dict], None]):
    """A per-epoch extra as a Keras callback: `action(model, epoch, logs)` runs after each
    epoch that trained all its steps with finite logs and weights, before its checkpoint
    (not after an epoch a signal or a NaN cut short). What it adds to `logs` lands in the
    epoch's history row; what it writes must be resume-safe (a function of the epoch)."""

    class _AfterEachEpoch(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.action = action  # what it runs, by name in `engine_costs.py phases`

        def on_epoch_end(self, epoch, logs=None):
            if not self.model.stop_training and logs is not None:
                self.action(self.model, epoch, logs)

    return _AfterEachEpoch()


def _concatenated(pieces: list):
    """The data sets one after another, as a balanced tree of `concatenate` (a chain of a
    thousand epochs would pass each batch through a thousand iterators)."""
    if len(pieces) == 1:
        return pieces[0]
    middle = len(pieces) // 2
    return _concatenated(pieces[:middle]).concatenate(_concatenated(pieces[middle:]))


# How much of the epochs' data sets' graphs one `fit` call may hold (see `fit_calls`).
JOINED_GRAPH_BYTES = 64 * 2**20


def graph_bytes(data) -> int:
    """The size of a data set's serialized graph: what each epoch's piece of a joined data set
    copies (its captured arrays, mostly); a graph that cannot be serialized counts as huge."""
    try:
        serialize = keras_workarounds.private(data, "_as_serialized_graph", "fit_calls")
        return len(serialize(external_state_policy=tf.data.experimental.ExternalStatePolicy.IGNORE).numpy())
    except Exception:  # noqa: BLE001 - a graph tf.data cannot write out: never joined
        return JOINED_GRAPH_BYTES + 1


def fit_calls(train_data: Callable[[int], "tf.data.Dataset"], start: int, skip: int, epochs: int,
              steps: int | None):
    """The `model.fit` calls that train epochs `start` to `epochs`: (first epoch, end, data, batches skipped).

    A call trains as many epochs as it can, as plain Keras does: a `fit` call an epoch costs
    its set-up every epoch (the iterators, the validation data, the callbacks' begin and end),
    a quarter of a short epoch's time (caption's 240 captions: 0.1 s of 0.38 s). The epochs'
    data sets (`train_data(epoch)`, a function of the epoch: resume-safe) come one after
    another in one data set, each opened when the one before is done, and Keras keeps one
    iterator across a call's epochs where it has `steps_per_epoch`.

    When the iterator opens, tf.data rewrites the data set's graph (its default rewrites, and
    under op determinism, which a seed turns on, one that makes it deterministic): it writes
    the graph out, and each epoch's piece takes its own copy of the arrays it captures.
    cnn's 36 epochs over CIFAR-10's 150 MB took the process from 2 to 7 GB that way. So a call
    joins at most `JOINED_GRAPH_BYTES` of pieces: every epoch of caption's or gan's small data
    sets, one epoch at a time for CIFAR-10 or MNIST, whose long epochs pay little for their calls.

    A run resumed inside an epoch trains that epoch's remaining batches in a call of its own
    first (all epochs of a call have the same steps). Where an epoch's number of batches is
    unknown or is not `steps`, each epoch is a call of its own, so that no epoch takes
    another's batches.
    """
    first = start
    if skip and first < epochs:
        yield first, first + 1, train_data(first).skip(skip), skip
        first += 1
    if first >= epochs:
        return
    probe = train_data(first)  # the first whole epoch's data: its size says how many epochs a call joins
    joined = 1
    if steps is not None and int(probe.cardinality()) == steps:
        joined = max(1, JOINED_GRAPH_BYTES // max(1, graph_bytes(probe)))
    for begin in range(first, epochs, joined):
        end = min(epochs, begin + joined)
        pieces = [probe if epoch == first else train_data(epoch) for epoch in range(begin, end)]
        if len(pieces) > 1 and any(int(piece.cardinality()) != steps for piece in pieces):
            for epoch, piece in enumerate(pieces, begin):
                yield epoch, epoch + 1, piece, 0
        else:
            yield begin, end, _concatenated(pieces), 0


@functools.cache
def epoch_checkpoint_class():
    """The EpochCheckpoint callback class, defined on first use."""

    class EpochCheckpoint(keras.callbacks.Callback):
        """Ends each epoch that trained all its steps with finite logs and weights (the
        StepWatcher's checks): `end(epoch, logs, save)` records the epoch, and checkpoints it
        where `save` is true. That is once `interval` seconds have passed since the last
        checkpoint was taken (`seconds_since_save()`; 0: every epoch), and always for the
        run's last epoch (`last_epoch`), when a signal came during the epoch's last step
        (which then stops training) or when a task's callback ends training. It comes last
        of the callbacks, so that the per-epoch extras' figures are in the epoch's history row.

        Example: an epoch of 3 s with `interval=30` checkpoints every tenth epoch or so; an
        epoch of a minute checkpoints every epoch."""

        def __init__(self, watcher, end: Callable[[int, dict, bool], None], last_epoch: int,
                     interval: float = 0, seconds_since_save: Callable[[], float] = lambda: 0.0):
            super().__init__()
            self.watcher, self.end, self.last_epoch = watcher, end, last_epoch
            self.interval, self.seconds_since_save = interval, seconds_since_save
            self.epochs_done: int | None = None

        def on_epoch_end(self, epoch, logs=None):
            if self.watcher.cut_short:
                return
            save = (self.interval <= 0 or epoch + 1 >= self.last_epoch or self.watcher.stop.requested
                    or self.model.stop_training or self.seconds_since_save() >= self.interval)
            self.end(epoch, {k: float(v) for k, v in (logs or {}).items()}, save)
            self.epochs_done = epoch + 1
            if self.watcher.stop.requested:
                self.model.stop_training = True

    return EpochCheckpoint


def fit(
    ctx,
    build_model: "Callable[[], keras.Model] | CheckpointState",
    train_data: Callable[[int], "tf.data.Dataset"],
    val_data=None,
    steps_per_epoch: int | None = None,
    callbacks: Iterable = (),
    model_file: str = "model.keras",
    tensorboard: bool = True,
):
    """Train epoch by epoch with checkpoints; returns (model, history rows).

    `build_model` makes a new compiled model, or is a `CheckpointState` saying what the
    checkpoints hold. `train_data(epoch)` returns that epoch's batched, shuffled data set,
    so the order depends only on the seed and the epoch number; a run resumed in the middle
    of an epoch skips the batches it had already trained on. `callbacks` go to `model.fit`
    after the engine's own; `tensorboard` writes logs/ for TensorBoard.
    """
    cfg, run, reporter = ctx.cfg, ctx.run, ctx.reporter
    state = build_model if isinstance(build_model, CheckpointState) else CheckpointState(build_model, model_file)
    seed = cfg.get("seed")
    point = resume_point(ctx)
    start, skip, history, states = point.epochs_done, point.steps_done, point.history, point.seed_states
    with strategy_scope(ctx.strategy):
        model = state.restore(point.backup) if point.backup else state.build()
    check_model_name(run.task, model.name)
    epochs = cfg["epochs"]

    # Checkpoints are taken here, at their step, and written by a thread of their own while
    # training goes on (`BackupWriter`): the next one waits for it, and so does every way out.
    backups = BackupWriter(run)

    def save_mid_epoch(epoch: int, steps_done: int) -> None:
        backups.save(epoch, history, state.files(model), steps_done=steps_done,
                     extra={"seed_states": seed_states(model), "metric_states": metric_states(model),
                            **soundness(watcher.loss, watcher.extent)})

    build_before_fit(model, ctx.strategy, train_data(start))
    engine = [keras_workarounds.epoch_tensorboard_class()(log_dir=str(run.logs_dir), profile_batch=0)] if tensorboard else []
    reporter.start(epochs, initial_epoch=start)
    with StopOnSignal() as stop:
        watcher = step_watcher_class()(reporter, steps_per_epoch, stop, save_mid_epoch, cfg.get("save_every_steps", 0),
                                       backups, seed)

        def end_epoch(epoch: int, logs: dict, save: bool) -> None:
            history.append({"epoch": epoch + 1, **logs})
            if save:
                rows = list(history)
                backups.save(epoch + 1, history, state.files(model), extra=soundness(logs.get("loss"), watcher.extent),
                             then=lambda rows=rows: run.write_history(rows))
            reporter.end_epoch(epoch, logs)

        # The workers of a cluster save the same epochs, so their clocks do not decide.
        interval = cfg.get("save_interval_seconds", 0) if ctx.strategy is None else 0
        checkpoint = epoch_checkpoint_class()(watcher, end_epoch, epochs, interval, backups.seconds_since_save)
        try:
            for first, end, data, skipped in fit_calls(train_data, start, skip, epochs, steps_per_epoch):
                if skipped:
                    watcher.resume_within(skipped, states, point.metric_states)
                else:
                    watcher.whole_epochs()
                steps = steps_per_epoch - skipped if steps_per_epoch else None
                try:
                    model.fit(
                        without_autotune_thread(data),
                        validation_data=without_autotune_thread(val_data),
                        initial_epoch=first,
                        epochs=end,
                        steps_per_epoch=steps,
                        callbacks=keras_workarounds.step_callbacks_class()(
                            [watcher, *engine, *callbacks, checkpoint], model=model, verbose=0, epochs=end, steps=steps),
                        shuffle=False,  # train_data(epoch) is already shuffled, by (seed, epoch)
                        verbose=0,
                    )
                except tf.errors.OpError as exc:
                    backups.wait(raise_error=False)
                    raise_op_error(exc, ctx, watcher.epoch)
                backups.wait()  # a stop or a NaN names (or removes) checkpoints: all of them in place
                # a NaN or a mid-epoch stop; or a signal in an epoch's last step, once that epoch is saved
                watcher.raise_if_stopped(run, epoch_done=checkpoint.epochs_done)
                if model.stop_training:  # a task's callback ended training
                    break
        except BaseException:
            backups.wait(raise_error=False)  # the checkpoint in flight completes before the error goes up
            raise
        finally:
            reporter.finish()
        backups.wait()
    if start >= epochs:  # stopped after its last checkpoint: history.csv may lack the last row
        ClusterWait.joined()
        run.write_history(history)
    last = run.latest_backup()
    for name, final in state.outputs().items():
        link_or_copy(last / name, run.file(final))
    return model, history
