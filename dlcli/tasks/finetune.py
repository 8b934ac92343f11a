"""Task `finetune`: a pretrained backbone with a new softmax head, trained in two phases.

Week 3, task 2 of the course: InceptionV3 (ImageNet weights, no top) + global average
pooling + a new dense softmax, on Oxford Flowers-102. Images are centre-cropped square,
resized (250 px as in the course; 299 is InceptionV3's own size) and put through the
backbone's `preprocess_input`.

Training follows the Keras transfer-learning guide:
  phase 1  `head_epochs` epochs with the whole backbone frozen, at `lr`;
  phase 2  the last `fine_tune_layers` layers of the backbone unfrozen, at `fine_tune_lr`,
           up to `epochs` epochs in all.
With `--weights none` the backbone's kernels are drawn He-uniform from the seed (see
`backbones.build`): Keras's default initialisation shrinks the pooled features of these
deep nets to about 1e-12, and with BatchNorm in inference mode nothing rescales them.

The backbone is called with `training=False`, so its BatchNorm layers stay in inference
mode (their statistics never move) in both phases, and the BatchNorm layers stay frozen
(`trainable = False`) in phase 2 as well. The second is what holds after a reload: Keras 3
does not keep the `training=False` of a nested call in a saved model's config, but it
always runs a frozen BatchNorm layer in inference mode.

Both phases go through the engine's `training.fit`, one history and one set of per-epoch
checkpoints: phase 1 is `fit` with `epochs = head_epochs`; at the boundary the phase-1
model is unfrozen, recompiled and saved as the checkpoint of epoch `head_epochs` marked
`phase: 2`; phase 2 is `fit` resumed from that checkpoint up to `epochs`. A run resumed
with `--resume` therefore knows its phase from its newest checkpoint alone: fewer than
`head_epochs` epochs done means phase 1, else phase 2 (the unfrozen model and its
optimizer state were saved with it). Every history row has a `phase` column (1 or 2),
which `training-curves` draws as a boundary.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from dlcli import backbones
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
    **common_defaults(dataset="oxford_flowers102", epochs=12, batch_size=32, lr=1e-3),
    **training.keras_defaults(),
    **backbones.backbone_defaults(image_size=250),
    "head_epochs": 4,
    "fine_tune_layers": 50,
    "fine_tune_lr": 1e-4,
    "dropout": 0.2,
    "augment": True,
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


def split_data(cfg: dict, builder, split: str):
    """(tf.data of (uint8 square crops, labels), number of examples), unbatched, in file order."""
    size = cfg["image_size"]
    ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)

    def crop(image, label):
        image = image[..., :3] if image.shape[-1] != 1 else tf.image.grayscale_to_rgb(image)
        return backbones.crop_resize(image, size), label

    return ds.map(crop, num_parallel_calls=tf.data.AUTOTUNE), builder.info.splits[split].num_examples


def batches(cfg: dict, ds):
    name = cfg["backbone"]
    return ds.batch(cfg["batch_size"]).map(lambda x, y: (backbones.preprocess(name, x), y),
                                           num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


# -- model --------------------------------------------------------------------------------


def base_of(model):
    """The backbone: the one nested model inside the classifier."""
    return next(layer for layer in model.layers if isinstance(layer, keras.Model))


def _compile(model, cfg: dict, lr: float) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy", keras.metrics.SparseTopKCategoricalAccuracy(k=5, name="top5_accuracy")],
        jit_compile=cfg["jit_compile"],
    )


def build_model(cfg: dict, n_classes: int):
    """Phase-1 model: frozen backbone (inference mode), pooling, dropout, a new softmax head."""
    size = cfg["image_size"]
    base = backbones.build(cfg, deterministic_seed=cfg["seed"] or 0)
    base.trainable = False
    inputs = keras.Input((size, size, 3), name="image")
    x = keras.layers.RandomFlip("horizontal", name="flip")(inputs) if cfg["augment"] else inputs
    x = base(x, training=False)  # BatchNorm in inference mode, in both phases
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(cfg["dropout"], name="head_dropout")(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax", name="classes")(x)
    model = keras.Model(inputs, outputs, name=f"finetune_{cfg['backbone']}")
    _compile(model, cfg, cfg["lr"])
    return model


def unfreeze(model, cfg: dict):
    """Phase 2: the last `fine_tune_layers` backbone layers trainable (0: all), BatchNorm kept
    frozen, and a fresh optimizer at `fine_tune_lr`."""
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


def phase_callback(phase: int):
    """Adds `phase` to each epoch's logs, so history rows (and history.csv) carry it."""

    class _Phase(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if logs is not None:
                logs["phase"] = phase

    return _Phase()


# -- train / evaluate ---------------------------------------------------------------------


def _epochs_done(ctx: Context) -> tuple[int, dict]:
    backup = ctx.run.latest_backup() if ctx.resume else None
    if backup is None:
        return 0, {}
    state = ctx.run.read_backup_state(backup)
    return state["epochs_done"], state


def _start_phase_two(ctx: Context, head_epochs: int) -> None:
    """Turn the phase-1 checkpoint of epoch `head_epochs` into the phase-2 starting point."""
    run = ctx.run
    backup = run.latest_backup()
    state = run.read_backup_state(backup)
    if state["epochs_done"] != head_epochs or state.get("steps_done") or state.get("phase") == 2:
        return  # already in phase 2
    model = unfreeze(training.load_model(backup / "model.keras", "finetune"), ctx.cfg)
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    ctx.reporter.info(f"phase 2: {cfg_layers(ctx.cfg)} of the backbone unfrozen, lr {ctx.cfg['fine_tune_lr']:g}, "
                      f"{trainable:,} trainable parameters")
    run.save_backup(head_epochs, state["history"], {"model.keras": model.save}, extra={"phase": 2})


def cfg_layers(cfg: dict) -> str:
    return f"the last {cfg['fine_tune_layers']} layers" if cfg["fine_tune_layers"] > 0 else "all layers"


def train(ctx: Context) -> dict:
    cfg = ctx.cfg
    training.set_seed(cfg["seed"])
    backbones.check_size(cfg)
    backbones.resolve_weights(cfg)  # the weights error comes before any data work
    builder, train_split, val_split, _ = _source(cfg)
    classes = class_names(builder)
    atomic_write_json(ctx.run.path("classes.json"), classes)
    train_ds, n_train = split_data(cfg, builder, train_split)
    train_ds = train_ds.cache()
    val_ds, _ = split_data(cfg, builder, val_split)
    val_batches = batches(cfg, val_ds.cache())

    def train_data(epoch):
        return batches(cfg, train_ds.shuffle(n_train, seed=training.epoch_seed(cfg["seed"], epoch)))

    steps = -(-n_train // cfg["batch_size"])
    head_epochs = min(cfg["head_epochs"], cfg["epochs"])
    done, _ = _epochs_done(ctx)
    history = []
    if done < head_epochs:
        phase1 = dataclasses.replace(ctx, cfg={**cfg, "epochs": head_epochs})
        ctx.reporter.info(f"phase 1: {head_epochs} epochs with the backbone frozen, lr {cfg['lr']:g}")
        model, history = training.fit(phase1, lambda: build_model(cfg, len(classes)), train_data, val_batches,
                                      steps_per_epoch=steps, callbacks=[phase_callback(1)])
    if cfg["epochs"] > head_epochs:
        if head_epochs > 0:
            _start_phase_two(ctx, head_epochs)
        phase2 = dataclasses.replace(ctx, resume=ctx.resume or head_epochs > 0)
        model, history = training.fit(phase2, lambda: unfreeze(build_model(cfg, len(classes)), cfg), train_data,
                                      val_batches, steps_per_epoch=steps, callbacks=[phase_callback(2)])
    final = history[-1]
    head = [row for row in history if row.get("phase") == 1]
    return {
        "val_loss": final["val_loss"],
        "val_accuracy": final["val_accuracy"],
        "val_top5_accuracy": final["val_top5_accuracy"],
        **({"head_val_accuracy": head[-1]["val_accuracy"]} if head else {}),
        "epochs": len(history),
        "classes": len(classes),
    }


def _classes(ctx: Context) -> list[str]:
    return ctx.run.read_json("classes.json")


def evaluate(ctx: Context) -> dict:
    cfg = ctx.cfg
    model = training.load_model(ctx.model_path, "finetune")
    builder, _, _, test_split = _source(cfg)
    if len(class_names(builder)) != len(_classes(ctx)):
        raise UsageError(f"{cfg['dataset']} has {len(class_names(builder))} classes; the model knows {len(_classes(ctx))}")
    ds, n = split_data(cfg, builder, test_split)
    loss, acc, top5 = model.evaluate(batches(cfg, ds), verbose=0)
    return {"split": test_split, "test_loss": float(loss), "test_accuracy": float(acc),
            "test_top5_accuracy": float(top5), "test_examples": int(n)}


# -- predict ------------------------------------------------------------------------------


def predict(ctx: Context, inputs: list[str]) -> list[dict]:
    if not inputs:
        raise UsageError("give image files to classify: `dlcli predict finetune photo.jpg [more.jpg ...]`")
    cfg = ctx.cfg
    model = training.load_model(ctx.model_path, "finetune")
    classes = _classes(ctx)
    good, images, failures = read_many(inputs, lambda p: read_image(p, mode="RGB"))
    rows = []
    for start in range(0, len(images), 64):
        chunk = backbones.prepare_numpy(cfg["backbone"], images[start:start + 64], cfg["image_size"])
        rows += ranked_rows(good[start:start + 64], model.predict(chunk, verbose=0), classes, ctx.options["top_k"])
    return in_input_order(inputs, rows + failures)


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
    probs = model.predict(np.asarray(backbones.preprocess(cfg["backbone"], np.stack(images))), verbose=0)
    pred = probs.argmax(1)
    titles = [f"{classes[p]} {probs[i, p]:.2f}" + ("" if p == y else f"\n(true {classes[y]})")
              for i, (p, y) in enumerate(zip(pred, labels))]
    colors = ["green" if p == y else "red" for p, y in zip(pred, labels)]
    right = int(sum(p == y for p, y in zip(pred, labels)))
    return image_grid(images, ctx.out or ctx.run.views_path("finetune-samples"), titles=titles, title_colors=colors,
                      cols=6, tile_inches=1.8,
                      suptitle=f"finetune / {ctx.run.name}: {right} of {count} validation images right")


TASK = TaskSpec(
    name="finetune",
    summary="fine-tune a pretrained backbone (InceptionV3) on flowers or any image folder",
    defaults=DEFAULTS,
    choices=CHOICES,
    train=train,
    evaluate=evaluate,
    predict=predict,
    predict_options={"top_k": Option(int, 3, "how many classes to list per image")},
    views={
        "finetune-samples": View(view_samples, "validation images with predicted classes (wrong ones in red)",
                                 options={"n": Option(int, 18, "how many images to show")}),
    },
)
