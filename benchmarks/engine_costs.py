"""What the training engine costs beside a plain `model.fit`, one suspect at a time.

The suite's training rows compare a whole `dlcli train` process with a plain Keras process,
minutes apart, and these cores move 10-30 % between minutes. Each check here puts the two
sides of one suspect next to each other, interleaved, so that drift hits both alike:

    python benchmarks/engine_costs.py determinism --data DIR
        Plain `model.fit` of mnist's and names' models in fresh processes, with and without
        `enable_op_determinism` (which exact resume needs), alternating: examples/s each.
    python benchmarks/engine_costs.py cross-entropy --data DIR
        In one process, what op determinism costs inside the training step: mnist's and names'
        models on dlcli's data pipeline (and mnist's on arrays, `fit(x, y)`) with determinism
        and TensorFlow's composite cross-entropy, with determinism and the fused kernel (what
        dlcli runs on CPUs, `keras_workarounds.fused_cross_entropy_on_cpu`), and without
        determinism, a model each, an epoch each in turn: seconds per epoch.
    python benchmarks/engine_costs.py loop --data DIR
        In one process, blocks of mnist epochs: plain `model.fit` on the arrays against the
        engine's loop (`fit` calls on the epochs' `array_epochs` data sets as `training.fit_calls`
        joins them, reseeding, the step watcher,
        TensorBoard, the rate schedule; no checkpoint): seconds per epoch each.
    python benchmarks/engine_costs.py autotune --data DIR
        In one process, a `model.fit` per mnist epoch on `array_epochs` data with tf.data's
        autotuner on (TensorFlow's default) and off (what `training.fit` hands Keras),
        alternating: each epoch's seconds and how long `fit` took to return after its last
        step (deleting an autotuned iterator waits out the autotuner's sleep). Then cnn's
        `model.predict` on 1,700 images in memory, Keras's data set of arrays as shipped and
        as dlcli patches it, alternating: seconds a call.
    python benchmarks/engine_costs.py precision
        What `precision: auto` decides: in one process, float32 against mixed_bfloat16,
        alternating, on random data of the real shapes: gan training steps (faces/s) and cnn's
        default model (`--width W` for another width), training and predict (examples/s).
        Prints whether the CPU has AMX and what `auto` picks.
    python benchmarks/engine_costs.py save
        The checkpoint: `model.save` (model and optimizer) and fsync of the autoencoder and
        mnist models, as `Run.save_backup` writes them at each checkpoint.
    python benchmarks/engine_costs.py phases --task TASK --data DIR
        One `dlcli train TASK` in this process on the suite's benchmark data (`run.py`'s
        `train_specs`; `--size realistic` for the full data sets), each phase of every epoch
        timed: the training steps, the validation pass, each callback's epoch end (the step
        watcher, TensorBoard, the tasks' `after_each_epoch` extras, the engine's checkpoint:
        taking it, `BackupWriter.save`, and the epoch's line), the time until the next epoch
        begins, and the seconds each checkpoint and its history.csv took to write in the
        writer's thread; also the `model.fit` calls and the task's `train_data(epoch)` calls.

DIR is the folder of real data sets (its `mnist/mnist.npz` and `names/course_names.txt`), or
$DLCLI_SHARED_DATA. Not part of `run.py` (each check takes minutes and answers one question);
the README's Performance section quotes them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import PYTHON, child_env, shared_data  # noqa: E402


def _data_spec(task: str, data: str | None) -> dict:
    """The benchmark spec of `task` on the real data set (`workers.task_cfg` resolves it)."""
    shared = shared_data(data)
    if shared is None:
        raise SystemExit("engine_costs needs the real data sets: --data DIR or $DLCLI_SHARED_DATA")
    if task == "mnist":
        return {"flags": {"dataset": f"npz:{shared / 'mnist' / 'mnist.npz'}", "val_size": 2000}}
    return {"flags": {"dataset": f"text:{shared / 'names' / 'course_names.txt'}"}}


def _epoch_seconds(ends: list[float]) -> list[float]:
    """Seconds of each epoch from `workers.plain_fit`'s times since the start of training."""
    return [b - a for a, b in zip([0.0, *ends], ends)]


def reference_rate(task: str, deterministic: bool, spec: dict) -> float:
    """Child side of `determinism`: the suite's plain-Keras reference, examples/s of the median
    epoch after the first."""
    from benchmarks import workers  # imports TensorFlow

    if deterministic:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    result = workers.reference(argparse.Namespace(task=task), spec)
    return result["examples"] / statistics.median(_epoch_seconds(result["epoch_ends"])[1:])


def determinism(args) -> None:
    import subprocess

    spec = {t: _data_spec(t, args.data) for t in ("mnist", "names")}
    for task_spec in spec.values():
        task_spec["flags"]["epochs"] = args.epochs
    rates = {(t, d): [] for t in spec for d in (True, False)}
    for r in range(args.rounds):
        for deterministic in ((True, False) if r % 2 == 0 else (False, True)):
            for task in spec:
                out = subprocess.run([PYTHON, __file__, "_reference", task, str(int(deterministic)),
                                      json.dumps(spec[task])],
                                     env=child_env(), capture_output=True, text=True, check=True)
                rate = float(out.stdout.strip().splitlines()[-1])
                rates[task, deterministic].append(rate)
                print(f"round {r + 1} {task:5s} {'with   ' if deterministic else 'without'} determinism "
                      f"{rate:9,.0f} ex/s", flush=True)
    for task in spec:
        on, off = rates[task, True], rates[task, False]
        print(f"{task}: median {statistics.median(on):,.0f} ex/s with determinism, {statistics.median(off):,.0f} "
              f"without: ratio {statistics.median(on) / statistics.median(off):.2f}")


def cross_entropy(args) -> None:
    from benchmarks import workers  # imports TensorFlow
    from tensorflow.python.framework import config
    from tensorflow.python.ops import nn_ops

    from dlcli.engine import training

    training.set_seed(0)  # determinism, dlcli's fused kernel, and the seed Keras's shuffle then needs
    fused = nn_ops._sparse_softmax_cross_entropy_with_rank_2_logits
    sides = {"determinism, composite": (True, fused.original), "determinism, fused (dlcli)": (True, fused),
             "no determinism": (False, fused.original)}

    def use(deterministic, kernel):  # both are read when Keras traces the step, and by kernels as they run
        (config.enable_op_determinism if deterministic else config.disable_op_determinism)()
        nn_ops._sparse_softmax_cross_entropy_with_rank_2_logits = kernel

    cases = []
    for task in ("mnist", "names"):
        cfg = workers.task_cfg(task, _data_spec(task, args.data))
        (xt, yt), _, build = workers.arrays(task, cfg)
        if task == "mnist":
            train_data, _ = _mnist_epochs(cfg)
            cases.append(("mnist, fit(x, y) on arrays", build, lambda epoch, x=xt, y=yt, batch=cfg["batch_size"]: ((x, y), {"batch_size": batch})))
        else:
            train_data, _ = training.array_epochs(xt, yt, cfg["batch_size"], cfg["seed"])
        cases.append((f"{task}, dlcli's pipeline", build,
                      lambda epoch, data=train_data: ((training.without_autotune_thread(data(epoch)),), {})))
    for case, build, data in cases:
        models = {}
        for side, how in sides.items():
            use(*how)
            models[side] = build()  # traced on its first fit, under its own setting
        seconds = {side: [] for side in sides}
        for r in range(args.rounds + 1):  # round 0 traces and warms up; not counted
            for side in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                use(*sides[side])
                fit_args, fit_kwargs = data(r)
                t = time.perf_counter()
                models[side].fit(*fit_args, **fit_kwargs, epochs=1, verbose=0)
                if r:
                    seconds[side].append(time.perf_counter() - t)
        print(f"{case}: " + ", ".join(f"{side} {statistics.median(v):.2f} s" for side, v in seconds.items())
              + " (median seconds an epoch)", flush=True)
    use(*sides["determinism, fused (dlcli)"])


def _mnist_epochs(cfg: dict):
    """dlcli's mnist training data: the uint8 digits, scaled batch by batch (`mnist.training_epochs`)."""
    from dlcli.tasks import mnist

    (xt, yt), _ = mnist.split_validation(mnist.load_arrays(cfg), cfg["val_size"])
    return mnist.training_epochs(xt, yt, cfg)


def loop(args) -> None:
    spec = _data_spec("mnist", args.data)
    from benchmarks import workers  # imports TensorFlow
    import tensorflow as tf

    from dlcli.engine import keras_workarounds, training

    cfg = workers.task_cfg("mnist", spec)
    training.set_seed(cfg["seed"])  # both sides run with deterministic kernels
    (xt, yt), (xv, yv), build = workers.arrays("mnist", cfg)  # what dlcli train and the suite's reference use
    batch, epochs = cfg["batch_size"], args.epochs
    train_data, steps = _mnist_epochs(cfg)
    val_ds = tf.data.Dataset.from_tensor_slices((xv, yv)).batch(1024).cache()
    logs = tempfile.mkdtemp(prefix="engine-costs-")

    class Quiet:  # the reporter and stop flag the step watcher talks to
        live, requested = False, False

        def start_epoch(self, *a):
            pass

        def batch(self, *a):
            pass

    def plain(model, seconds, first_epoch):
        seconds += _epoch_seconds(workers.plain_fit(model, (xt, yt), (xv, yv), batch, epochs))

    def engine(model, seconds, first_epoch):
        quiet = Quiet()
        for first, end, data, _ in training.fit_calls(train_data, first_epoch, 0, first_epoch + epochs, steps):
            clock = workers.Clock()
            callbacks = keras_workarounds.step_callbacks_class()(
                [training.step_watcher_class()(quiet, steps, quiet, lambda *a: None, seed=cfg["seed"]),
                 keras_workarounds.epoch_tensorboard_class()(log_dir=logs, profile_batch=0),
                 training.decay_per_epoch(cfg["lr"], cfg["lr_decay"]), clock],
                model=model, verbose=0, epochs=end, steps=steps)
            model.fit(training.without_autotune_thread(data), validation_data=training.without_autotune_thread(val_ds),
                      initial_epoch=first, epochs=end, steps_per_epoch=steps, callbacks=callbacks, shuffle=False,
                      verbose=0)
            seconds += _epoch_seconds(clock.ends)

    sides = {"plain model.fit": plain, "engine loop": engine}
    models = {name: build() for name in sides}
    seconds = {name: [] for name in sides}
    for r in range(args.rounds + 1):  # round 0 traces and warms up; not counted
        for name, side in sides.items():
            block = []
            side(models[name], block, r * epochs)
            if r:
                seconds[name] += block
            print(f"round {r} {name:15s} {' '.join(f'{s:.2f}' for s in block)} s", flush=True)
    for name, values in seconds.items():
        print(f"{name}: median {statistics.median(values):.2f} s an epoch, {len(xt) / statistics.median(values):,.0f} ex/s")


def autotune(args) -> None:
    spec = _data_spec("mnist", args.data)
    from benchmarks import workers  # imports TensorFlow
    import keras

    from dlcli.engine import training

    cfg = workers.task_cfg("mnist", spec)
    _, _, build = workers.arrays("mnist", cfg)
    train_data, steps = _mnist_epochs(cfg)

    class LastStep(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            self.at = time.perf_counter()

    sides = {"autotuner on": lambda ds: ds, "autotuner off": training.without_autotune_thread}
    models = {name: build() for name in sides}
    seconds, waits = ({name: [] for name in sides} for _ in range(2))
    for epoch in range(args.rounds * args.epochs + 1):  # epoch 0 traces and warms up; not counted
        for name, data in sides.items():
            last = LastStep()
            t = time.perf_counter()
            models[name].fit(data(train_data(epoch)), initial_epoch=epoch, epochs=epoch + 1, steps_per_epoch=steps,
                             callbacks=[last], shuffle=False, verbose=0)
            end = time.perf_counter()
            if epoch:
                seconds[name].append(end - t)
                waits[name].append(end - last.at)
            print(f"epoch {epoch} {name:13s} {end - t:.2f} s, {end - last.at:.2f} s after the last step", flush=True)
    for name in sides:
        print(f"{name}: median {statistics.median(seconds[name]):.2f} s an epoch, after the last step median "
              f"{statistics.median(waits[name]):.2f} s, max {max(waits[name]):.2f} s")
    predict_on_arrays(args.rounds * args.epochs)


def predict_on_arrays(rounds: int) -> None:
    """Keras's own data set of arrays (`model.predict(x)`) as Keras ships it and as dlcli
    patches it (`keras_workarounds.array_data_without_autotune`): seconds a call, alternating."""
    import numpy as np
    from keras.src.trainers.data_adapters.array_data_adapter import ArrayDataAdapter

    from dlcli.tasks import cnn

    patched = ArrayDataAdapter.get_tf_dataset  # dlcli's, installed at its first use of Keras
    sides = {"as Keras ships it": patched.original, "dlcli's patch": patched}
    model = cnn.build_model({**cnn.DEFAULTS, "precision": "float32"})
    x = np.random.default_rng(0).random((1700, 32, 32, 3), dtype=np.float32)
    model.predict(x, batch_size=256, verbose=0)  # traces
    seconds = {name: [] for name in sides}
    for _ in range(rounds):
        for name, method in sides.items():
            ArrayDataAdapter.get_tf_dataset = method
            t = time.perf_counter()
            model.predict(x, batch_size=256, verbose=0)
            seconds[name].append(time.perf_counter() - t)
    ArrayDataAdapter.get_tf_dataset = patched
    for name, times in seconds.items():
        print(f"cnn model.predict of {len(x):,} images, data set {name}: " + " ".join(f"{t:.2f}" for t in times)
              + f" s; median {statistics.median(times):.2f} s")


def precision(args) -> None:
    from dlcli.engine.lazy import import_tensorflow_quietly

    import_tensorflow_quietly()
    import numpy as np
    import tensorflow as tf

    from dlcli import config as config_lib
    from dlcli.engine.precision import bfloat16_pays, cpu_flags, cpu_has_amx
    from dlcli.tasks import cnn, gan, get_task

    print(f"AMX: {cpu_has_amx()}; bfloat16 instructions (avx512_bf16): "
          f"{'avx512_bf16' in cpu_flags()}; auto picks bfloat16: {bfloat16_pays()}")
    rng = np.random.default_rng(0)
    policies = ("float32", "mixed_bfloat16")
    gan_cfg = config_lib.resolve(get_task("gan").defaults, flags={}, choices=get_task("gan").choices)
    faces = rng.uniform(-1, 1, (16 * gan_cfg["batch_size"], gan_cfg["image_size"], gan_cfg["image_size"], 3))
    faces_ds = tf.data.Dataset.from_tensor_slices(faces.astype("float32")).batch(gan_cfg["batch_size"])
    images = rng.random((2048, 32, 32, 3), dtype=np.float32)
    labels = rng.integers(0, 10, len(images))
    gans, cnns = {}, {}
    for name in policies:  # build, trace and warm up each side once
        gans[name] = gan.new_gan({**gan_cfg, "precision": name})
        gans[name].fit(faces_ds, shuffle=False, verbose=0)
        cnns[name] = cnn.build_model({**cnn.DEFAULTS, "width": args.width or cnn.DEFAULTS["width"], "precision": name})
        cnns[name].compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        cnns[name].fit(images, labels, batch_size=128, verbose=0)
        cnns[name].predict(images, batch_size=256, verbose=0)
    for r in range(args.rounds):
        for name in policies if r % 2 == 0 else policies[::-1]:
            t0 = time.perf_counter()
            gans[name].fit(faces_ds, shuffle=False, verbose=0)
            t1 = time.perf_counter()
            cnns[name].fit(images, labels, batch_size=128, verbose=0)
            t2 = time.perf_counter()
            cnns[name].predict(images, batch_size=256, verbose=0)
            t3 = time.perf_counter()
            print(f"round {r} {name:14s} gan training {len(faces) / (t1 - t0):6.0f} faces/s, cnn training "
                  f"{len(images) / (t2 - t1):5.0f} ex/s, cnn predict {len(images) / (t3 - t2):5.0f} img/s", flush=True)


def save(args) -> None:
    from dlcli.engine.lazy import import_tensorflow_quietly

    import_tensorflow_quietly()
    import numpy as np

    from dlcli import config as config_lib
    from dlcli.runs.files import fsync_file
    from dlcli.tasks import autoencoder, get_task, mnist

    folder = tempfile.mkdtemp(prefix="engine-costs-")
    for name, build in (("autoencoder", autoencoder.build_model), ("mnist", lambda cfg: mnist.build_model(cfg, 10))):
        task = get_task(name)
        cfg = config_lib.resolve(task.defaults, flags={}, choices=task.choices)
        model = build(cfg)
        x = np.random.default_rng(0).random((64, *model.input_shape[1:]), dtype=np.float32)
        y = x if name == "autoencoder" else np.zeros(64, dtype=np.int64)
        model.fit(x, y, verbose=0)  # the optimizer's variables exist, as in a checkpoint
        saves, syncs = [], []
        for i in range(args.rounds + 1):
            path = os.path.join(folder, f"{name}-{i}.keras")
            t0 = time.perf_counter()
            model.save(path)
            t1 = time.perf_counter()
            fsync_file(Path(path))
            if i:  # the first save imports and warms up
                saves.append(t1 - t0)
                syncs.append(time.perf_counter() - t1)
        size = os.path.getsize(path) / 1e6
        print(f"{name}: {model.count_params():,} weights, {size:.1f} MB with the optimizer: model.save median "
              f"{statistics.median(saves):.3f} s (range {min(saves):.3f}-{max(saves):.3f}), fsync "
              f"{statistics.median(syncs):.3f} s")


def phases(args) -> None:
    """Each phase of every epoch of one in-process `dlcli train`, in seconds (see the module doc)."""
    from benchmarks import run as suite

    shared = shared_data(args.data)
    with tempfile.TemporaryDirectory(prefix="engine-costs-") as folder:
        _phases(args, suite, shared, Path(folder))


def _phases(args, suite, shared, tmp: Path) -> None:
    specs = (suite.realistic_specs if args.size == "realistic" else suite.train_specs)(tmp, shared, False, args.epochs)
    spec = specs[args.task]["flags"]

    from dlcli.engine.lazy import import_tensorflow_quietly

    import_tensorflow_quietly()
    import keras

    import dlcli
    from dlcli.engine import keras_workarounds
    from dlcli.engine.progress import Reporter
    from dlcli.runs.run import BackupWriter, PendingBackup

    epochs: list[dict] = []  # a row an epoch, begun at its on_epoch_begin
    calls: list[dict] = []  # a row a `model.fit` call
    now = time.perf_counter

    def timed(owner, name, key, per_callback=False):
        original = getattr(owner, name)

        def wrapper(self, *a, **k):
            if key == "epoch_begin":
                epochs.append({})
            if per_callback:
                epoch_args = a[:-1] if name == "on_epoch_end" else ()
                logs = pythonify_logs(a[-1] if name == "on_epoch_end" else k.get("logs"))
                t0 = now()
                row = epochs[-1]
                for callback in self.callbacks:  # as Keras's list does, each callback timed
                    t = now()
                    getattr(callback, name)(*epoch_args, logs)
                    action = getattr(callback, "action", None)  # an `after_each_epoch` extra: its function
                    label = f"{key}: {getattr(action, '__name__', None) or type(callback).__name__}"
                    row[label] = row.get(label, 0.0) + now() - t
                if name == "on_train_end":
                    self._on_end()
                row[key + "_at"] = (t0, now())
                return None
            t = now()
            result = original(self, *a, **k)
            rows = calls if key == "fit" else epochs
            if key == "fit":
                calls.append({})
            if rows:
                rows[-1][key] = rows[-1].get(key, 0.0) + now() - t
                rows[-1][key + "_at"] = (t, now())
            return result

        setattr(owner, name, wrapper)

    step_list = keras_workarounds.step_callbacks_class()
    pythonify_logs = keras_workarounds.private("keras.src.utils.python_utils", "pythonify_logs", "phases")
    timed(keras.Model, "fit", "fit")
    for name, key in (("on_train_begin", "train_begin"), ("on_epoch_begin", "epoch_begin"),
                      ("on_test_begin", "test_begin"), ("on_test_end", "test_end")):
        timed(step_list, name, key)
    timed(step_list, "on_epoch_end", "epoch end", per_callback=True)
    timed(step_list, "on_train_end", "train end", per_callback=True)
    timed(BackupWriter, "save", "checkpoint")  # in this thread: taking it (its writing goes on beside)
    finishing = PendingBackup.finish
    written = []

    def finish(self):
        t = now()
        try:
            return finishing(self)
        finally:
            written.append(now() - t)

    PendingBackup.finish = finish
    timed(Reporter, "end_epoch", "epoch line")
    from dlcli.engine import training

    engine_fit = training.fit
    made: list[float] = []

    def fit(ctx, build_model, train_data, *a, **k):
        def data(epoch):
            t = now()
            try:
                return train_data(epoch)
            finally:
                made.append(now() - t)

        return engine_fit(ctx, build_model, data, *a, **k)

    training.fit = fit
    flags = {k: v for k, v in spec.items() if k not in ("epochs", "dataset")}
    started = now()
    dlcli.train(args.task, runs_dir=tmp / "runs", run="phases", dataset=spec["dataset"], epochs=spec["epochs"],
                sets=[f"{k}={v}" for k, v in flags.items()])  # as run.py's `dlcli_train` passes them
    print(f"{len(calls)} model.fit call(s) for {len(epochs)} epochs; the task's train_data(epoch), "
          f"{len(made)} calls: {sum(made):.3f} s in all; the whole train {now() - started:.2f} s")
    for call in calls:
        print(f"fit call: {call['fit']:.3f} s", flush=True)
    for i, row in enumerate(epochs):
        begin = row["epoch_begin_at"][0]
        steps_end = row.get("test_begin_at", (None,))[0]
        parts = {}
        if steps_end is not None:
            parts["steps"] = steps_end - row["epoch_begin_at"][1]
            parts["validation"] = row["test_end_at"][1] - steps_end
        elif "epoch end_at" in row:
            parts["steps"] = row["epoch end_at"][0] - row["epoch_begin_at"][1]
        parts.update({k: v for k, v in row.items() if k.startswith("epoch end:")})
        parts.update({k: row[k] for k in ("checkpoint", "epoch line") if k in row})
        following = epochs[i + 1]["epoch_begin_at"][0] if i + 1 < len(epochs) else None
        if following is not None and "epoch end_at" in row:
            parts["until the next epoch begins"] = following - row["epoch end_at"][1]
        total = following - begin if following is not None else None
        print(f"epoch {i + 1}" + (f": {total:.3f} s from its begin to the next's" if total else "") + "; "
              + ", ".join(f"{k} {v:.3f}" for k, v in parts.items() if v is not None and v >= 0.0005), flush=True)
    print("checkpoints finished in the writer's thread: " + ", ".join(f"{s:.3f}" for s in written) + " s")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_reference":  # the child of `determinism`
        task, deterministic, spec = sys.argv[2:5]
        print(reference_rate(task, deterministic == "1", json.loads(spec)))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("check", choices=["determinism", "cross-entropy", "loop", "autotune", "precision", "save", "phases"])
    p.add_argument("--task", default="mnist", help="phases: the task to train (default mnist)")
    p.add_argument("--size", default="small", choices=["small", "realistic"],
                   help="phases: the suite's benchmark data (small) or the full data sets (realistic)")
    p.add_argument("--data", help="folder of the real data sets (default: $DLCLI_SHARED_DATA)")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds (default 4)")
    p.add_argument("--width", type=int, help="precision: the width of cnn's default model (default: the task's)")
    p.add_argument("--epochs", type=int, default=4, help="epochs per process or block (default 4)")
    args = p.parse_args()
    {"determinism": determinism, "cross-entropy": cross_entropy, "loop": loop, "autotune": autotune, "precision": precision, "save": save,
     "phases": phases}[args.check](args)


if __name__ == "__main__":
    main()
