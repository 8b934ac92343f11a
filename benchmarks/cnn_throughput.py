"""Training throughput of task cnn: dlcli's training path against a plain Keras script.

Both sides train the same model (default and course) on the same in-memory uint8 images
with the same batch size, for `--epochs` epochs of `--steps` steps; the first epoch
(graph tracing) is not timed. The dlcli side is `dlcli.tasks.cnn.train` itself, with its
data source replaced by the arrays: its tf.data pipeline, `training.fit` (one `fit` call
per epoch, a checkpoint after each, reporter and TensorBoard callbacks, the learning-rate
schedule). The plain side is `model.fit` over a hand-written pipeline. The toolkit's
overhead is the drop in images/s; it should stay under 10%.

    python benchmarks/cnn_throughput.py                     # random images
    python benchmarks/cnn_throughput.py --folder /path/to/cifar10 --steps 300
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dlcli.engine.lazy import import_tensorflow_quietly  # noqa: E402

import_tensorflow_quietly()

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from dlcli.engine import training  # noqa: E402
from dlcli.runs.run import Run  # noqa: E402
from dlcli.tasks import Context, cnn  # noqa: E402

RECIPES = {"default": {"batch_size": cnn.DEFAULTS["batch_size"], "lr": cnn.DEFAULTS["lr"]},
           "course": {"batch_size": 32, "lr": 5e-3}}


class EpochClock:
    """Records when each epoch ends; stands in for dlcli's reporter and as a Keras callback."""

    def __init__(self):
        self.ends: list[float] = []
        self.console = None
        self.live = False  # no progress bar: the shared loop then reads metrics only where needed

    def end_epoch(self, epoch, logs=None):
        self.ends.append(time.perf_counter())

    def start(self, *a, **k):
        self.ends = [time.perf_counter()]

    info = warn = start_epoch = batch = finish = table = lambda self, *a, **k: None

    def images_per_second(self, images_per_epoch: int) -> float:
        timed = self.ends[2:]  # epochs after the first
        return images_per_epoch * len(timed) / (timed[-1] - self.ends[1])


def plain_keras(model, x, y, batch_size: int, epochs: int, seed: int) -> float:
    """The hand-written baseline: tf.data + model.fit, nothing else."""
    clock = EpochClock()
    clock.start()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).cache().shuffle(len(x), seed=seed)
    ds = ds.batch(batch_size).map(lambda a, b: (tf.cast(a, tf.float32) / 255.0 - 0.5, tf.one_hot(b, 10)),
                                  num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    callback = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: clock.end_epoch(epoch))
    model.fit(ds, epochs=epochs, callbacks=[callback], shuffle=False, verbose=0)
    return clock.images_per_second(len(x))


def through_dlcli(cfg: dict, x, y, classes, root: Path) -> float:
    """`cnn.train` on the arrays (no validation; a one-batch test split)."""
    clock = EpochClock()
    original = cnn.load_split
    cnn.load_split = lambda _cfg, which: (x, y, classes) if which == "train" else (x[:64], y[:64], classes)
    try:
        run = Run.create(root, "cnn", f"bench-{cfg['model']}")
        cnn.train(Context(cfg=cfg, run=run, reporter=clock))
    finally:
        cnn.load_split = original
    return clock.images_per_second(len(x))


def load_images(folder: str | None, n: int, seed: int):
    rng = np.random.default_rng(seed)
    if folder is None:
        return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n), cnn.CIFAR10_CLASSES
    x, y, classes = cnn.load_split({**cnn.DEFAULTS, "dataset": f"folder:{folder}"}, "train")
    if len(x) < n:
        raise SystemExit(f"{folder} has {len(x)} training images; --steps x batch needs {n}")
    pick = rng.permutation(len(x))[:n]
    return x[pick], y[pick], classes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["default", "course"], choices=list(RECIPES))
    parser.add_argument("--steps", type=int, default=200, help="steps per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per side; the first is not timed")
    parser.add_argument("--folder", help="an image folder with train/<class>/ (CIFAR-10) instead of random images")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first epoch is not timed)")

    print(f"{'model':8} {'batch':>5} {'plain keras img/s':>18} {'dlcli img/s':>12} {'dlcli/plain':>12}")
    worst = 1.0
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            recipe = RECIPES[name]
            x, y, classes = load_images(args.folder, args.steps * recipe["batch_size"], args.seed)
            cfg = {**cnn.DEFAULTS, **recipe, "model": name, "epochs": args.epochs, "val_size": 0, "seed": args.seed}
            training.set_seed(args.seed)
            plain = plain_keras(cnn.build_model(cfg, len(classes), x), x, y, recipe["batch_size"], args.epochs, args.seed)
            dlcli = through_dlcli(cfg, x, y, classes, Path(tmp))
            ratio = dlcli / plain
            worst = min(worst, ratio)
            print(f"{name:8} {recipe['batch_size']:>5} {plain:>18.0f} {dlcli:>12.0f} {ratio:>12.3f}", flush=True)
    print(f"toolkit overhead: {100 * (1 - worst):.1f}% at worst ({'within' if worst >= 0.9 else 'OVER'} the 10% budget)")


if __name__ == "__main__":
    main()
