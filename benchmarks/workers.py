"""Child-process measurements of the suite; each prints one JSON document on stdout.

    python benchmarks/workers.py reference TASK --spec JSON
        The plain Keras script: the task's architecture (its own build function, used ONLY
        to build and compile the model), the same in-memory arrays as the dlcli run, and a
        bare `model.fit(..., verbose=0)`; prints the time at which each epoch ended.
        gan, finetune and caption have their own short scripts (`OWN_SCRIPTS`): a tf.data
        set for the GAN's train_step, finetune's two phases (phase 2 timed), caption's
        cached image embeddings.
    python benchmarks/workers.py pipeline TASK --data DIR --batch-size B
        The task's own input pipeline alone (read files, decode, preprocess, batch), no model.
    python benchmarks/workers.py predict-ref TASK --model FILE --images LIST --repeats R
        `model.predict` on the images already decoded and preprocessed in memory.
    python benchmarks/workers.py predict-cli TASK --model FILE --images LIST [--engine lite]
        `dlcli predict` in this process on the same files: Keras, or the run's export (LiteRT).
    python benchmarks/workers.py predict-floor cnn --model FILE --images LIST --repeats R
        The floor under a one-call cnn predict through Keras, beside `predict-ref`'s reference
        in the same process: loading the model and running predict's batches (128 images and
        their mirrors) on images already in memory, nothing else; the best ratio any call can have.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dlcli.engine.lazy import import_tensorflow_quietly  # noqa: E402

import_tensorflow_quietly()

import numpy as np  # noqa: E402
import keras  # noqa: E402

from dlcli import config as config_lib  # noqa: E402
from dlcli.engine.keras_workarounds import without_autotune_thread  # noqa: E402
from dlcli.tasks import Context, get_task  # noqa: E402


def task_cfg(task: str, spec: dict) -> dict:
    """The resolved config the dlcli run used (task defaults + the benchmark's overrides)."""
    t = get_task(task)
    return config_lib.resolve(t.defaults, flags=spec.get("flags", {}), choices=t.choices)


class QuietReporter:
    """The tasks' data helpers (cached features, embeddings) say what they compute; not here."""

    def info(self, message: str) -> None:
        pass


class Clock(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.ends = []

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.ends.append(time.perf_counter() - self.start)


# -- the same arrays as the dlcli run, per task ------------------------------------------------


def arrays(task: str, cfg: dict):
    """((x_train, y_train), (x_val, y_val), build()) exactly as the task's train() makes them."""
    mod = __import__(f"dlcli.tasks.{task}", fromlist=["x"])
    if task == "mnist":
        a = mod.load_arrays(cfg)
        (xt, yt), (xv, yv) = mod.split_validation(a, cfg["val_size"])
        return (mod.scale(xt), yt), (mod.scale(xv), yv), lambda: mod.build_model(cfg, len(a["classes"]))
    if task == "names":
        tr, va = mod.split_lines(mod.load_lines(cfg), cfg["val_fraction"], cfg["seed"])
        vocab = mod.Vocab(sorted(set("".join(tr + va))), max(map(len, tr)))
        length = max(map(len, tr + va)) + 1
        return mod.to_arrays(tr, vocab, length), mod.to_arrays(va, vocab, length), lambda: mod.build_model(cfg, vocab.size)
    if task == "cnn":
        x, y, classes = mod.load_split(cfg, "train")
        (xt, yt), (xv, yv) = mod.split_validation(x, y, cfg["val_size"], cfg["seed"])
        one_hot = np.eye(len(classes), dtype=np.float32)
        return ((mod.scale(xt), one_hot[yt]), (mod.scale(xv), one_hot[yv]),
                lambda: mod.build_model(cfg, len(classes), xt))
    if task == "autoencoder":  # the same faces, the same split; fit(x, x) with no LR schedule
        from dlcli.data import faces

        ids, x, people = faces.load_faces_and_people(cfg)
        train, val, _ = faces.draw_split(ids, people, cfg)
        xt, xv = mod.scale(x[train]), mod.scale(x[val])
        return (xt, xt), (xv, xv), lambda: mod.build_model(cfg)
    raise SystemExit(f"no plain-Keras reference for task {task}")


# -- the tasks that need more than arrays: their own plain scripts -----------------------------


def gan_script(cfg: dict) -> dict:
    """The same faces and split as a new run, whole batches of real faces from a tf.data set
    (fit(x) would hand train_step a tuple), the task's compiled FaceGAN, and KID/FID after
    each `kid_every`-th epoch as the task does it (its validation): `Distance` on the
    averaged generator, in a callback before the clock's."""
    import tensorflow as tf

    from dlcli.data import faces
    from dlcli.tasks import gan

    ids, x = faces.load_faces(cfg)
    train, val = faces.split_ids(ids, cfg["val_fraction"], cfg["seed"])
    x_train, x_val = gan.scale(x[train]), gan.scale(x[val])
    batch = min(cfg["batch_size"], len(x_train))
    real = (tf.data.Dataset.from_tensor_slices(x_train).shuffle(len(x_train), seed=cfg["seed"])
            .batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE))
    model = gan.new_gan(cfg)  # architecture, optimizers and compile only
    callbacks = []
    if cfg["kid_every"]:
        distance = gan.Distance(x_val, cfg)
        every = cfg["kid_every"]

        class KID(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                if (epoch + 1) % every == 0 or epoch + 1 == cfg["epochs"]:
                    logs.update(distance(self.model.sampling_generator()))

        callbacks.append(KID())
    clock = Clock()
    model.fit(without_autotune_thread(real), epochs=cfg["epochs"], verbose=0, callbacks=[*callbacks, clock])
    # one step = one generator step over `batch` real faces; the remainder is dropped
    return {"examples": (len(x_train) // batch) * batch, "epoch_ends": clock.ends}


def finetune_script(cfg: dict) -> dict:
    """Both phases as the task's recipe has them, the images decoded once into arrays:
    phase 1 the head alone on cached pooled features (`cached_features`, `build_head`),
    untimed; phase 2, timed, the unfrozen classifier (`build_model`, `unfreeze`) on the
    task's random crops and mirror images (`augmented`, `batches`), with the cosine rate,
    validated each epoch. The crops are drawn once (epoch 0's) and shuffled each epoch: the
    task draws new ones per epoch, at the same cost. run.py compares phase 2's epochs."""
    import tensorflow as tf

    from dlcli.tasks import finetune

    builder, train_split, val_split, _ = finetune._source(cfg)
    n_classes = len(finetune.class_names(builder))

    def in_memory(split, size=None):
        ds, _ = finetune.split_data(cfg, builder, split, size)
        images, labels = zip(*ds.as_numpy_iterator())
        return np.stack(images), np.array(labels)

    images, labels = in_memory(train_split, finetune.stored_size(cfg))
    val_images, val_labels = in_memory(val_split)
    train_ds = tf.data.Dataset.from_tensor_slices((images, labels))
    val_ds = tf.data.Dataset.from_tensor_slices((val_images, val_labels))
    model = finetune.build_model(cfg, n_classes)
    head_epochs = min(cfg["head_epochs"], cfg["epochs"])
    if head_epochs:
        features, val_features = finetune.cached_features(Context(cfg, None, QuietReporter()), model, train_ds, val_ds,
                                                          n_classes)
        head = finetune.build_head(cfg, n_classes, features.element_spec[0].shape[0])
        n = int(features.cardinality())
        head.fit(features.shuffle(n, seed=cfg["seed"]).batch(cfg["batch_size"]), epochs=head_epochs,
                 validation_data=val_features.batch(256), verbose=0)
        model.get_layer("classes").set_weights(head.get_layer("classes").get_weights())
    finetune.unfreeze(model, cfg)
    indexed = tf.data.Dataset.zip((tf.data.Dataset.range(len(images)), train_ds)).map(lambda i, pair: (i, *pair))
    shuffled = indexed.shuffle(len(images), seed=cfg["seed"])  # reshuffled each epoch
    crops = finetune.augmented(cfg, shuffled, 0, cfg["seed"] or 0) if cfg["augment"] else shuffled.map(lambda i, x, y: (x, y))
    clock = Clock()
    model.fit(without_autotune_thread(finetune.batches(cfg, crops, n_classes)), initial_epoch=head_epochs,
              epochs=cfg["epochs"], validation_data=without_autotune_thread(finetune.batches(cfg, val_ds, n_classes)),
              verbose=0,
              callbacks=[finetune.cosine_schedule(cfg), clock])
    return {"examples": int(len(images)), "epoch_ends": clock.ends}


def caption_script(cfg: dict) -> dict:
    """The task's embeddings of `train_views` crops per training image and of the held-out
    images (computed here into a temporary cache, as a first run computes them), every caption
    paired with one view, and fit on arrays: ([embedding, words in], next words, weight 0 on
    padding), the cosine rate, validated on the held-out captions. The views are drawn once;
    the task draws them per epoch, at the same cost."""
    from dlcli.engine import schedules
    from dlcli.tasks import caption

    data = caption.load_data(cfg)
    vocab = caption.build_vocab([c for _, caps in data.train for c in caps], cfg["min_word_count"])
    with tempfile.TemporaryDirectory(prefix="caption-embeddings-") as cache:
        ctx = Context({**cfg, "cache_dir": cache}, None, QuietReporter())
        views = caption.embeddings(ctx, data, data.train, data.train_split, views=cfg["train_views"])
        held_vectors = caption.heldout_embeddings(ctx, data)
    index, tokens = caption.caption_arrays(data.train, vocab, cfg["max_caption_tokens"])
    held_index, held_tokens = caption.caption_arrays(data.heldout, vocab, cfg["max_caption_tokens"])
    view = np.random.default_rng(cfg["seed"]).integers(0, len(views), len(index))

    def xyw(vectors, words):
        return [vectors, words[:, :-1]], words[:, 1:], (words[:, 1:] != caption.PAD_ID).astype("float32")

    x, y, w = xyw(views[view, index], tokens)
    model = caption.build_model(cfg, views.shape[2], len(vocab), views[0].mean(0), views[0].var(0) + 1e-6)
    clock = Clock()
    model.fit(x, y, sample_weight=w, batch_size=cfg["batch_size"], epochs=cfg["epochs"], shuffle=True,
              validation_data=xyw(held_vectors[held_index], held_tokens), validation_batch_size=256, verbose=0,
              callbacks=[schedules.cosine_per_epoch(cfg["lr"], first=0, length=cfg["epochs"]), clock])
    return {"examples": int(len(tokens)), "epoch_ends": clock.ends}


OWN_SCRIPTS = {"gan": gan_script, "finetune": finetune_script, "caption": caption_script}


def plain_fit(model, train, val, batch_size: int, epochs: int) -> list[float]:
    """The plain script: arrays in memory, same batch size, shuffled each epoch, validated;
    returns the seconds from the start of training to the end of each epoch."""
    clock = Clock()
    model.fit(*train, batch_size=batch_size, epochs=epochs, validation_data=val, validation_batch_size=1024,
              shuffle=True, verbose=0, callbacks=[clock])
    return clock.ends


def reference(args, spec):
    cfg = task_cfg(args.task, spec)
    keras.utils.set_random_seed(cfg["seed"])
    if args.task in OWN_SCRIPTS:
        return OWN_SCRIPTS[args.task](cfg)
    train, val, build = arrays(args.task, cfg)
    ends = plain_fit(build(), train, val, cfg["batch_size"], cfg["epochs"])  # build: architecture and compile only
    return {"examples": int(len(train[0])), "epoch_ends": ends}


def pipeline(args, spec):
    """Seconds for the task's data path from files to the first full epoch of batches."""
    cfg = task_cfg(args.task, spec)
    mod = __import__(f"dlcli.tasks.{args.task}", fromlist=["x"])
    from dlcli.engine import training

    t0 = time.perf_counter()
    if args.task == "mnist":
        a = mod.load_arrays(cfg)
        (xt, yt), _ = mod.split_validation(a, cfg["val_size"])
        train_data, _ = mod.training_epochs(xt, yt, cfg)
    elif args.task == "names":
        tr, va = mod.split_lines(mod.load_lines(cfg), cfg["val_fraction"], cfg["seed"])
        vocab = mod.Vocab(sorted(set("".join(tr + va))), max(map(len, tr)))
        xt, yt = mod.to_arrays(tr, vocab, max(map(len, tr + va)) + 1)
        train_data, _ = training.array_epochs(xt, yt, cfg["batch_size"], cfg["seed"])
    elif args.task == "cnn":
        x, y, classes = mod.load_split(cfg, "train")
        (xt, yt), _ = mod.split_validation(x, y, cfg["val_size"], cfg["seed"])
        ex = mod.examples(xt, yt)
        train_data = lambda e: mod.batches(ex, cfg["batch_size"], len(classes), training.epoch_seed(cfg["seed"], e),  # noqa: E731
                                           shuffle=True)
    elif args.task == "linear":
        d = mod.load_data(cfg)
        mod.expand(d["x_train"])
        first = time.perf_counter() - t0
        return {"examples": int(len(d["x_train"])), "first_epoch_s": first, "later_epoch_s": [first]}
    else:
        raise SystemExit(f"no pipeline measurement for task {args.task}")
    n = 0
    for xb, _ in train_data(0):
        n += int(xb.shape[0])
    first = time.perf_counter() - t0
    later = []
    for epoch in range(1, 1 + args.repeats):  # cached epochs: shuffle + batch only
        t1 = time.perf_counter()
        for _ in train_data(epoch):
            pass
        later.append(time.perf_counter() - t1)
    return {"examples": n, "first_epoch_s": first, "later_epoch_s": later}


def predict_ref(args, spec):
    from dlcli.data.images import read_image

    paths = Path(args.images).read_text().splitlines()
    mode = "L" if args.task == "mnist" else "RGB"
    decode = []  # the floor under any predict from files: reading and decoding them, one thread
    for _ in range(1 if args.task == "finetune" else 3):  # finetune's photos take seconds
        t = time.perf_counter()
        for p in paths:
            read_image(p, mode=mode)
        decode.append(time.perf_counter() - t)
    images, predict_all = _in_memory_reference(args, spec, paths)
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        predict_all()
        times.append(time.perf_counter() - t)
    return {"images": len(images), "seconds": times, "decode_seconds": decode}


def _in_memory_reference(args, spec, paths: list[str]):
    """(images, predict_all): the files decoded and preprocessed as the task's predict does,
    stacked in memory, and `model.predict` of them, traced and warmed up."""
    from dlcli.engine import training
    from dlcli.data.images import read_image

    mod = __import__(f"dlcli.tasks.{args.task}", fromlist=["x"])
    if args.task == "mnist":
        images = np.stack([mod.to_mnist(read_image(p, mode="L")) for p in paths])
    elif args.task == "finetune":
        from dlcli.pretrained import backbones

        cfg = task_cfg("finetune", spec)
        crops = np.stack([backbones.centre_crop_numpy(read_image(p, mode="RGB"), cfg["image_size"]) for p in paths])
        images = backbones.preprocess_numpy(backbones.NUMPY_MODES[cfg["backbone"]], crops)
        del crops
    else:
        images = np.stack([mod.to_input(read_image(p, mode="RGB")) for p in paths])
    model = training.load_model(Path(args.model), args.task)
    # cnn and finetune predict with test-time augmentation by default (`tta`): the reference
    # does the same work, a pass over each view (finetune: the mirror images; cnn: its
    # `tta_views`, the mirror and the shifted images).
    if args.task == "cnn":
        views = mod.tta_views(images, task_cfg("cnn", spec))
    else:
        views = [images, images[:, :, ::-1]] if args.task == "finetune" else [images]
    batch = 64 if args.task == "finetune" else 256

    def predict_all():
        return sum(model.predict(view, batch_size=batch, verbose=0) for view in views) / len(views)

    predict_all()  # warm-up (tracing)
    return images, predict_all


def predict_floor(args, spec):
    """The least a one-call cnn predict through Keras must spend, beside the reference, in
    turns: load the model (as predict does, without its optimizer) and run predict's batches
    of 128 images and their test views through predict's own `lite.KerasModel` (the last batch
    padded), on images already in memory. reference / floor is the best ratio a call could
    reach if reading, decoding, ranking and printing cost nothing."""
    from dlcli.inference import lite
    from dlcli.runs import checkpoints
    from dlcli.tasks import cnn

    if args.task != "cnn":
        raise SystemExit("predict-floor measures cnn's Keras path only")
    images, predict_all = _in_memory_reference(args, spec, Path(args.images).read_text().splitlines())
    cfg = task_cfg("cnn", spec)

    def model_path():
        model = lite.KerasModel(checkpoints.load_model(Path(args.model), "cnn", compile=False))
        for i in range(0, len(images), 128):
            model(np.concatenate(cnn.tta_views(images[i:i + 128], cfg)))

    reference, floor = [], []
    for _ in range(args.repeats):
        for side, times in ((predict_all, reference), (model_path, floor)):
            t = time.perf_counter()
            side()
            times.append(time.perf_counter() - t)
    best = statistics.median(reference) / statistics.median(floor)
    return {"images": len(images), "reference_s": reference, "floor_s": floor, "best_ratio": best}


def predict_cli(args, spec):
    """`dlcli predict` run in this process (start-up excluded; it is measured on its own):
    CLI parsing, model loading, reading and decoding every file, predicting, JSON output.
    Start-up includes building the command line from the Typer app (6 ms, once a process),
    so it is built once here, not once a call."""
    import contextlib
    import io

    import typer

    from dlcli.cli import app

    command = typer.main.get_command(app)

    paths = Path(args.images).read_text().splitlines()
    # --engine auto with --checkpoint model.keras is Keras; the export is named as the checkpoint
    model = args.model if args.engine != "lite" else str(Path(args.model).parent / "export" / "model.tflite")

    def call(files):
        argv = ["predict", args.task, "--checkpoint", model, "--json", *files]
        t = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                command.main(argv, prog_name="dlcli")
            except SystemExit as exc:
                if exc.code not in (0, None):
                    raise RuntimeError(f"dlcli predict exited {exc.code}") from None
        return time.perf_counter() - t

    call(paths[:1])  # warm-up: imports, first tracing
    many, one = [], []
    for _ in range(args.repeats):
        many.append(call(paths))
        one.append(call(paths[:1]))
    return {"images": len(paths), "many_s": many, "one_s": one}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["reference", "pipeline", "predict-ref", "predict-cli", "predict-floor"])
    p.add_argument("task")
    p.add_argument("--spec", default="{}", help="JSON: {'flags': {...}} the dlcli run's config overrides")
    p.add_argument("--model")
    p.add_argument("--images")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--engine", default="keras", choices=["keras", "lite"])
    args = p.parse_args()
    spec = json.loads(args.spec)
    out = {"reference": reference, "pipeline": pipeline, "predict-ref": predict_ref, "predict-cli": predict_cli,
           "predict-floor": predict_floor}[args.what](args, spec)
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
