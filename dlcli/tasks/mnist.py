"""Task `mnist`: handwritten digits with Keras (softmax regression, the course's MLP, a small CNN).

Week 2 of the course. Pixels are scaled to [0, 1]; the last 10,000 training images are
held out for validation (50k / 10k / 10k). The default recipe is the course's MLP (two
hidden layers of 256) with dropout and a decaying learning rate, which clears the 0.98
test-accuracy target in about a minute on two CPU cores; `--model cnn` reaches about 0.99.

`predict` takes any image file: it is turned grey, inverted if the digit is dark on a
light background, cropped to the digit, scaled into a 20x20 box and centred by its mass
in 28x28, the way MNIST itself was made.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dlcli.data import sources as data_lib
from dlcli.inference import lite
from dlcli.engine import training
from dlcli.inference.inputs import stream_through
from dlcli.errors import UsageError
from dlcli.data.images import ranked_rows, read_image
from dlcli.engine.lazy import lazy_import
from dlcli.runs.files import atomic_write_json
from dlcli.tasks import Context, DataRules, ExportSpec, FileInputs, Option, Predictor, TaskSpec, View, common_defaults

keras = lazy_import("keras")
tf = lazy_import("tensorflow")

DEFAULTS = {
    **common_defaults(dataset="mnist", epochs=20, batch_size=128, lr=1e-3),
    **training.keras_defaults(),
    "model": "mlp",
    "hidden": 256,
    "dropout": 0.2,
    "lr_decay": 0.9,
    "val_size": 10000,
}
CHOICES = {"model": ["softmax", "mlp", "cnn"]}
DIGITS = [str(d) for d in range(10)]


# -- data -------------------------------------------------------------------------------


def _folder_split(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One split of an image folder as grey 28x28 uint8 images and int labels."""
    ds = builder.as_dataset(split=split, as_supervised=True)
    ds = ds.map(lambda x, y: (tf.image.resize(tf.image.rgb_to_grayscale(x[..., :3]) if x.shape[-1] != 1 else x, (28, 28)), y),
                num_parallel_calls=tf.data.AUTOTUNE)
    xs, ys = zip(*[(x, y) for x, y in ds.batch(4096).as_numpy_iterator()])
    return np.concatenate(xs)[..., 0].astype(np.uint8), np.concatenate(ys)


def _folder_arrays(path: str) -> dict:
    builder, train_split, test_split = data_lib.folder_splits(path)
    x_train, y_train = _folder_split(builder, train_split)
    x_test, y_test = _folder_split(builder, test_split)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test,
            "classes": builder.info.features["label"].names}


def load_arrays(cfg: dict) -> dict:
    """x_train, y_train, x_test, y_test as uint8 images (N, 28, 28) and int labels, and classes."""
    kind, value = data_lib.parse_dataset(cfg["dataset"], allowed=("tfds", "npz", "folder"))
    if kind == "npz":
        out = data_lib.load_npz(value)
        out["classes"] = DIGITS
    elif kind == "folder":
        out = _folder_arrays(value)
    else:
        x_train, y_train = data_lib.tfds_arrays(value, "train", cfg["data_dir"])
        x_test, y_test = data_lib.tfds_arrays(value, "test", cfg["data_dir"])
        out = {"x_train": x_train[..., 0], "y_train": y_train, "x_test": x_test[..., 0], "y_test": y_test,
               "classes": DIGITS}
    for key in ("x_train", "x_test"):
        if out[key].ndim != 3 or out[key].shape[1:] != (28, 28):
            raise UsageError(f"{cfg['dataset']}: {key} must be 28x28 images, got shape {out[key].shape}")
    n = len(out["classes"])
    for key, images in (("y_train", "x_train"), ("y_test", "x_test")):
        y = np.asarray(out[key])
        if y.ndim != 1 or len(y) != len(out[images]):
            raise UsageError(f"{cfg['dataset']}: {key} must hold one label per image of {images} "
                             f"({len(out[images])}), got shape {y.shape}")
        if len(y) and (not np.all(np.mod(y, 1) == 0) or y.min() < 0 or y.max() >= n):
            raise UsageError(f"{cfg['dataset']}: {key} has labels {y.min():g}-{y.max():g}; "
                             f"the model has {n} classes (labels 0-{n - 1})")
        out[key] = y.astype(np.int64)
    return out


def scale(x: np.ndarray) -> np.ndarray:
    return data_lib.unit_float(x)


def scale_batch(x):
    """`scale` in TensorFlow, for a batch inside the input pipeline: the same floats to the bit."""
    return tf.cast(x, tf.float32) / 255.0


def training_epochs(x_train: np.ndarray, y_train: np.ndarray, cfg: dict):
    """(train_data(epoch), steps): the uint8 digits, shuffled per epoch, scaled batch by batch."""
    return training.array_epochs(x_train, y_train, cfg["batch_size"], cfg["seed"], x_map=scale_batch)


def split_validation(arrays: dict, val_size: int, say=None):
    """The last `val_size` training images held out (at least one: mnist reports val_loss)."""
    x, y = arrays["x_train"], arrays["y_train"]
    val_size = data_lib.held_out_count(val_size, len(x), say, minimum=1)
    return (x[:-val_size], y[:-val_size]), (x[-val_size:], y[-val_size:])


# -- model --------------------------------------------------------------------------------


def build_model(cfg: dict, n_classes: int = 10):
    inputs = keras.Input((28, 28), name="image")
    if cfg["model"] == "cnn":
        x = keras.layers.Reshape((28, 28, 1))(inputs)
        for filters in (32, 64):
            x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
            x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
            x = keras.layers.MaxPooling2D()(x)
        x = keras.layers.Flatten()(x)
        x = keras.layers.Dropout(cfg["dropout"])(x)
        x = keras.layers.Dense(cfg["hidden"], activation="relu")(x)
        x = keras.layers.Dropout(cfg["dropout"])(x)
    else:
        x = keras.layers.Flatten()(inputs)
        if cfg["model"] == "mlp":
            for _ in range(2):
                x = keras.layers.Dense(cfg["hidden"], activation="relu")(x)
                x = keras.layers.Dropout(cfg["dropout"])(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax", name="digit")(x)
    model = keras.Model(inputs, outputs, name=f"mnist_{cfg['model']}")
    model.compile(
        optimizer=keras.optimizers.Adam(cfg["lr"]),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=cfg["jit_compile"],
    )
    return model


# -- train / evaluate ---------------------------------------------------------------------


def train(ctx: Context) -> dict:
    cfg = ctx.cfg
    training.set_seed(cfg["seed"])
    arrays = load_arrays(cfg)
    (x_train, y_train), (x_val, y_val) = split_validation(arrays, cfg["val_size"], ctx.reporter.info)
    atomic_write_json(ctx.run.file("classes.json"), arrays["classes"])
    train_data, steps = training_epochs(x_train, y_train, cfg)
    x_val = scale(x_val)
    val_ds = tf.data.Dataset.from_tensor_slices((x_val, y_val)).batch(1024).cache()
    model, history = training.fit(
        ctx,
        build_model=lambda: build_model(cfg, len(arrays["classes"])),
        train_data=train_data,
        val_data=val_ds,
        steps_per_epoch=steps,
        callbacks=[training.decay_per_epoch(cfg["lr"], cfg["lr_decay"])],
    )
    test_loss, test_acc = model.evaluate(scale(arrays["x_test"]), arrays["y_test"], batch_size=1024, verbose=0)
    final = history[-1]
    return {"val_loss": final["val_loss"], "val_accuracy": final["val_accuracy"],
            "test_loss": float(test_loss), "test_accuracy": float(test_acc)}


def _classes(ctx: Context) -> list[str]:
    return ctx.run.read_names("classes.json", "class names", default=DIGITS)


def _test_predictions(ctx: Context):
    model = training.load_model(ctx.model_path, "mnist")
    arrays = load_arrays(ctx.cfg)
    probs = model.predict(scale(arrays["x_test"]), batch_size=1024, verbose=0)
    return model, arrays, probs


def other_eval_arrays(cfg: dict, classes: list[str]) -> tuple[np.ndarray, np.ndarray, str]:
    """(images, labels, metric prefix) of other data (`eval --dataset OTHER`): its test split
    ("test_": npz x_test/y_test, a folder's test/ or val/, a tfds "test") where it has one,
    else all of it (""). Labels are matched to the run's classes by name."""
    kind, value = data_lib.parse_dataset(cfg["dataset"], allowed=("tfds", "npz", "folder"))
    if kind == "npz":
        arrays = data_lib.load_npz(value, keys=())
        for xk, yk, prefix in (("x_test", "y_test", "test_"), ("x_train", "y_train", "")):
            if xk in arrays and yk in arrays:
                x, y, names = arrays[xk], arrays[yk], None
                break
        else:
            raise UsageError(f"{value} has neither x_test and y_test nor x_train and y_train "
                             f"(it has {', '.join(arrays) or 'no arrays'})")
    else:
        builder = data_lib.image_folder(value) if kind == "folder" else data_lib.tfds_builder(value, cfg["data_dir"])
        splits, held_out = data_lib.eval_splits(list(builder.info.splits.keys()))
        if kind == "folder":
            parts = [_folder_split(builder, split) for split in splits]
        else:
            parts = [(x[..., 0], y) for x, y in (data_lib.tfds_arrays(value, s, cfg["data_dir"]) for s in splits)]
        x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        names, prefix = builder.info.features["label"].names, "test_" if held_out else ""
    if x.ndim != 3 or x.shape[1:] != (28, 28):
        raise UsageError(f"{cfg['dataset']}: the images must be 28x28, got shape {x.shape}")
    return x, data_lib.relabel(y, names, classes, cfg["dataset"]), prefix


def evaluate(ctx: Context) -> dict:
    """Loss and accuracy on the test split; on other data (`--dataset OTHER`) on its test
    split, or on all of it where it has none (then without the `test_` prefix)."""
    if ctx.on_other_data:
        model = training.load_model(ctx.model_path, "mnist")
        x, y, prefix = other_eval_arrays(ctx.cfg, _classes(ctx).check_count(model.output_shape[-1]))
        what = "test images" if prefix else "images"
        ctx.reporter.info(f"evaluating all {len(x)} {what} of {ctx.cfg['dataset']} (not the run's training data)")
        probs = model.predict(scale(x), batch_size=1024, verbose=0)
    else:
        model, arrays, probs = _test_predictions(ctx)
        y, prefix = arrays["y_test"], "test_"
    eps = 1e-7
    loss = float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], eps, 1))))
    return {f"{prefix}loss": loss, f"{prefix}accuracy": float(np.mean(probs.argmax(1) == y)),
            f"{prefix}examples": int(len(y))}


# -- predict ------------------------------------------------------------------------------


def _lanczos(x: np.ndarray) -> np.ndarray:
    """Pillow's Lanczos-3 kernel: sinc(x) sinc(x/3) on |x| < 3."""
    x = np.abs(x.astype(np.float32))
    s3 = np.sin(np.float32(np.pi / 3) * x)  # sin(pi x) = 3 s3 - 4 s3^3: one sine, not two
    with np.errstate(divide="ignore", invalid="ignore"):
        w = (3 * s3 - 4 * s3 ** 3) * s3 * np.float32(3 / np.pi ** 2) / (x * x)
    return np.where(x < 3, np.where(x == 0, 1.0, w), 0.0).astype(np.float32)


def _resample_matrix(lo: np.ndarray, hi: np.ndarray, new: np.ndarray, start: np.ndarray, n_in: int) -> np.ndarray:
    """(B, 28, n_in) weights that resize input rows lo..hi (inclusive) of each image to `new`
    rows placed from row `start` of a 28-row canvas, with Pillow's Lanczos coefficients
    (each output row weighs the few input rows within the filter's support)."""
    size = (hi - lo + 1).astype(np.float64)
    scale = size / new
    filterscale = np.maximum(scale, 1.0)
    support = 3.0 * filterscale
    out = np.arange(28)[None, :] - start[:, None]  # output index inside the resized crop
    centre = (out + 0.5) * scale[:, None]
    taps = 2 * int(np.ceil(support.max())) + 1
    src = np.floor(centre - support[:, None] + 0.5).astype(np.int64)[:, :, None] + np.arange(taps)
    w = _lanczos((src + 0.5 - centre[:, :, None]) / filterscale[:, None, None])
    valid = (src >= 0) & (src < size[:, None, None]) & ((out >= 0) & (out < new[:, None]))[:, :, None]
    w = np.where(valid, w, 0)
    w /= np.maximum(w.sum(2, keepdims=True), 1e-12)
    matrix = np.zeros((len(lo), 28, n_in + 1), np.float32)  # the last column takes the unused taps
    np.put_along_axis(matrix, np.where(valid, src + lo[:, None, None], n_in), w, axis=2)
    return matrix[:, :, :n_in]


_MATRICES: dict[tuple[int, int], np.ndarray] = {}  # (n_in, crop key) -> its (28, n_in) weights


def _resample_matrices(lo: np.ndarray, hi: np.ndarray, new: np.ndarray, start: np.ndarray, n_in: int) -> np.ndarray:
    """`_resample_matrix` for a batch, computed once per distinct crop and kept for the next
    batches: 1,000 digits have a few dozen distinct (lo, hi, new, start), and computing the
    weights for every digit took half of `mnist_batch`'s time."""
    keys = ((lo.astype(np.int64) * n_in + hi) * 29 + new) * 29 + start  # one number a crop: 1-D unique is fast
    distinct, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    if n_in > 128:  # a photo: not kept, its weights would take memory for crops that rarely recur
        return _resample_matrix(lo[first], hi[first], new[first], start[first], n_in)[inverse.reshape(-1)]
    missing = [i for i, key in enumerate(distinct.tolist()) if (n_in, key) not in _MATRICES]
    if missing:
        if len(_MATRICES) > 2048:  # at most 2,048 x 14 KB
            _MATRICES.clear()
        at = first[missing]
        for i, matrix in zip(missing, _resample_matrix(lo[at], hi[at], new[at], start[at], n_in)):
            _MATRICES[(n_in, int(distinct[i]))] = matrix
    return np.stack([_MATRICES[(n_in, key)] for key in distinct.tolist()])[inverse.reshape(-1)]


def _ink(greys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, H, W) grey -> ink in 0..1 (background subtracted, white on black) and whether blank."""
    img = greys.astype(np.float32)
    border = np.concatenate([img[:, 0], img[:, -1], img[:, :, 0], img[:, :, -1]], axis=1)
    light = border.mean(1) > 127  # dark digit on a light background
    img[light] = 255.0 - img[light]
    border[light] = 255.0 - border[light]
    img = np.clip(img - np.median(border, axis=1)[:, None, None], 0, None)
    peak = img.max(axis=(1, 2))
    blank = peak <= 0
    return img / np.where(blank, 1.0, peak)[:, None, None], blank


def mnist_batch(greys: np.ndarray) -> tuple[np.ndarray, list[str | None]]:
    """Grey images of one shape (B, H, W) -> (B, 28, 28) digits and a note per image, in
    whole-array NumPy operations (no Python loop over images: `predict` on 1,000 files).

    As MNIST was made: grey, inverted if the digit is dark on a light background, cropped to
    the digit, scaled into a 20x20 box (Lanczos, with Pillow's coefficients and 8-bit rounding,
    so MNIST test digits come out identical to Pillow's resize) and centred by mass in 28x28.
    The note warns where an image is nothing like a digit: a digit is ink on plain paper, so
    after the background is subtracted few pixels are ink (MNIST: 8-30 %) and the ink is mostly
    solid (at most 83 % of it in mid tones for 99 % of MNIST test digits, enlarged 4x and so
    blurred); a photo is tones everywhere. On 300 MNIST test digits and 300 photos (flowers,
    faces, Flickr8k) this flags 0.3-0.7 % of the digits and 85 % of the photos.
    """
    ink, blank = _ink(greys)
    b, h, w = ink.shape
    mask = ink > 0.2
    rows_any, cols_any = mask.any(2), mask.any(1)
    top, bottom = rows_any.argmax(1), h - 1 - rows_any[:, ::-1].argmax(1)
    left, right = cols_any.argmax(1), w - 1 - cols_any[:, ::-1].argmax(1)
    ch, cw = bottom - top + 1, right - left + 1
    s = 20.0 / np.maximum(ch, cw)
    new_h, new_w = np.maximum(1, np.round(ch * s)).astype(int), np.maximum(1, np.round(cw * s)).astype(int)
    # As Pillow resizes it: the crop in 8 bits, resized, rounded back to 8 bits.
    pixels = np.floor(ink * 255)
    wr = _resample_matrices(top, bottom, new_h, (28 - new_h) // 2, h)
    wc = _resample_matrices(left, right, new_w, (28 - new_w) // 2, w)
    canvas = np.clip(np.round(wr @ pixels @ wc.transpose(0, 2, 1)), 0, 255) / 255.0
    canvas[blank] = 0
    # shift the centre of mass to the middle, as MNIST does
    total = canvas.sum((1, 2))
    safe = np.where(total > 0, total, 1.0)
    cy = (canvas.sum(2) * np.arange(28)).sum(1) / safe
    cx = (canvas.sum(1) * np.arange(28)).sum(1) / safe
    dy = np.where(total > 0, np.round(13.5 - cy), 0).astype(int)
    dx = np.where(total > 0, np.round(13.5 - cx), 0).astype(int)
    idx = np.arange(28)
    rows = (idx[None, :] - dy[:, None]) % 28
    cols = (idx[None, :] - dx[:, None]) % 28
    canvas = canvas[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
    # the note: a digit is ink on plain paper, a photo is tones everywhere (see not_a_digit)
    share = mask.mean((1, 2))
    mid = (mask & (ink < 0.8)).sum((1, 2)) / np.maximum(mask.sum((1, 2)), 1)
    notes = ["the image is blank; the answer is a guess" if z else
             "this does not look like a digit on plain paper (a photo?); the answer is a guess" if (sh > 0.40 or md > 0.88)
             else None for z, sh, md in zip(blank, share, mid)]
    return np.clip(canvas, 0, 1).astype(np.float32), notes


def to_mnist(image: np.ndarray) -> np.ndarray:
    """Any grey image -> a 28x28 float digit, white on black, centred like MNIST's."""
    return mnist_batch(image[None])[0][0]


def not_a_digit(grey: np.ndarray) -> str | None:
    """A warning where the image is nothing like a digit (a photo), else None (see `mnist_batch`)."""
    return mnist_batch(grey[None])[1][0]


def _prepare(path: str) -> np.ndarray:
    return read_image(path, mode="L")


def _finish(ctx: Context, model, classes: list[str], paths: list[str], greys: list[np.ndarray]) -> list[dict]:
    """One batch: MNIST-style preprocessing per group of equal shapes (whole-array NumPy), the
    model, the rows."""
    digits = np.zeros((len(greys), 28, 28), np.float32)
    notes: list[str | None] = [None] * len(greys)
    groups: dict[tuple, list[int]] = {}
    for i, grey in enumerate(greys):
        groups.setdefault(grey.shape, []).append(i)
    for shape, members in groups.items():
        step = max(1, 4_000_000 // (shape[0] * shape[1]))  # a few million pixels at a time
        for s in range(0, len(members), step):
            part = members[s: s + step]
            batch, part_notes = mnist_batch(np.stack([greys[i] for i in part]))
            digits[part] = batch
            for i, note in zip(part, part_notes):
                notes[i] = note
    rows = ranked_rows(paths, model(digits), classes, ctx.options["top_k"], key="digit")
    for row, note in zip(rows, notes):
        for ranked in [row, *row.get("top", [])]:  # JSON numbers for the digits 0-9
            ranked["digit"] = int(ranked["digit"]) if str(ranked["digit"]).isdigit() else ranked["digit"]
        if note:
            row["note"] = note
    return rows


def predictor(ctx: Context) -> Predictor:
    """Decode a file; MNIST-style preprocessing, the model and the rows per batch."""
    model = lite.model_for(ctx, "mnist")
    classes = _classes(ctx)
    return Predictor(_prepare, lambda paths, greys: _finish(ctx, model, classes, paths, greys), 256)


# Rows for every input, a batch at a time (small files decoded in this thread, larger ones ahead
# in threads; see `inputs.stream`).
predict_stream = stream_through(predictor)


def predict(ctx: Context, inputs: list[str]) -> list[dict]:
    if not inputs:
        raise UsageError("give image files to classify: `dlcli predict mnist digit.png [more.png ...]`")
    return list(predict_stream(ctx, inputs))


# -- views --------------------------------------------------------------------------------


def view_confusion(ctx: Context) -> Path:
    from dlcli.plots import confusion_matrix, confusion_plot

    _, arrays, probs = _test_predictions(ctx)
    classes = _classes(ctx).check_count(probs.shape[1])
    matrix = confusion_matrix(arrays["y_test"], probs.argmax(1), len(classes))
    acc = np.trace(matrix) / matrix.sum()
    return confusion_plot(matrix, classes, ctx.view_path("mnist-confusion"),
                          f"mnist / {ctx.run.name}: test accuracy {acc:.4f}")


def error_caption(true: str, pred: str, probability: float) -> str:
    """Two short lines, so that eight captions side by side never run into each other."""
    return f"true {true}\npred {pred} ({probability:.2f})"


def view_errors(ctx: Context) -> Path:
    from dlcli.plots import image_grid

    _, arrays, probs = _test_predictions(ctx)
    classes = _classes(ctx).check_count(probs.shape[1])
    pred = probs.argmax(1)
    wrong = np.nonzero(pred != arrays["y_test"])[0]
    wrong = wrong[np.argsort(-probs[wrong, pred[wrong]])][: ctx.options["n"]]
    titles = [error_caption(classes[arrays["y_test"][i]], classes[pred[i]], probs[i, pred[i]]) for i in wrong]
    return image_grid([arrays["x_test"][i] for i in wrong], ctx.view_path("mnist-errors"),
                      titles=titles, cols=8, suptitle=f"mnist / {ctx.run.name}: {len(np.nonzero(pred != arrays['y_test'])[0])} test errors, most confident first")


def export_preprocessing(cfg: dict) -> dict:
    """What a user of the exported model does to an image before it (export.json)."""
    return {"input": "grey image of any size", "steps": [
        "invert if the border is light (dark digit on light paper)", "subtract the border's median, clip at 0",
        "divide by the maximum", "crop to the pixels above 0.2", "resize the longer side to 20 (Lanczos)",
        "paste in the middle of 28x28", "shift the centre of mass to (13.5, 13.5)"],
        "code": "dlcli.tasks.mnist.mnist_batch", "shape": [28, 28], "range": [0.0, 1.0]}


EXPORT = ExportSpec(preprocessing=export_preprocessing, classes=_classes)


# What this task's own config keys mean (and its own meaning of shared ones), for
# `dlcli tasks TASK` and `train --help`; keys every task shares are in `config.KEY_HELP`.
KEY_HELP = {
    "hidden": "units of each hidden dense layer (mlp, cnn)",
}


TASK = TaskSpec(
    name="mnist",
    summary="handwritten digits: softmax regression, the course's MLP, a small CNN",
    defaults=DEFAULTS,
    data=DataRules(kinds=("tfds", "npz", "folder"), npz_keys=("x_train", "y_train", "x_test", "y_test"), labelled_folder=True),
    choices=CHOICES,
    train=train,
    evaluate=evaluate,
    predict=predict,
    predict_options={"top_k": Option(int, 1, "how many digits to list per image")},
    views={
        "mnist-confusion": View(view_confusion, "confusion matrix on the test set"),
        "mnist-errors": View(view_errors, "misclassified test digits with true and predicted labels",
                             options={"n": Option(int, 32, "how many errors to show")}),
    },
    key_help=KEY_HELP,
    inputs=FileInputs(),
    predict_stream=predict_stream,
    predictor=predictor,
    export=EXPORT,
)
