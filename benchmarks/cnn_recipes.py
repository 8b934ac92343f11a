"""cnn recipe ablations: one change at a time on CIFAR-10, test accuracy after each epoch.

A compact stand-in for `dlcli train cnn` that switches the default model's ingredients one
by one (the stem, the augmentation, the block widths, label smoothing, the rate and weight
decay), so that what each buys is measured on the same data, split and seed. It trains on
48,000 training images (2,000 held out by `--seed`, as dlcli holds them out), prints the
plain test accuracy after every epoch (the curve) and, at the end, the test accuracy
without and with test-time augmentation (mirror; mirror and 1-pixel shifts). The learning
rate rises and falls every step (dlcli's one-cycle moves it every epoch). Not a test.
The data is the CIFAR-10 folder under `--data DIR` or `$DLCLI_SHARED_DATA` (the shared
data sets).

    python benchmarks/cnn_recipes.py --stem conv3 --aug bilinear --shift 4 \
        --label-smoothing 0 --lr 0.05 --weight-decay 5e-4 --epochs 15          # the plain baseline
    python benchmarks/cnn_recipes.py --epochs 15 --lr 0.05 --weight-decay 5e-4
    python benchmarks/cnn_recipes.py --widths 64,256,256 --epochs 10 --lr 0.05 --weight-decay 5e-4
    python benchmarks/cnn_recipes.py --stem conv3 --speed 30                  # the cost of a step
    python benchmarks/cnn_recipes.py --epochs 10 --bn-scale fixed --bias-lr 64 --dirac   # airbench's optimisation
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dlcli.engine.lazy import import_tensorflow_quietly  # noqa: E402

import_tensorflow_quietly()

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import layers  # noqa: E402

from benchmarks.common import shared_data  # noqa: E402
from dlcli.engine.precision import precision  # noqa: E402
from dlcli.tasks import cnn  # noqa: E402


class RandomCrop(layers.Layer):
    """Random mirror and a whole-pixel shift of up to `pad` pixels (reflected edges), per
    image, in training only."""

    def __init__(self, pad: int, **kwargs):
        super().__init__(**kwargs)
        self.pad = pad
        self.gen = keras.random.SeedGenerator(1)

    def call(self, x, training=None):
        if not training:
            return x
        n, p = tf.shape(x)[0], self.pad
        x = tf.where(keras.random.uniform((n, 1, 1, 1), seed=self.gen) < 0.5, x[:, :, ::-1], x)
        if p:
            padded = tf.pad(x, [[0, 0], [p, p], [p, p], [0, 0]], mode="REFLECT")
            offsets = keras.random.randint((n, 2), 0, 2 * p + 1, seed=self.gen)
            x = tf.gather(padded, offsets[:, :1] + tf.range(cnn.SIZE)[None], axis=1, batch_dims=1)
            x = tf.gather(x, offsets[:, 1:] + tf.range(cnn.SIZE)[None], axis=2, batch_dims=1)
        return x


class ScaledBias(layers.Layer):
    """x + factor * b, b learnt from 0: SGD then moves the bias factor**2 times as fast as a
    plain one (airbench's faster rate for batch norm's biases), its decay unchanged."""

    def __init__(self, factor: float, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def build(self, shape):
        self.b = self.add_weight(shape=(shape[-1],), initializer="zeros", name="b")

    def call(self, x):
        return x + self.factor * self.b


def dirac_init(conv) -> None:
    """The first in-channels filters of a 3x3 convolution pass their channel through
    (identity), the rest keep their random start (airbench's dirac initialisation)."""
    kernel = conv.kernel.numpy()
    c_in = kernel.shape[2]
    kernel[:, :, :, :c_in] = 0
    kernel[1, 1, np.arange(c_in), np.arange(c_in)] = 1
    conv.kernel.assign(kernel)


def build(args, images):
    def bn_relu(x):
        if args.bn_scale == "learnt" and args.bias_lr == 1:
            return layers.ReLU()(layers.BatchNormalization(momentum=args.bn_momentum)(x))
        x = layers.BatchNormalization(momentum=args.bn_momentum, center=args.bias_lr == 1,
                                      scale=args.bn_scale == "learnt")(x)
        if args.bias_lr != 1:
            x = ScaledBias(math.sqrt(args.bias_lr))(x)
        return layers.ReLU()(x)

    inputs = keras.Input((cnn.SIZE, cnn.SIZE, 3))
    if args.aug == "bilinear":  # fractional shifts, interpolated
        x = layers.RandomFlip("horizontal", dtype="float32")(inputs)
        x = layers.RandomTranslation(args.shift / 32, args.shift / 32, fill_mode="reflect", dtype="float32")(x)
    else:
        x = RandomCrop(args.shift, dtype="float32")(inputs)
    if args.stem == "whiten":
        stem = layers.Conv2D(24, 2, use_bias=False, trainable=False)
        x = layers.ReLU()(stem(x))
        stem.kernel.assign(cnn.whitening_kernel(images))
    else:
        x = bn_relu(layers.Conv2D(24, 3, padding="same", use_bias=False)(x))
    convs = []
    for filters in args.widths:
        convs += [layers.Conv2D(filters, 3, padding="same", use_bias=False), layers.Conv2D(filters, 3, padding="same", use_bias=False)]
        x = bn_relu(layers.MaxPooling2D()(convs[-2](x)))
        x = bn_relu(convs[-1](x))
    outputs = layers.Dense(10, activation="softmax", dtype="float32")(layers.GlobalMaxPooling2D()(x))
    model = keras.Model(inputs, outputs)
    if args.dirac:
        for conv in convs:
            dirac_init(conv)
    return model


class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """lr/10 -> lr over the first `warmup` of the steps, then a cosine down to lr/100."""

    def __init__(self, lr: float, total: int, warmup: float):
        self.lr, self.total, self.warmup = lr, total, warmup

    def __call__(self, step):
        t = tf.cast(step, tf.float32) / self.total
        rise = self.lr * (0.1 + 0.9 * t / self.warmup)
        u = tf.minimum((t - self.warmup) / (1 - self.warmup), 1.0)
        return tf.where(t < self.warmup, rise, self.lr * (0.01 + 0.99 * 0.5 * (1 + tf.cos(math.pi * u))))


def accuracy(model, views, y) -> float:
    probs = np.mean([model.predict(v, batch_size=1000, verbose=0) for v in views], axis=0)
    return round(float((probs.argmax(1) == y).mean()), 4)


def time_steps(model, x, y, args) -> None:
    batches = (tf.data.Dataset.from_tensor_slices((x[: 8 * args.batch_size], y[: 8 * args.batch_size]))
               .batch(args.batch_size).map(lambda a, b: (cnn.scale(a), tf.one_hot(b, 10))).cache().repeat())
    model.fit(batches, steps_per_epoch=10, epochs=1, verbose=0)  # tracing
    wall, cpu = time.perf_counter(), time.process_time()
    model.fit(batches, steps_per_epoch=args.speed, epochs=1, verbose=0)
    images = args.speed * args.batch_size
    print(json.dumps({"images_per_s": round(images / (time.perf_counter() - wall)),
                      "images_per_cpu_s": round(images / (time.process_time() - cpu)), "args": vars(args)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="the shared data folder (its cifar10/); default: $DLCLI_SHARED_DATA")
    parser.add_argument("--widths", type=lambda s: [int(w) for w in s.split(",")], default=[48, 96, 192])
    parser.add_argument("--stem", choices=["whiten", "conv3"], default="whiten")
    parser.add_argument("--aug", choices=["crop", "bilinear"], default="crop")
    parser.add_argument("--shift", type=int, default=2)
    parser.add_argument("--label-smoothing", type=float, default=0.2)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=5e-3)
    parser.add_argument("--warmup", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bn-scale", choices=["learnt", "fixed"], default="learnt", help="batch norm's scale (fixed: 1)")
    parser.add_argument("--bias-lr", type=float, default=1, help="batch norm's bias learns this many times faster")
    parser.add_argument("--bn-momentum", type=float, default=0.9)
    parser.add_argument("--dirac", action="store_true", help="identity-initialise the blocks' convolutions")
    parser.add_argument("--precision", default="auto", choices=["auto", "float32", "mixed_bfloat16"])
    parser.add_argument("--speed", type=int, default=0, metavar="STEPS",
                        help="only time STEPS training steps: images per second of wall and of CPU time "
                             "(the CPU figure compares recipes measured on busy cores)")
    args = parser.parse_args()

    data = shared_data(args.data)
    folder = data / "cifar10" if data else None
    if folder is None or not folder.is_dir():
        raise SystemExit("no CIFAR-10 folder: give --data DIR (with cifar10/) or set DLCLI_SHARED_DATA")
    keras.utils.set_random_seed(args.seed)
    cfg = {**cnn.DEFAULTS, "dataset": f"folder:{folder}"}
    x, y, _ = cnn.load_split(cfg, "train")
    x_test, y_test, _ = cnn.load_split(cfg, "test")
    (x, y), _ = cnn.split_validation(x, y, cnn.DEFAULTS["val_size"], args.seed)

    with precision(args.precision):  # auto: bfloat16 where the CPU has AMX, as dlcli's default
        model = build(args, x)
    total = args.epochs * -(-len(x) // args.batch_size)
    model.compile(keras.optimizers.SGD(OneCycle(args.lr, total, args.warmup), momentum=0.9, nesterov=True,
                                       weight_decay=args.weight_decay),
                  keras.losses.CategoricalCrossentropy(label_smoothing=args.label_smoothing), metrics=["accuracy"])
    if args.speed:
        return time_steps(model, x, y, args)
    test = cnn.scale(x_test)
    started = time.perf_counter()
    for epoch in range(args.epochs):
        ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=args.seed * 1000 + epoch)
        ds = ds.batch(args.batch_size).map(lambda a, b: (cnn.scale(a), tf.one_hot(b, 10)), num_parallel_calls=tf.data.AUTOTUNE)
        history = model.fit(ds.prefetch(tf.data.AUTOTUNE), initial_epoch=epoch, epochs=epoch + 1, verbose=0)
        print(json.dumps({"epoch": epoch + 1, "minutes": round((time.perf_counter() - started) / 60, 2),
                          "train_accuracy": round(history.history["accuracy"][-1], 4),
                          "test_accuracy": accuracy(model, [test], y_test)}), flush=True)
    views = cnn.tta_views(test, {"tta": True, "tta_shift": 1})  # the image, its mirror, both shifted
    print(json.dumps({"test_accuracy": accuracy(model, [test], y_test), "with_mirror": accuracy(model, views[:2], y_test),
                      "with_mirror_and_shifts": accuracy(model, views, y_test), "args": vars(args)}), flush=True)


if __name__ == "__main__":
    main()
