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

from dlcli import data as data_lib
from dlcli import training
from dlcli.errors import UsageError
from dlcli.images import in_input_order, ranked_rows, read_image, read_many
from dlcli.lazy import lazy_import
from dlcli.runs import atomic_write_json
from dlcli.tasks import Context, Option, TaskSpec, View, common_defaults

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
    return x.astype("float32") / 255.0


def split_validation(arrays: dict, val_size: int):
    x, y = arrays["x_train"], arrays["y_train"]
    val_size = min(val_size, len(x) // 5)
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
    (x_train, y_train), (x_val, y_val) = split_validation(arrays, cfg["val_size"])
    atomic_write_json(ctx.run.path("classes.json"), arrays["classes"])
    x_train, x_val = scale(x_train), scale(x_val)
    train_data, steps = training.array_epochs(x_train, y_train, cfg["batch_size"], cfg["seed"])
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
    return ctx.run.read_json("classes.json", default=DIGITS)


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
        x, y, prefix = other_eval_arrays(ctx.cfg, _classes(ctx))
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


def to_mnist(image: np.ndarray) -> np.ndarray:
    """Any grey image -> a 28x28 float digit, white on black, centred like MNIST's."""
    from PIL import Image

    img = image.astype(np.float32)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    if border.mean() > 127:  # dark digit on a light background
        img, border = 255.0 - img, 255.0 - border
    img = np.clip(img - np.median(border), 0, None)  # the background becomes 0
    if img.max() <= 0:
        return np.zeros((28, 28), np.float32)
    img = img / img.max()
    rows, cols = np.nonzero(img > 0.2)
    crop = img[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1]
    h, w = crop.shape
    s = 20.0 / max(h, w)
    new_h, new_w = max(1, round(h * s)), max(1, round(w * s))
    small = np.asarray(Image.fromarray((crop * 255).astype(np.uint8)).resize((new_w, new_h), Image.LANCZOS), np.float32) / 255.0
    canvas = np.zeros((28, 28), np.float32)
    top, left = (28 - new_h) // 2, (28 - new_w) // 2
    canvas[top: top + new_h, left: left + new_w] = small
    # shift the centre of mass to the middle, as MNIST does
    total = canvas.sum()
    if total <= 0:  # a few faint dots, too sparse to survive the scaling: nothing to centre
        return canvas
    cy = (canvas.sum(1) * np.arange(28)).sum() / total
    cx = (canvas.sum(0) * np.arange(28)).sum() / total
    dy, dx = int(round(13.5 - cy)), int(round(13.5 - cx))
    canvas = np.roll(np.roll(canvas, dy, axis=0), dx, axis=1)
    return np.clip(canvas, 0, 1)


def predict(ctx: Context, inputs: list[str]) -> list[dict]:
    if not inputs:
        raise UsageError("give image files to classify: `dlcli predict mnist digit.png [more.png ...]`")
    model = training.load_model(ctx.model_path, "mnist")
    classes = _classes(ctx)
    good, read, failures = read_many(inputs, lambda p: _digit_and_note(read_image(p, mode="L")))
    rows = []
    if read:
        probs = model.predict(np.stack([digit for digit, _ in read]), batch_size=256, verbose=0)
        rows = ranked_rows(good, probs, classes, ctx.options["top_k"], key="digit")
        for row, (_, note) in zip(rows, read):
            for ranked in [row, *row.get("top", [])]:  # JSON numbers for the digits 0-9
                ranked["digit"] = int(ranked["digit"]) if str(ranked["digit"]).isdigit() else ranked["digit"]
            if note:
                row["note"] = note
    return in_input_order(inputs, rows + failures)


def _digit_and_note(grey: np.ndarray) -> tuple[np.ndarray, str | None]:
    return to_mnist(grey), not_a_digit(grey)


def not_a_digit(grey: np.ndarray) -> str | None:
    """A warning where the image is nothing like a digit (a photo), else None.

    A digit is ink on plain paper: after the background is subtracted few pixels are ink
    (MNIST: 8-30 %) and the ink is mostly solid (at most 83 % of it in mid tones for 99 % of
    MNIST test digits, enlarged 4x and so blurred). A photo is tones everywhere. Measured on
    300 MNIST test digits and 300 photos (flowers, faces, Flickr8k): this flags 0.3-0.7 % of
    the digits and 85 % of the photos.
    """
    img = grey.astype(np.float32)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    if border.mean() > 127:
        img, border = 255.0 - img, 255.0 - border
    img = np.clip(img - np.median(border), 0, None)
    if img.max() <= 0:
        return "the image is blank; the answer is a guess"
    img /= img.max()
    ink = img > 0.2
    share, mid = ink.mean(), (ink & (img < 0.8)).sum() / ink.sum()
    if share > 0.40 or mid > 0.88:
        return "this does not look like a digit on plain paper (a photo?); the answer is a guess"
    return None


# -- views --------------------------------------------------------------------------------


def view_confusion(ctx: Context) -> Path:
    from dlcli.plots import confusion_matrix, confusion_plot

    _, arrays, probs = _test_predictions(ctx)
    classes = _classes(ctx)
    matrix = confusion_matrix(arrays["y_test"], probs.argmax(1), len(classes))
    acc = np.trace(matrix) / matrix.sum()
    return confusion_plot(matrix, classes, ctx.out or ctx.run.views_path("mnist-confusion"),
                          f"mnist / {ctx.run.name}: test accuracy {acc:.4f}")


def error_caption(true: str, pred: str, probability: float) -> str:
    """Two short lines, so that eight captions side by side never run into each other."""
    return f"true {true}\npred {pred} ({probability:.2f})"


def view_errors(ctx: Context) -> Path:
    from dlcli.plots import image_grid

    _, arrays, probs = _test_predictions(ctx)
    classes = _classes(ctx)
    pred = probs.argmax(1)
    wrong = np.nonzero(pred != arrays["y_test"])[0]
    wrong = wrong[np.argsort(-probs[wrong, pred[wrong]])][: ctx.options["n"]]
    titles = [error_caption(classes[arrays["y_test"][i]], classes[pred[i]], probs[i, pred[i]]) for i in wrong]
    return image_grid([arrays["x_test"][i] for i in wrong], ctx.out or ctx.run.views_path("mnist-errors"),
                      titles=titles, cols=8, suptitle=f"mnist / {ctx.run.name}: {len(np.nonzero(pred != arrays['y_test'])[0])} test errors, most confident first")


TASK = TaskSpec(
    name="mnist",
    summary="handwritten digits: softmax regression, the course's MLP, a small CNN",
    defaults=DEFAULTS,
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
)
