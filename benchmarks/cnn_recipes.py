"""cnn recipe ablations: one change at a time on CIFAR-10, test accuracy after each epoch.

A compact stand-in for `dlcli train cnn` that switches the default model's ingredients one
by one (the stem, the augmentation, the block widths, label smoothing, the rate and weight
decay), so that what each buys is measured on the same data, split and seed. It trains on
48,000 training images (2,000 held out by `--seed`, as dlcli holds them out), prints the
plain test accuracy after every epoch (the curve) and, at the end, the test accuracy
without and with test-time augmentation (mirror; mirror and 1-pixel shifts). Its defaults
are the batch-128 recipe (a one-cycle rate that moves every step); `--airbench` switches to
airbench's optimisation, as `dlcli train cnn` has it except that the rate ends at 0.07 x lr
and the lookahead average (a callback here) also averages batch norm's statistics. Not a
test.
The data is the CIFAR-10 folder under `--data DIR` or `$DLCLI_SHARED_DATA` (the shared
data sets).

    python benchmarks/cnn_recipes.py --stem conv3 --aug bilinear --shift 4 \
        --label-smoothing 0 --lr 0.05 --weight-decay 5e-4 --epochs 15          # the plain baseline
    python benchmarks/cnn_recipes.py --epochs 15 --lr 0.05 --weight-decay 5e-4
    python benchmarks/cnn_recipes.py --widths 64,256,256 --epochs 10 --lr 0.05 --weight-decay 5e-4
    python benchmarks/cnn_recipes.py --stem conv3 --speed 30                  # the cost of a step
    python benchmarks/cnn_recipes.py --epochs 10 --bn-scale fixed --bias-lr 64 --dirac   # three of airbench's ingredients
    python benchmarks/cnn_recipes.py --epochs 10 --airbench                   # all of them
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
from dlcli.engine import custom_objects  # noqa: E402
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


def build(args, images):
    activation = layers.ReLU if args.activation == "relu" else lambda: layers.Activation("gelu")

    def bn_relu(x):
        if args.bn_scale == "learnt" and args.bias_lr == 1:
            return activation()(layers.BatchNormalization(momentum=args.bn_momentum, epsilon=args.bn_epsilon)(x))
        x = layers.BatchNormalization(momentum=args.bn_momentum, epsilon=args.bn_epsilon, center=args.bias_lr == 1,
                                      scale=args.bn_scale == "learnt")(x)
        if args.bias_lr != 1:
            x = custom_objects.register()["ScaledBias"](math.sqrt(args.bias_lr))(x)
        return activation()(x)

    inputs = keras.Input((cnn.SIZE, cnn.SIZE, 3))
    if args.aug == "bilinear":  # fractional shifts, interpolated
        x = layers.RandomFlip("horizontal", dtype="float32")(inputs)
        x = layers.RandomTranslation(args.shift / 32, args.shift / 32, fill_mode="reflect", dtype="float32")(x)
    else:
        x = RandomCrop(args.shift, dtype="float32")(inputs)
    if args.stem == "whiten":
        stem = layers.Conv2D(24, 2, use_bias=False, trainable=False)
        x = activation()(stem(x))
        stem.kernel.assign(cnn.whitening_kernel(images))
    else:
        x = bn_relu(layers.Conv2D(24, 3, padding="same", use_bias=False)(x))
    convs = []
    for filters in args.widths:
        convs += [layers.Conv2D(filters, 3, padding="same", use_bias=False), layers.Conv2D(filters, 3, padding="same", use_bias=False)]
        x = bn_relu(layers.MaxPooling2D()(convs[-2](x)))
        x = bn_relu(convs[-1](x))
    x = layers.GlobalMaxPooling2D()(x)
    if args.logit_scale == 1:
        outputs = layers.Dense(10, activation="softmax", dtype="float32")(x)
    else:  # airbench: no bias, logits scaled down (a lower temperature the rate cannot blow up)
        logits = layers.Dense(10, use_bias=False, dtype="float32")(x)
        outputs = layers.Softmax(dtype="float32")(layers.Rescaling(args.logit_scale, dtype="float32")(logits))
    model = keras.Model(inputs, outputs)
    if args.dirac:  # each conv starts as the identity on its first input channels
        for conv in convs:
            conv.kernel.assign(cnn.identity_start(conv.kernel.numpy()))
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


class Triangle(keras.optimizers.schedules.LearningRateSchedule):
    """airbench's rate: linear from start x lr to lr at `peak` of the steps, then down to end x lr."""

    def __init__(self, lr: float, total: int, start: float = 0.2, peak: float = 0.23, end: float = 0.07):
        self.lr, self.total, self.start, self.peak, self.end = lr, total, start, peak, end

    def __call__(self, step):
        t = tf.cast(step, tf.float32) / self.total
        rise = self.start + (1 - self.start) * t / self.peak
        fall = 1 + (self.end - 1) * (t - self.peak) / (1 - self.peak)
        return self.lr * tf.where(t < self.peak, rise, tf.maximum(fall, self.end))


class Lookahead(keras.callbacks.Callback):
    """airbench's averaged weights: from step `start` on, every `every` steps the weights (and
    batch norm's statistics) move to their running average and are replaced by it, with a
    decay that grows as (step / total)**3, so training moves fast early and averages late;
    at each epoch's end the model takes the average."""

    def __init__(self, total: int, start: int, every: int = 5, base: float = 0.95, power: float = 3.0):
        super().__init__()
        self.total, self.start, self.every, self.base, self.power = total, start, every, base, power
        self.average = None

    def _update(self, decay: float) -> None:
        for mean, variable in zip(self.average, self.model.weights):
            mean += (1 - decay) * (variable.numpy() - mean)
            variable.assign(mean)

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if step < self.start or step % self.every:
            return
        if self.average is None:
            self.average = [v.numpy().astype(np.float32) for v in self.model.weights]
        else:
            self._update(self.base ** self.every * (step / self.total) ** self.power)

    def on_epoch_end(self, epoch, logs=None):
        if self.average is not None:
            self._update(1.0)


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
    parser.add_argument("--bn-epsilon", type=float, default=1e-3)
    parser.add_argument("--dirac", action="store_true", help="identity-initialise the blocks' convolutions")
    parser.add_argument("--activation", choices=["relu", "gelu"], default="relu")
    parser.add_argument("--logit-scale", type=float, default=1, help="scale the logits (airbench: 1/9, no bias)")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--schedule", choices=["one-cycle", "triangle"], default="one-cycle")
    parser.add_argument("--lookahead", type=float, default=0, metavar="EPOCHS",
                        help="average the weights airbench's way from this many epochs on (0: not)")
    parser.add_argument("--airbench", action="store_true",
                        help="airbench94's optimisation: batch 1024, lr 1.5, momentum 0.85, triangle rate, weight "
                             "decay 0.0089 (its 0.0153 per 1024 examples through the momentum), fixed batch-norm "
                             "scale, bias lr x64, batch-norm momentum 0.6, dirac, logits x 1/9, lookahead from epoch 3")
    parser.add_argument("--precision", default="auto", choices=["auto", "float32", "mixed_bfloat16"])
    parser.add_argument("--speed", type=int, default=0, metavar="STEPS",
                        help="only time STEPS training steps: images per second of wall and of CPU time "
                             "(the CPU figure compares recipes measured on busy cores)")
    args = parser.parse_args()
    if args.airbench:
        airbench = dict(batch_size=1024, lr=1.5, momentum=0.85, schedule="triangle", weight_decay=0.0089,
                        bn_scale="fixed", bias_lr=64, bn_momentum=0.6, bn_epsilon=1e-5, dirac=True,
                        logit_scale=1 / 9, lookahead=3)
        for key, value in airbench.items():  # an option set to other than its default wins
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)

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
    steps = -(-len(x) // args.batch_size)
    total = args.epochs * steps
    rate = OneCycle(args.lr, total, args.warmup) if args.schedule == "one-cycle" else Triangle(args.lr, total)
    callbacks = [Lookahead(total, int(args.lookahead * steps))] if args.lookahead else []
    model.compile(keras.optimizers.SGD(rate, momentum=args.momentum, nesterov=True, weight_decay=args.weight_decay),
                  keras.losses.CategoricalCrossentropy(label_smoothing=args.label_smoothing), metrics=["accuracy"])
    if args.speed:
        return time_steps(model, x, y, args)
    test = cnn.scale(x_test)
    started = time.perf_counter()
    for epoch in range(args.epochs):
        ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=args.seed * 1000 + epoch)
        ds = ds.batch(args.batch_size).map(lambda a, b: (cnn.scale(a), tf.one_hot(b, 10)), num_parallel_calls=tf.data.AUTOTUNE)
        history = model.fit(ds.prefetch(tf.data.AUTOTUNE), initial_epoch=epoch, epochs=epoch + 1, verbose=0,
                            callbacks=callbacks)
        print(json.dumps({"epoch": epoch + 1, "minutes": round((time.perf_counter() - started) / 60, 2),
                          "train_accuracy": round(history.history["accuracy"][-1], 4),
                          "test_accuracy": accuracy(model, [test], y_test)}), flush=True)
    views = cnn.tta_views(test, {"tta": True, "tta_shift": 1})  # the image, its mirror, both shifted
    print(json.dumps({"test_accuracy": accuracy(model, [test], y_test), "with_mirror": accuracy(model, views[:2], y_test),
                      "with_mirror_and_shifts": accuracy(model, views, y_test), "args": vars(args)}), flush=True)


if __name__ == "__main__":
    main()
