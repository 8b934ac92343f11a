"""Task `cnn`: a convolutional network for CIFAR-10, trained from scratch.

Week 3, task 1 of the course. Images are 32x32 RGB scaled to x / 255 - 0.5, as in the
course. Two models:

- `course`: the course's network exactly (1,084,234 parameters), to be trained with the
  course's recipe: Adamax, the learning rate decayed x0.9 per epoch
  (`dlcli train cnn --model course --epochs 10 --batch-size 32 --lr 5e-3`).
- `default`: in the pattern of Keller Jordan's fast CIFAR-10 networks (airbench), a
  frozen 2x2 convolution that whitens the image's patches, then three blocks that each
  convolve, max-pool and convolve again at the lower resolution, so most of the depth runs
  on small maps where it costs little on a CPU. Random flips and whole-pixel shifts are
  Keras layers inside the model (they act only in training); label smoothing, and
  airbench's optimisation: batches of 1,024, SGD with Nesterov momentum at a high rate
  that rises and falls every step, batch norm without a learnt scale and with a fast
  shift, identity-initialised convolutions, scaled-down logits, a lookahead average of the
  weights; bfloat16 arithmetic where the CPU has it (`precision`). A prediction averages those of the image,
  its mirror image and both shifted a pixel each way (`tta`, `tta_shift`).

The run keeps `classes.json`, so `predict` names classes of any image folder.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from dlcli.data import sources as data_lib
from dlcli.inference import lite
from dlcli.engine import training
from dlcli.inference.inputs import stream_through
from dlcli.errors import UsageError
from dlcli.data.images import ranked_rows, read_image
from dlcli.engine.custom_objects import register as custom_objects
from dlcli.engine.lazy import lazy_import
from dlcli.runs.files import atomic_write_json
from dlcli.tasks import Context, DataRules, ExportSpec, FileInputs, Option, Predictor, TaskSpec, View, common_defaults

keras = lazy_import("keras")
tf = lazy_import("tensorflow")
tfds = lazy_import("tensorflow_datasets")

SIZE = 32
DEFAULTS = {
    **common_defaults(dataset="cifar10", epochs=36, batch_size=1024, lr=1.5),
    **training.keras_defaults(),
    "model": "default",
    "width": 48,  # filters of the default model's first block; 2x and 4x in the other two
    "shift": 2,  # default model: random shifts of up to this many pixels in training
    "label_smoothing": 0.2,  # default model: the share of each target spread over the classes
    "precision": "auto",  # auto: mixed_bfloat16 where the CPU runs it faster (precision.bfloat16_pays), else float32
    "tta": True,  # test-time augmentation: average each image's prediction with its mirror image's
    "tta_shift": 1,  # with tta, also both images shifted this many pixels down-right and up-left (0: mirror only)
    "weight_decay": 0.0089,  # default model only (SGD, decoupled: each step takes lr x weight_decay of each weight)
    "momentum": 0.85,  # default model: SGD's Nesterov momentum
    "warmup": 0.23,  # default model: share of the steps the rate climbs
    "lr_end": 0.0,  # default model: the rate at the last step, as a share of lr
    "lookahead": 3,  # default model: epochs before the weights' lookahead average starts (0: no average)
    "ema": 0.0,  # default model: decay of the weights' moving average, written into the model at each epoch's end (0: none)
    "lr_decay": 0.9,  # course model: learning rate x lr_decay each epoch
    "val_size": 2000,  # training images held out (seeded) for validation
}
CHOICES = {"model": ["default", "course"]}
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# -- data -------------------------------------------------------------------------------


def _decode(encoded):
    """Encoded image bytes -> uint8 (32, 32, 3), resizing images of any other size."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image = tf.cond(
        tf.reduce_all(tf.shape(image)[:2] == SIZE),
        lambda: image,
        lambda: tf.cast(tf.clip_by_value(tf.round(tf.image.resize(image, (SIZE, SIZE), antialias=True)), 0, 255), tf.uint8),
    )
    return tf.ensure_shape(image, (SIZE, SIZE, 3))


def _source(cfg: dict):
    """(builder, train split, test split, class names) of `--dataset`."""
    kind, value = data_lib.parse_dataset(cfg["dataset"], allowed=("tfds", "folder"))
    if kind == "folder":
        builder, train_split, test_split = data_lib.folder_splits(value)
    else:
        builder = data_lib.tfds_builder(value, cfg["data_dir"])
        train_split, test_split = "train", "test"
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise UsageError(f"--dataset {cfg['dataset']!r} has no image and label features")
    return builder, train_split, test_split, list(features["label"].names)


def load_split(cfg: dict, which: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images uint8 (N, 32, 32, 3), int labels and class names of the train or test split.

    Decoding runs in parallel in tf.data; the arrays stay uint8 in memory (150 MB for
    CIFAR-10's 50k training images) and are scaled per batch.
    """
    builder, train_split, test_split, classes = _source(cfg)
    split = train_split if which == "train" else test_split
    return (*_read_split(builder, split, cfg), classes)


def _read_split(builder, split: str, cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    ds = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    ds = ds.map(lambda ex: (_decode(ex["image"]), ex["label"]), num_parallel_calls=tf.data.AUTOTUNE)
    xs, ys = [], []
    for x, y in ds.batch(2048).prefetch(2).as_numpy_iterator():
        xs.append(x)
        ys.append(y)
    if not xs:
        raise UsageError(f"--dataset {cfg['dataset']!r}: the {split} split has no images")
    return np.concatenate(xs), np.concatenate(ys).astype(np.int64)


def other_eval_split(cfg: dict, classes: list[str]) -> tuple[np.ndarray, np.ndarray, str]:
    """(images, labels, metric prefix) of other data (`eval --dataset OTHER`): its test split
    ("test_": test, else val or validation) where it has one, else every split (""). Labels
    are matched to the run's classes by name, so a folder of some of its classes works."""
    kind, value = data_lib.parse_dataset(cfg["dataset"], allowed=("tfds", "folder"))
    builder = data_lib.image_folder(value) if kind == "folder" else data_lib.tfds_builder(value, cfg["data_dir"])
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise UsageError(f"--dataset {cfg['dataset']!r} has no image and label features")
    splits, held_out = data_lib.eval_splits(list(builder.info.splits.keys()))
    parts = [_read_split(builder, split, cfg) for split in splits]
    x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    y = data_lib.relabel(y, list(features["label"].names), classes, cfg["dataset"])
    return x, y, "test_" if held_out else ""


def scale(x):
    """uint8 pixels -> the course's input scale, x / 255 - 0.5 (NumPy or tensors)."""
    if isinstance(x, np.ndarray):
        return data_lib.unit_float(x, minus=0.5)
    return tf.cast(x, tf.float32) / 255.0 - 0.5


def split_validation(x: np.ndarray, y: np.ndarray, val_size: int, seed: int | None, say=None):
    """Hold out `val_size` training images drawn at random (image folders come sorted by class)."""
    if val_size <= 0:
        return (x, y), None
    val_size = data_lib.held_out_count(val_size, len(x), say)
    if val_size == 0:
        return (x, y), None
    order = np.random.default_rng(seed).permutation(len(x))
    val, train = order[:val_size], order[val_size:]
    return (x[train], y[train]), (x[val], y[val])


def examples(x: np.ndarray, y: np.ndarray):
    """uint8 images and labels as a cached tf.data source, built once per split.

    Not `training.array_epochs`: that batches the arrays as they are, and scaling CIFAR-10
    to float32 up front would take 600 MB per copy; here each batch is scaled on the fly.
    """
    return tf.data.Dataset.from_tensor_slices((x, y)).cache()


def batches(source, batch_size: int, n_classes: int, shuffle_seed: int | None = None, shuffle: bool = False):
    """(Seeded) shuffle, batch, scale and one-hot (for label smoothing) in parallel, prefetch."""
    if shuffle:
        source = source.shuffle(source.cardinality(), seed=shuffle_seed, reshuffle_each_iteration=False)
    ds = source.batch(batch_size).map(lambda a, b: (scale(a), tf.one_hot(b, n_classes)), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


# -- models -------------------------------------------------------------------------------


def course_model(n_classes: int = 10):
    """The course's network, layer for layer: 1,084,234 parameters for 10 classes."""
    layers = keras.layers
    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    x = inputs
    for block in ((16, 32), (32, 64)):
        for filters in block:
            x = layers.Conv2D(filters, 3, padding="same")(x)
            x = layers.LeakyReLU(0.1)(x)
        x = layers.MaxPooling2D()(x)
        x = layers.Dropout(0.25)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(256)(x)
    x = layers.LeakyReLU(0.1)(x)
    x = layers.Dropout(0.5)(x)
    outputs = layers.Dense(n_classes, activation="softmax", name="class", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="cnn_course")


def default_model(n_classes: int = 10, width: int = 80, shift: int = 2):
    """A frozen 2x2 whitening stem, then three blocks of width, 2w and 4w filters, each
    conv -> max-pool -> BN-ReLU -> conv -> BN-ReLU, behind flip/shift augmentation.

    The stem's 24 filters are the whitening of 2x2 patches, plus and minus, set from the
    training images by `build_model` (`whitening_kernel`); its 'valid' convolution leaves 31x31 maps, so the
    blocks run at 31, 15 and 7 pixels. No dropout: with augmentation, label smoothing and
    weight decay the network under-fits rather than over-fits in the epochs a CPU affords.

    What lets it train at airbench's high rate: batch norm has no learnt scale (each
    convolution before it is then scale-free, its rate set by weight decay), its shift
    learns `BIAS_SPEED` times as fast as the weights, its statistics follow the last few
    batches (momentum 0.6); each block's convolutions start as the identity on their
    first input channels; the pooled features reach the bias-free classifier scaled by
    `LOGIT_SCALE`, which keeps the logits small early on.
    """
    layers = keras.layers
    scaled_bias = custom_objects()["ScaledBias"]

    def bn_relu(x):
        x = layers.BatchNormalization(momentum=0.6, epsilon=1e-5, center=False, scale=False)(x)
        return layers.ReLU()(scaled_bias(math.sqrt(BIAS_SPEED))(x))

    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    x = layers.RandomFlip("horizontal", name="flip", dtype="float32")(inputs)  # image ops stay float32
    if shift:  # whole-pixel shifts: "nearest" rounds the drawn offset, so no shifted image is blurred
        x = layers.RandomTranslation(shift / SIZE, shift / SIZE, fill_mode="reflect", interpolation="nearest",
                                     name="shift", dtype="float32")(x)
    x = layers.ReLU()(layers.Conv2D(2 * WHITENING_PATCH_VALUES, 2, use_bias=False, trainable=False, name="stem")(x))
    convs = []
    for filters in block_widths(width):
        convs += [layers.Conv2D(filters, 3, padding="same", use_bias=False), layers.Conv2D(filters, 3, padding="same", use_bias=False)]
        x = bn_relu(layers.MaxPooling2D()(convs[-2](x)))
        x = bn_relu(convs[-1](x))
    x = layers.Rescaling(LOGIT_SCALE, name="logit_scale")(layers.GlobalMaxPooling2D()(x))
    outputs = layers.Dense(n_classes, activation="softmax", use_bias=False, name="class", dtype="float32")(x)
    model = keras.Model(inputs, outputs, name="cnn_default")
    for conv in convs:
        conv.kernel.assign(identity_start(conv.kernel.numpy()))
    return model


BIAS_SPEED = 64  # default model: batch norm's shift learns this many times as fast as the weights
LOGIT_SCALE = 1 / 9  # default model: the pooled features' scale into the classifier


def identity_start(kernel: np.ndarray) -> np.ndarray:
    """A 3x3 kernel whose first in-channels filters pass their own channel through (a Dirac
    centre), the others as drawn: each block starts close to the identity, an implicit
    residual connection (airbench)."""
    kernel = kernel.copy()
    n = min(kernel.shape[2], kernel.shape[3])
    kernel[:, :, :, :n] = 0
    kernel[1, 1, np.arange(n), np.arange(n)] = 1
    return kernel


def block_widths(width: int) -> tuple[int, int, int]:
    """The default model's filters per block, doubling as the maps halve."""
    return width, 2 * width, 4 * width


WHITENING_PATCH_VALUES = 2 * 2 * 3  # a 2x2 RGB patch


def whitening_kernel(images: np.ndarray, eps: float = 5e-4, limit: int = 10_000) -> np.ndarray:
    """The stem's (2, 2, 3, 24) kernel: the eigenvectors of the covariance of the 2x2 patches
    of (up to `limit` of) the uint8 training images, each scaled by 1/sqrt(eigenvalue + eps),
    with their negatives. Its outputs are decorrelated, the strong directions with unit
    variance (`eps` damps the faint ones, mostly noise and JPEG artefacts), which lets the
    first block learn from the first steps on (Keller Jordan's airbench)."""
    total = np.zeros((WHITENING_PATCH_VALUES, WHITENING_PATCH_VALUES))
    sums, count = np.zeros(WHITENING_PATCH_VALUES), 0
    for start in range(0, min(limit, len(images)), 1000):
        x = scale(images[start:min(start + 1000, limit)])
        # (h, w, channel) order, as Conv2D's kernel is laid out
        patches = np.concatenate([x[:, i:SIZE - 1 + i, j:SIZE - 1 + j] for i in (0, 1) for j in (0, 1)], axis=-1)
        patches = patches.reshape(-1, WHITENING_PATCH_VALUES).astype(np.float64)
        total += patches.T @ patches
        sums += patches.sum(0)
        count += len(patches)
    mean = sums / count
    covariance = total / count - np.outer(mean, mean)
    values, vectors = np.linalg.eigh(covariance)
    filters = (vectors / np.sqrt(np.maximum(values, 0) + eps)).T  # one filter a row
    kernel = np.concatenate([filters, -filters]).reshape(-1, 2, 2, 3)
    return np.transpose(kernel, (1, 2, 3, 0)).astype(np.float32)


def build_model(cfg: dict, n_classes: int = 10, images: np.ndarray | None = None):
    """The compiled model of `cfg["model"]`; the default model's stem is whitened on `images`
    (uint8 training images) where they are given."""
    default = cfg["model"] != "course"
    with training.precision(cfg["precision"]):
        model = default_model(n_classes, cfg["width"], cfg["shift"]) if default else course_model(n_classes)
    if default and images is not None and len(images):
        model.get_layer("stem").kernel.assign(whitening_kernel(images))
    if default:
        ema = {"use_ema": True, "ema_momentum": cfg["ema"]} if cfg["ema"] > 0 else {}  # written in by `schedule`
        sgd, lookahead = keras.optimizers.SGD, {}
        if cfg["lookahead"] > 0:
            sgd, lookahead = custom_objects()["LookaheadSGD"], {"start_epochs": cfg["lookahead"]}
        optimizer = sgd(triangle(cfg, 0.0), momentum=cfg["momentum"], nesterov=True, weight_decay=cfg["weight_decay"],
                        **ema, **lookahead)
        smoothing = cfg["label_smoothing"]
    else:
        optimizer, smoothing = keras.optimizers.Adamax(cfg["lr"]), 0.0
    model.compile(optimizer=optimizer, loss=keras.losses.CategoricalCrossentropy(label_smoothing=smoothing),
                  metrics=["accuracy"], jit_compile=cfg["jit_compile"])
    return model


def triangle(cfg: dict, progress: float) -> float:
    """The default recipe's rate at `progress` (0 to 1) through training: linear from
    0.2 x lr to lr over the first `warmup` share of the steps, then linear down to
    `lr_end` x lr at the last step (airbench's shape; airbench ends at 0.07 and averages
    the weights, where this recipe ends at 0 and keeps the weights as they are)."""
    lr, warmup, end = cfg["lr"], cfg["warmup"], cfg["lr_end"]
    if progress < warmup:
        return lr * (0.2 + 0.8 * progress / warmup)
    return lr * (1 - (1 - end) * min(1.0, (progress - warmup) / max(1 - warmup, 1e-9)))


def schedule(cfg: dict, steps_per_epoch: int = 1):
    """The learning-rate callback of the model's recipe. The default model's rate moves
    every step, as a function of the optimizer's step count (saved in every checkpoint, so
    a resumed run takes the rates of an uninterrupted one), and with `ema` the weights take
    their moving average at each epoch's end; the course's rate moves every epoch."""
    if cfg["model"] == "course":
        return training.decay_per_epoch(cfg["lr"], cfg["lr_decay"])
    total = max(1, cfg["epochs"] * steps_per_epoch)

    class StepRate(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            optimizer = self.model.optimizer
            if hasattr(optimizer, "plan"):  # the lookahead average's run length
                optimizer.plan(total, steps_per_epoch)
            # Read once a fit call and counted on: reading it every step would make the
            # host wait for each step to finish before it queues the next.
            self.step = int(optimizer.iterations.numpy())

        def on_train_batch_begin(self, batch, logs=None):
            self.model.optimizer.learning_rate.assign(triangle(cfg, self.step / total))
            self.step += 1

        def on_epoch_end(self, epoch, logs=None):
            if cfg["ema"] > 0:  # before the epoch's checkpoint, which then holds the average
                self.model.optimizer.finalize_variable_values(self.model.trainable_weights)

    return StepRate()


# -- train / evaluate ---------------------------------------------------------------------


def train(ctx: Context) -> dict:
    cfg = ctx.cfg
    training.set_seed(cfg["seed"])
    x, y, classes = load_split(cfg, "train")
    atomic_write_json(ctx.run.file("classes.json"), classes)
    (x_train, y_train), val = split_validation(x, y, cfg["val_size"], cfg["seed"], ctx.reporter.info)
    ctx.reporter.info(f"{len(x_train)} training images, {len(val[0]) if val else 0} for validation, {len(classes)} classes")

    train_examples = examples(x_train, y_train)

    def train_data(epoch):
        return batches(train_examples, cfg["batch_size"], len(classes), training.epoch_seed(cfg["seed"], epoch), shuffle=True)

    steps_per_epoch = -(-len(x_train) // cfg["batch_size"])
    model, history = training.fit(
        ctx,
        build_model=lambda: build_model(cfg, len(classes), x_train),
        train_data=train_data,
        val_data=batches(examples(*val), 512, len(classes)) if val else None,
        steps_per_epoch=steps_per_epoch,
        callbacks=[schedule(cfg, steps_per_epoch)],
    )
    x_test, y_test, _ = load_split(cfg, "test")
    final = history[-1]
    return {**({"val_loss": final["val_loss"], "val_accuracy": final["val_accuracy"]} if val else {}),
            **accuracy_metrics(y_test, *predict_probabilities(model, x_test, cfg))}


def _classes(ctx: Context) -> list[str]:
    return ctx.run.read_names("classes.json", "class names", default=CIFAR10_CLASSES)


def _load(ctx: Context):
    return training.load_model(ctx.model_path, "cnn")


def tta_views(images: np.ndarray, cfg: dict) -> list[np.ndarray]:
    """The versions of each image whose predictions are averaged at test time: the image; with
    `tta` its mirror image; with `tta_shift` s as well both of them shifted s pixels down-right
    and s up-left (edges reflected, as the training shifts fill them). Shifted views cost a
    pass each and add 0.2-0.5 points of accuracy to the mirror's (docs/tasks/cnn.md)."""
    if not cfg["tta"]:
        return [images]
    views = [images, images[:, :, ::-1]]
    s = cfg.get("tta_shift", 0)
    if s:
        for view in views[:2]:
            padded = np.pad(view, ((0, 0), (s, s), (s, s), (0, 0)), mode="reflect")
            views += [padded[:, : SIZE, : SIZE], padded[:, 2 * s:, 2 * s:]]
    return views


def predict_probabilities(model, images: np.ndarray, cfg: dict):
    """(probabilities, probabilities without test-time augmentation or None) of uint8 or
    scaled images; with `tta` each image's prediction is the mean over its `tta_views`."""
    def run(x):
        ds = tf.data.Dataset.from_tensor_slices(x).batch(512)
        if x.dtype == np.uint8:
            ds = ds.map(scale, num_parallel_calls=tf.data.AUTOTUNE)
        return model.predict(training.without_autotune_thread(ds.prefetch(2)), verbose=0)

    views = tta_views(images, cfg)
    plain = run(views[0])
    if len(views) == 1:
        return plain, None
    return (plain + sum(run(view) for view in views[1:])) / len(views), plain


def accuracy_metrics(y: np.ndarray, probs: np.ndarray, plain: np.ndarray | None = None) -> dict:
    def loss_and_accuracy(p):
        return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-7, 1)))), float(np.mean(p.argmax(1) == y))

    loss, accuracy = loss_and_accuracy(probs)
    metrics = {"test_loss": loss, "test_accuracy": accuracy}
    if plain is not None:
        metrics["test_accuracy_without_tta"] = loss_and_accuracy(plain)[1]
    return metrics


def _test_predictions(ctx: Context):
    """(model, test images uint8, labels, probabilities, probabilities without tta or None)."""
    model = _load(ctx)
    x, y, _ = load_split(ctx.cfg, "test")
    return model, x, y, *predict_probabilities(model, x, ctx.cfg)


def evaluate(ctx: Context) -> dict:
    """Loss and accuracy on the test split; on other data (`--dataset OTHER`) on its test
    split, or on all of it where it has none (then without the `test_` prefix)."""
    if not ctx.on_other_data:
        _, _, y, probs, plain = _test_predictions(ctx)
        return {**accuracy_metrics(y, probs, plain), "test_examples": int(len(y))}
    model = _load(ctx)
    x, y, prefix = other_eval_split(ctx.cfg, _classes(ctx).check_count(model.output_shape[-1]))
    what = "test images" if prefix else "images"
    ctx.reporter.info(f"evaluating all {len(x)} {what} of {ctx.cfg['dataset']} (not the run's training data)")
    metrics = accuracy_metrics(y, *predict_probabilities(model, x, ctx.cfg))
    return {**{prefix + k.removeprefix("test_"): v for k, v in metrics.items()}, f"{prefix}examples": int(len(y))}


# -- predict ------------------------------------------------------------------------------


def to_input(image: np.ndarray) -> np.ndarray:
    """Any RGB image -> a 32x32 model input (the whole image, squeezed to a square)."""
    from PIL import Image

    if image.shape[:2] != (SIZE, SIZE):
        image = np.asarray(Image.fromarray(image).resize((SIZE, SIZE), Image.LANCZOS))
    return scale(image)


def _finish(ctx: Context, model, classes: list[str], paths: list[str], images: list[np.ndarray]) -> list[dict]:
    x = np.stack(images)
    views = tta_views(x, ctx.cfg)  # as eval scores them; one call of all views runs faster than one each
    probs = np.asarray(model(np.concatenate(views))).reshape(len(views), len(x), -1).mean(0)
    return ranked_rows(paths, probs, classes, ctx.options["top_k"])


def _prepare(path: str) -> np.ndarray:
    return to_input(read_image(path, mode="RGB"))


def predictor(ctx: Context) -> Predictor:
    """Decode and resize a file; the model (with the mirror pass) and the rows per batch."""
    if ctx.options["top_k"] < 1:
        raise UsageError(f"--top-k must be >= 1; got {ctx.options['top_k']}")
    model = lite.model_for(ctx, "cnn")
    classes = _classes(ctx)
    return Predictor(_prepare, lambda paths, images: _finish(ctx, model, classes, paths, images), 128)


# Rows for every input, a batch at a time (files decoded and resized ahead in threads).
predict_stream = stream_through(predictor)


def predict(ctx: Context, inputs: list[str]) -> list[dict]:
    if not inputs:
        raise UsageError("give image files to classify: `dlcli predict cnn photo.jpg [more.jpg ...]`")
    return list(predict_stream(ctx, inputs))


# -- views --------------------------------------------------------------------------------


def _view_path(ctx: Context, name: str) -> Path:
    return ctx.view_path(name)


def _conv_layers(model) -> list:
    return [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]


def view_filters(ctx: Context) -> Path:
    """The first conv layer's 3x3 RGB kernels, each stretched to [0, 1] to show its colours."""
    from dlcli.plots import image_grid

    first = _conv_layers(_load(ctx))[0]
    kernel = np.asarray(first.kernel)  # (3, 3, 3, filters)
    tiles = []
    for f in range(kernel.shape[-1]):
        w = kernel[..., f]
        tiles.append((w - w.min()) / (w.max() - w.min() + 1e-8))
    return image_grid(tiles, _view_path(ctx, "cnn-filters"), titles=[str(i) for i in range(len(tiles))],
                      cols=8, tile_inches=0.9, suptitle=f"cnn / {ctx.run.name}: {first.name}, {len(tiles)} filters")


def gradient_ascent(loss_of, steps: int, step: float, start_scale: float, seed: int | None) -> np.ndarray:
    """The course's maximum-stimulus search: from small noise, climb the loss along its
    gradient normalised by its root mean square, `steps` times."""
    rng = np.random.default_rng(seed)
    image = tf.Variable((rng.random((1, SIZE, SIZE, 3), dtype=np.float32) - 0.5) * start_scale)

    @tf.function
    def climb():
        with tf.GradientTape() as tape:
            loss = loss_of(image)
        grad = tape.gradient(loss, image)
        image.assign_add(step * grad / (tf.sqrt(tf.reduce_mean(tf.square(grad))) + 1e-10))

    for _ in range(steps):
        climb()
    return image.numpy()[0]


def for_display(image: np.ndarray) -> np.ndarray:
    """The course's deprocessing: standardise, shrink to std 0.1 around grey 0.5, clip."""
    image = (image - image.mean()) / (image.std() + 1e-5)
    return np.clip(image * 0.1 + 0.5, 0.0, 1.0)


def _parse_indices(text: str, limit: int, what: str) -> list[int]:
    """'0-7' or '0,3,5' -> indices, each checked against `limit`."""
    out: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            lo, dash, hi = part.partition("-")
            out.extend(range(int(lo), int(hi) + 1) if dash else [int(lo)])
    except ValueError:
        raise UsageError(f"--filters {text!r}: expected indices like 0-7 or 0,3,5") from None
    bad = [i for i in out if not 0 <= i < limit]
    if not out or bad:
        raise UsageError(f"--filters {text!r}: {what} has filters 0-{limit - 1}")
    return out


def view_stimuli(ctx: Context) -> Path:
    """Inputs that excite chosen filters of a conv layer most (20 steps), and each class (200 x 0.1)."""
    from dlcli.plots import image_grid

    model = _load(ctx)
    classes = _classes(ctx).check_count(model.output_shape[-1])
    convs = _conv_layers(model)
    names = [layer.name for layer in convs]
    choice = ctx.options["layer"]
    if choice.lstrip("-").isdigit() and -len(convs) <= int(choice) < len(convs):
        layer = convs[int(choice)]
    elif choice in names:
        layer = convs[names.index(choice)]
    else:
        raise UsageError(f"--layer {choice!r}: give a conv layer's index (0-{len(convs) - 1}, -1 the last) or name ({', '.join(names)})")
    filters = _parse_indices(ctx.options["filters"], layer.filters, layer.name)
    seed = ctx.cfg.get("seed")

    features = keras.Model(model.inputs, layer.output)
    tiles, titles = [], []
    for f in filters:
        image = gradient_ascent(lambda img: tf.reduce_mean(features(img, training=False)[..., f]),
                                ctx.options["filter_steps"], 1.0, 0.1, seed)
        tiles.append(for_display(image))
        titles.append(f"{layer.name} #{f}")

    # A class's score is its logit: the input of the last (softmax) layer times its weights, in
    # the weights' float32 (a bfloat16 model's features are cast up to meet them).
    head = model.layers[-1]
    penultimate = keras.Model(model.inputs, head.input)
    for c, name in enumerate(classes):
        bias = head.bias[c] if head.use_bias else 0.0
        image = gradient_ascent(
            lambda img: tf.reduce_mean(tf.matmul(tf.cast(penultimate(img, training=False), head.kernel.dtype),
                                                 head.kernel[:, c:c + 1]) + bias),
            ctx.options["class_steps"], 0.1, 0.001, seed)
        tiles.append(for_display(image))
        titles.append(f"class {name}")
    return image_grid(tiles, _view_path(ctx, "cnn-stimuli"), titles=titles, cols=8,
                      suptitle=f"cnn / {ctx.run.name}: maximum stimuli of {layer.name} filters and of each class")


def view_confusion(ctx: Context) -> Path:
    from dlcli.plots import confusion_matrix, confusion_plot

    _, _, y, probs, _ = _test_predictions(ctx)
    classes = _classes(ctx).check_count(probs.shape[1])
    matrix = confusion_matrix(y, probs.argmax(1), len(classes))
    acc = np.trace(matrix) / max(matrix.sum(), 1)
    return confusion_plot(matrix, classes, _view_path(ctx, "cnn-confusion"),
                          f"cnn / {ctx.run.name}: test accuracy {acc:.4f}")


def view_samples(ctx: Context) -> Path:
    """Random test images (seeded) with the predicted class and score, green if right."""
    from dlcli.plots import image_grid

    _, x, y, probs, _ = _test_predictions(ctx)
    classes = _classes(ctx).check_count(probs.shape[1])
    n = ctx.options["n"]
    if n < 1:
        raise UsageError(f"--n must be >= 1; got {n}")
    chosen = np.random.default_rng(ctx.cfg.get("seed")).permutation(len(x))[:n]
    pred = probs.argmax(1)
    titles = [f"{classes[pred[i]]} {probs[i, pred[i]]:.2f}\n(true {classes[y[i]]})" for i in chosen]
    colors = ["green" if pred[i] == y[i] else "red" for i in chosen]
    return image_grid([x[i] for i in chosen], _view_path(ctx, "cnn-samples"), titles=titles, title_colors=colors,
                      cols=8, suptitle=f"cnn / {ctx.run.name}: test images, predicted class and probability")


def export_preprocessing(cfg: dict) -> dict:
    """What a user of the exported model does to an image before it (export.json)."""
    return {"input": "RGB image of any size", "steps": ["resize the whole image to 32x32 (Lanczos)", "x / 255 - 0.5"],
            "code": "dlcli.tasks.cnn.to_input", "shape": [32, 32, 3], "scale": 1 / 255, "offset": -0.5,
            "tta": bool(cfg.get("tta")), "tta_shift": int(cfg.get("tta_shift", 0)) if cfg.get("tta") else 0,
            "tta_means": "average the probabilities of the image and its mirror image, and with tta_shift s of both "
                         "shifted s pixels down-right and s up-left (edges reflected): dlcli.tasks.cnn.tta_views"}


EXPORT = ExportSpec(preprocessing=export_preprocessing, classes=_classes)


# What this task's own config keys mean (and its own meaning of shared ones), for
# `dlcli tasks TASK` and `train --help`; keys every task shares are in `config.KEY_HELP`.
KEY_HELP = {
    "width": "filters of the default model's first block (the blocks have 1x, 2x, 4x)",
    "shift": "the default model's random shifts in training, in whole pixels (0: flips only)",
    "label_smoothing": "the default model's share of each target spread over the classes (0: none)",
    "weight_decay": "weight decay of the default model's SGD (decoupled: each step takes lr x this of each weight)",
    "momentum": "the Nesterov momentum of the default model's SGD",
    "warmup": "the share of the steps over which the default model's rate rises to --lr",
    "lr_end": "the default model's rate at the last step, as a share of --lr (it falls there linearly)",
    "lookahead": "epochs before the default model's weights start to move to their average every 5 steps, "
                 "the average weighing more as training ends (airbench's lookahead; 0: none)",
    "ema": "decay of the moving average of the default model's weights, which replaces the weights at each "
           "epoch's end (0: none)",
    "tta_shift": "with tta, also average the predictions of the image and its mirror shifted this many pixels "
                 "down-right and up-left (0: the image and its mirror only)",
}


TASK = TaskSpec(
    name="cnn",
    summary="CIFAR-10 from scratch: the course's CNN, and a batch-norm + augmentation recipe",
    defaults=DEFAULTS,
    data=DataRules(kinds=("tfds", "folder"), labelled_folder=True),
    choices=CHOICES,
    train=train,
    evaluate=evaluate,
    predict=predict,
    predict_options={"top_k": Option(int, 3, "how many classes to list per image")},
    views={
        "cnn-filters": View(view_filters, "the first conv layer's learnt filters as colour tiles"),
        "cnn-stimuli": View(view_stimuli, "maximum-stimulus images by gradient ascent, for conv filters and classes",
                            options={
                                "layer": Option(str, "-1", "conv layer: index (0 first, -1 last) or name"),
                                "filters": Option(str, "0-7", "filter indices, like 0-7 or 0,3,5"),
                                "filter_steps": Option(int, 20, "gradient steps (size 1) per filter"),
                                "class_steps": Option(int, 200, "gradient steps (size 0.1) per class"),
                            }),
        "cnn-confusion": View(view_confusion, "confusion matrix on the test set"),
        "cnn-samples": View(view_samples, "test images with predicted and true labels and scores",
                            options={"n": Option(int, 24, "how many images")}),
    },
    key_help=KEY_HELP,
    inputs=FileInputs(),
    predict_stream=predict_stream,
    predictor=predictor,
    export=EXPORT,
)
