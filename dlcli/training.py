"""The Keras training loop every Keras task shares.

`fit` runs `model.fit` one epoch at a time so that each epoch is a checkpoint: after
every epoch (and every `save_every_steps` steps, and on SIGINT/SIGTERM) it writes a
checkpoint directory (model with optimizer state, the history so far) under `backup/`,
renamed into place when complete, so a killed process leaves only complete checkpoints.
`--resume` loads the newest one and carries on. Each epoch's shuffle order and dropout
noise are derived from (seed, epoch), which is what makes a resumed run give the same
history as an uninterrupted one, to the last digit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import zipfile
from pathlib import Path
from typing import Callable, Iterable

from dlcli.errors import RunError, UsageError
from dlcli.interrupts import Interrupted, StopOnSignal
from dlcli.lazy import lazy_import
from dlcli.runs import link_or_copy

keras = lazy_import("keras")
tf = lazy_import("tensorflow")


def keras_defaults() -> dict:
    """Config keys of every Keras task, beside `common_defaults`.

    jit_compile: XLA; off by default because on CPU it measured about 6x slower here.
    save_every_steps: also checkpoint inside an epoch every N steps (0: at epoch ends only).
    """
    return {"jit_compile": False, "save_every_steps": 0, "strategy": "default"}


def cluster_task() -> tuple[str, int, bool]:
    """(task type, task index, whether the cluster has a chief) from TF_CONFIG."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return "chief", 0, True
    try:
        tf_config = json.loads(raw)
        task = tf_config["task"]
        return task["type"], int(task["index"]), "chief" in tf_config["cluster"]
    except (ValueError, KeyError, TypeError):
        raise UsageError("TF_CONFIG is not valid: expected {\"cluster\": {...}, \"task\": {\"type\": ..., \"index\": ...}}") from None


def is_chief() -> bool:
    """Only the chief writes checkpoints and logs: the "chief" task, else worker 0."""
    kind, index, has_chief = cluster_task()
    return kind == "chief" or (kind == "worker" and index == 0 and not has_chief)


def cpu_replicas() -> int:
    """DLCLI_CPU_REPLICAS=N: with `mirrored` and no GPU, mirror over N logical CPU devices."""
    raw = os.environ.get("DLCLI_CPU_REPLICAS", "").strip()
    if not raw:
        return 0
    if not raw.isdigit() or int(raw) < 1:
        raise UsageError(f"DLCLI_CPU_REPLICAS must be a positive whole number, got {raw!r}")
    return int(raw)


DEFAULT_WORKER_TIMEOUT = 600.0


def worker_timeout() -> float:
    """DLCLI_WORKER_TIMEOUT=SECONDS: how long a worker waits for the others to join (600)."""
    raw = os.environ.get("DLCLI_WORKER_TIMEOUT", "").strip()
    if not raw:
        return DEFAULT_WORKER_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (0 < value < float("inf")):
        raise UsageError(f"DLCLI_WORKER_TIMEOUT must be a positive number of seconds, got {raw!r}")
    return value


class ClusterWait:
    """Bounds the wait for the other workers: from the strategy's creation to the end of the
    first training step (the first step every worker must take together). TensorFlow waits
    inside C++ code that holds the GIL, where neither a Python thread nor a signal handler
    runs, so a watchdog process does it: past the timeout it says what the worker waited
    for, on stderr, and kills the worker (exit status 137)."""

    current: "ClusterWait | None" = None

    def __init__(self, timeout: float, what: str):
        import subprocess
        import sys

        message = (f"error: waited {timeout:g} s for {what} and the cluster never took its first step together; "
                   "start every worker (the same --run, and on --resume a --checkpoint-dir they all share), "
                   "or give them longer with DLCLI_WORKER_TIMEOUT=SECONDS")
        watchdog = ("import os, sys, time; time.sleep(float(sys.argv[2])); "
                    "sys.stderr.write(sys.argv[3] + '\\n'); sys.stderr.flush(); os.kill(int(sys.argv[1]), 9)")
        self.process = subprocess.Popen([sys.executable, "-c", watchdog, str(os.getpid()), str(timeout), message],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        ClusterWait.current = self

    @classmethod
    def joined(cls) -> None:
        if cls.current is not None:
            cls.current.process.kill()
            cls.current.process.wait()
            cls.current = None


def make_strategy(name: str, say: Callable[[str], None] | None = None):
    """The tf.distribute strategy for `--set strategy=...` (validated by the config);
    create it before any other TensorFlow work, as multi-worker training requires.
    Multi-worker: `say` is told what the worker waits for, and the wait is bounded."""
    if name == "mirrored":
        replicas = cpu_replicas()
        if replicas > 1 and not tf.config.list_physical_devices("GPU"):
            # No GPU: split the CPU into logical devices, one replica each (how multi-replica
            # code paths are tested on a machine without GPUs).
            cpu = tf.config.list_physical_devices("CPU")[0]
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
            return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)])
        return tf.distribute.MirroredStrategy()
    if name == "multi-worker":
        if not os.environ.get("TF_CONFIG"):
            raise UsageError("strategy multi-worker needs TF_CONFIG describing the cluster (see the README)")
        kind, index, _ = cluster_task()  # validate it
        workers = json.loads(os.environ["TF_CONFIG"]).get("cluster", {})
        others = [f"{role} {i} ({address})" for role, addresses in workers.items() for i, address in enumerate(addresses)
                  if (role, i) != (kind, index)]
        what = "the other workers of the cluster: " + ", ".join(others)
        timeout = worker_timeout()
        if say is not None:
            say(f"{kind} {index}: waiting for {what} (at most {timeout:g} s, DLCLI_WORKER_TIMEOUT)")
        create = tf.distribute.MultiWorkerMirroredStrategy  # imports TensorFlow first: its time does not count
        ClusterWait(timeout, what)
        return create()  # waits here (and in the first step) for every worker
    return None


PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")


def cpu_has_bfloat16() -> bool:
    """Whether this x86 CPU multiplies bfloat16 natively (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


@contextlib.contextmanager
def precision(name: str):
    """Build layers under a Keras dtype policy (`auto`: mixed_bfloat16 on a CPU-only machine
    whose CPU has bfloat16 instructions, float32 elsewhere). The policy is saved with each
    layer, so a loaded model computes as it was trained; the global policy is restored."""
    if name == "auto":
        name = "mixed_bfloat16" if not tf.config.list_physical_devices("GPU") and cpu_has_bfloat16() else "float32"
    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield name
    finally:
        keras.config.set_dtype_policy(before)


def set_seed(seed: int | None) -> None:
    """Seed Python, NumPy and TensorFlow, and ask TensorFlow for deterministic kernels."""
    if seed is None:
        return
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def epoch_seed(seed: int | None, epoch: int) -> int | None:
    return None if seed is None else seed * 100_003 + epoch


def array_epochs(x, y, batch_size: int, seed: int | None):
    """Training data from in-memory arrays, as `fit` wants it: (train_data(epoch), steps).

    Each epoch draws a permutation from (seed, epoch) and gathers whole batches from the
    arrays, which costs far less per step than shuffling examples one at a time.
    """
    import numpy as np

    xs, ys = tf.constant(x), tf.constant(y)

    def train_data(epoch: int):
        order = np.random.default_rng(epoch_seed(seed, epoch)).permutation(len(x))
        batches = tf.data.Dataset.from_tensor_slices(order).batch(batch_size)
        gather = batches.map(lambda i: (tf.gather(xs, i), tf.gather(ys, i)), num_parallel_calls=tf.data.AUTOTUNE)
        return gather.prefetch(tf.data.AUTOTUNE)

    return train_data, -(-len(x) // batch_size)


def decay_per_epoch(lr: float, decay: float):
    """The learning rate times `decay` each epoch (a function of the epoch: resume-safe)."""
    return keras.callbacks.LearningRateScheduler(lambda epoch: lr * decay**epoch)


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


def seed_states(model) -> list[list[int]]:
    return [[int(v) for v in gen.state.numpy()] for gen in _seed_generators(model)]


def restore_seed_states(model, states: list[list[int]]) -> None:
    import numpy as np

    for gen, state in zip(_seed_generators(model), states):
        gen.state.assign(np.array(state, dtype=gen.state.dtype))


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
    import numpy as np

    return all(np.isfinite(v.numpy()).all() for v in model.weights)


# The running mean loss stays NaN once a step made it so: checking every few steps is enough
# (and at every step that saves a checkpoint).
NAN_CHECK_EVERY = 20


class StepWatcher:
    """Builds the Keras callback that feeds the reporter, checks the loss every few steps,
    honours SIGINT/SIGTERM and saves a mid-epoch checkpoint every `save_every` steps.

    It must come first in `model.fit`'s callbacks: at an epoch's end it checks the epoch
    (finite training logs and weights) before the per-epoch extras (`after_each_epoch`) run,
    and a failed check stops training, which tells the extras to skip the epoch."""

    def __init__(self, reporter, steps: int | None, stop, save_mid_epoch: Callable[[int, int], None], save_every: int = 0):
        watcher = self
        self.bad_loss_at: tuple[int, int] | None = None
        self.bad_weights_at: int | None = None
        self.stopped_at: tuple[int, int] | None = None

        class _Callback(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                watcher.epoch = epoch
                watcher.done = watcher.skipped
                reporter.start_epoch(epoch, steps)

            def on_epoch_end(self, epoch, logs=None):
                if self.model.stop_training:  # cut short: raise_if_stopped says why
                    return
                train_logs = [v for k, v in (logs or {}).items() if not k.startswith("val_")]
                if not all(math.isfinite(float(v)) for v in train_logs):
                    watcher.bad_loss_at = (epoch, watcher.done)
                    self.model.stop_training = True
                elif not all_finite(self.model):  # no checkpoint of non-finite weights
                    watcher.bad_weights_at = epoch
                    self.model.stop_training = True

            def on_train_batch_end(self, batch, logs=None):
                ClusterWait.joined()  # the workers took their first step together
                if watcher.metric_states is not None:  # the running sums of a mid-epoch checkpoint
                    add_metric_states(self.model, watcher.metric_states)
                    watcher.metric_states = None
                done = watcher.done = watcher.skipped + batch + 1
                last_step = steps is not None and done >= steps
                saving = not last_step and (stop.requested or bool(save_every and done % save_every == 0))
                # Reading a metric waits for the step to finish: do it only where it is needed.
                if reporter.live or last_step or saving or done % NAN_CHECK_EVERY == 0:
                    values = {k: float(v) for k, v in (logs or {}).items()}
                    if not math.isfinite(values.get("loss", 0.0)) or (saving and not all_finite(self.model)):
                        watcher.bad_loss_at = (watcher.epoch, done)
                        self.model.stop_training = True
                        return
                    reporter.batch(done - 1, values)
                if saving:
                    if stop.requested:
                        watcher.stopped_at = (watcher.epoch, done)
                        self.model.stop_training = True
                    save_mid_epoch(watcher.epoch, done)

        self.skipped = 0
        self.metric_states = None
        self.stop = stop
        self.callback = _Callback()

    def raise_if_stopped(self, run, epoch_done: int | None = None) -> None:
        """After an epoch's `fit`: raise for a non-finite loss or weights or a mid-epoch stop;
        after the epoch's checkpoint (`epoch_done`), raise if a signal came during its last step."""
        resume = f"continue with `dlcli train {run.task} --run {run.name} --resume`"
        if self.bad_loss_at is not None or self.bad_weights_at is not None:
            kept = run.latest_backup()
            if self.bad_loss_at is not None:
                bad_epoch, step = self.bad_loss_at
                what = f"the loss became NaN or infinite in epoch {bad_epoch + 1}, by step {step}; "
            else:
                what = f"the weights became NaN or infinite in epoch {self.bad_weights_at + 1}; "
            raise RunError(what + (f"the last good checkpoint is {kept}" if kept else "no checkpoint was saved yet")
                           + " (try a lower --lr)")
        name = self.stop.signal_name
        if self.stopped_at is not None:
            stop_epoch, step = self.stopped_at
            raise Interrupted(name, f"stopped by {name} at epoch {stop_epoch + 1}, step {step}; progress saved "
                                    f"in {run.latest_backup()}; {resume}")
        if epoch_done is not None and self.stop.requested:
            raise Interrupted(name, f"stopped by {name} after epoch {epoch_done}; progress saved; {resume}")

    def data_for(self, epoch: int, start: int, skip: int, data, model, states, metrics=None):
        """The epoch's data, less the batches a mid-epoch checkpoint had already trained on
        (whose random layers' states and metric sums it restores); sets `skipped`."""
        self.skipped = skip if epoch == start else 0
        if not self.skipped:
            return data
        restore_seed_states(model, states or [])
        self.metric_states = metrics
        return data.skip(self.skipped)


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
    inner = model_config.get("config") if isinstance(model_config, dict) else None
    if not isinstance(inner, dict):
        raise UsageError(f"checkpoint {path} is not a Keras model file (its config.json describes no model)")
    name = str(inner.get("name", ""))
    if task and not name.startswith(f"{task}_"):
        raise UsageError(f"checkpoint {path} holds model {name!r}, not a {task} model")
    try:
        return keras.models.load_model(path, safe_mode=True, compile=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot load checkpoint {path}: {first}") from None


def strategy_scope(strategy):
    """Where models and optimizers are built: the strategy's scope, or nothing special."""
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


@dataclasses.dataclass
class ResumePoint:
    """Where training starts: a checkpoint and the state saved with it, or the beginning."""

    backup: Path | None = None
    epochs_done: int = 0
    steps_done: int = 0  # batches of epoch `epochs_done + 1` already trained (a mid-epoch checkpoint)
    history: list = dataclasses.field(default_factory=list)
    seed_states: list | None = None
    metric_states: list | None = None  # the running sums of the interrupted epoch's metrics


def resume_point(ctx) -> ResumePoint:
    """With --resume, the newest checkpoint (on a worker other than the chief, the chief's);
    refuses a run that has already done `epochs` epochs."""
    source = ctx.resume_from or ctx.run
    backup = source.latest_backup() if ctx.resume else None
    if backup is None:
        return ResumePoint()
    state = source.read_backup_state(backup)
    point = ResumePoint(backup, state["epochs_done"], state.get("steps_done", 0), state["history"],
                        state.get("seed_states"), state.get("metric_states"))
    start, skip = point.epochs_done, point.steps_done
    source.refuse_if_done(start, ctx.cfg["epochs"])
    if start >= ctx.cfg["epochs"]:
        ctx.reporter.info(f"{ctx.run.dir} had trained all {start} epochs when it stopped; finishing it")
    else:
        ctx.reporter.info(f"resuming {ctx.run.dir} after epoch {start}" + (f", step {skip} of epoch {start + 1}" if skip else ""))
    return point


def build_before_fit(model, strategy, dataset) -> None:
    """Work around keras-team/keras#20585, Keras 3's fit() under MultiWorkerMirroredStrategy
    (a no-op under any other strategy).

    Two steps of Keras fail there: building the optimizer by reducing a distributed data
    batch, and averaging scalar metrics across workers with `axis=0`. Build once from a
    local batch, and average scalars over replicas with `axis=None`.
    """
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return
    from keras.src.backend.tensorflow import trainer

    batch = next(iter(dataset))
    with strategy.scope():
        model._symbolic_build(data_batch=batch)
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None
    if getattr(trainer.reduce_per_replica, "dlcli_patched", False):
        return
    original = trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and reduction in ("auto", "mean"):
            return tf.nest.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return original(values, strategy, reduction)

    reduce_per_replica.dlcli_patched = True
    trainer.reduce_per_replica = reduce_per_replica


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


def after_each_epoch(action: Callable[[object, int, dict], None]):
    """A per-epoch extra as a Keras callback: `action(model, epoch, logs)` runs after each
    epoch that trained all its steps with finite logs and weights, before its checkpoint
    (not after an epoch a signal or a NaN cut short). What it adds to `logs` lands in the
    epoch's history row; what it writes must be resume-safe (a function of the epoch)."""

    class _AfterEachEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if not self.model.stop_training and logs is not None:
                action(self.model, epoch, logs)

    return _AfterEachEpoch()


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
    of an epoch skips the batches it had already trained on. `callbacks` go to every epoch's
    `model.fit` after the engine's own; `tensorboard` writes logs/ for TensorBoard.
    """
    cfg, run, reporter = ctx.cfg, ctx.run, ctx.reporter
    state = build_model if isinstance(build_model, CheckpointState) else CheckpointState(build_model, model_file)
    seed = cfg.get("seed")
    point = resume_point(ctx)
    start, skip, history, states = point.epochs_done, point.steps_done, point.history, point.seed_states
    with strategy_scope(ctx.strategy):
        model = state.restore(point.backup) if point.backup else state.build()
    epochs = cfg["epochs"]

    def save_mid_epoch(epoch: int, steps_done: int) -> None:
        run.save_backup(epoch, history, state.files(model), steps_done=steps_done,
                        extra={"seed_states": seed_states(model), "metric_states": metric_states(model)})

    build_before_fit(model, ctx.strategy, train_data(start))
    engine = [keras.callbacks.TensorBoard(log_dir=str(run.logs_dir), profile_batch=0)] if tensorboard else []
    reporter.start(epochs, initial_epoch=start)
    with StopOnSignal() as stop:
        watcher = StepWatcher(reporter, steps_per_epoch, stop, save_mid_epoch, cfg.get("save_every_steps", 0))
        try:
            for epoch in range(start, epochs):
                reseed_model(model, seed, epoch)
                data = watcher.data_for(epoch, start, skip, train_data(epoch), model, states, point.metric_states)
                steps = steps_per_epoch - watcher.skipped if steps_per_epoch else None
                try:
                    result = model.fit(
                        data,
                        validation_data=val_data,
                        initial_epoch=epoch,
                        epochs=epoch + 1,
                        steps_per_epoch=steps,
                        callbacks=[watcher.callback, *engine, *callbacks],
                        shuffle=False,  # train_data(epoch) is already shuffled, by (seed, epoch)
                        verbose=0,
                    )
                except tf.errors.OpError as exc:
                    raise_op_error(exc, ctx, epoch)
                watcher.raise_if_stopped(run)
                logs = {k: float(v[-1]) for k, v in result.history.items()}
                history.append({"epoch": epoch + 1, **logs})
                run.save_backup(epoch + 1, history, state.files(model))
                run.write_history(history)
                reporter.end_epoch(epoch, logs)
                watcher.raise_if_stopped(run, epoch_done=epoch + 1)
        finally:
            reporter.finish()
    if start >= epochs:  # stopped after its last checkpoint: history.csv may lack the last row
        ClusterWait.joined()
        run.write_history(history)
    last = run.latest_backup()
    for name, final in state.outputs().items():
        link_or_copy(last / name, run.path(final))
    return model, history
