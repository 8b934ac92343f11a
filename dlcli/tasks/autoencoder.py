"""Task `autoencoder`: compress faces to a short code and back (week 4 of the course).

Two models, both with a code of `code` numbers (32 by default):
  pca   the course's linear autoencoder: flatten -> dense code -> dense -> reshape; with
        MSE loss it spans the same subspace as the top principal components;
  deep  the course's convolutional one: 4 x (conv 3x3 elu + max-pool) with 32/64/128/256
        filters -> dense code; decoder dense -> 2x2x256 -> 4 stride-2 transposed convs.
`--set noise=0.1` trains a denoising autoencoder (Gaussian noise on the input during
training only). Pixels are on the course's scale x / 255 - 0.5, so the MSE figures
compare with the course's (deep: about 0.0056; graded bound 0.005).

`predict` writes reconstructions, finds look-alikes in code space (`--similar K --index
DIR`, the index of codes cached in the run), or morphs between two faces (`--morph A B`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dlcli.data import sources as data_lib
from dlcli.data import faces
from dlcli.engine import schedules, training
from dlcli.inference import lite
from dlcli.errors import UsageError
from dlcli.data.images import in_input_order, read_many
from dlcli.engine.lazy import lazy_import
from dlcli.runs.files import atomic_write_npz
from dlcli.tasks import Context, DataRules, ExportSpec, FileInputs, Option, TaskSpec, View, common_defaults

keras = lazy_import("keras")
tf = lazy_import("tensorflow")

DEFAULTS = {
    **common_defaults(dataset="lfw", epochs=20, batch_size=32, lr=3e-3),
    **training.keras_defaults(),
    **faces.face_defaults(image_size=32),
    "split": "person",  # hold out whole people: the validation MSE is the MSE on unseen people
    "model": "deep",
    "code": 32,
    "noise": 0.0,
    "optimizer": "adam",
    "lr_schedule": "cosine",  # cosine: lr falls along a half cosine to about 0 at the last epoch
    "lr_decay": 0.93,  # lr_schedule exponential: the learning rate is lr * lr_decay ** epoch
}
CHOICES = {"model": ["pca", "deep"], "optimizer": ["adamax", "adam"], "split": ["person", "photo"],
           "lr_schedule": ["cosine", "exponential"]}
PNG_SCALE = 4  # written reconstructions and strips are enlarged so a 32x32 face is visible


def scale(x: np.ndarray) -> np.ndarray:
    """uint8 pixels -> the course's scale, centred on zero."""
    return data_lib.unit_float(x, minus=0.5)


def unscale(x: np.ndarray) -> np.ndarray:
    return faces.to_uint8(x, -0.5, 0.5)


# -- model --------------------------------------------------------------------------------


def build_model(cfg: dict):
    """The autoencoder as `encoder` and `decoder` sub-models, so codes are reachable after loading."""
    size, code = cfg["image_size"], cfg["code"]
    shape = (size, size, 3)
    if cfg["model"] == "deep" and size % 16:
        raise UsageError(f"the deep autoencoder halves the image 4 times; image_size must divide by 16, got {size}")
    enc_in = keras.Input(shape)
    if cfg["model"] == "pca":
        x = keras.layers.Flatten()(enc_in)
        enc_out = keras.layers.Dense(code, name="code")(x)
        dec_in = keras.Input((code,))
        x = keras.layers.Dense(int(np.prod(shape)))(dec_in)
        dec_out = keras.layers.Reshape(shape)(x)
    else:
        x = enc_in
        for filters in (32, 64, 128, 256):
            x = keras.layers.Conv2D(filters, 3, padding="same", activation="elu")(x)
            x = keras.layers.MaxPooling2D()(x)
        x = keras.layers.Flatten()(x)
        enc_out = keras.layers.Dense(code, name="code")(x)
        dec_in = keras.Input((code,))
        side = size // 16
        x = keras.layers.Dense(side * side * 256, activation="elu")(dec_in)
        x = keras.layers.Reshape((side, side, 256))(x)
        for filters in (128, 64, 32):
            x = keras.layers.Conv2DTranspose(filters, 3, strides=2, padding="same", activation="elu")(x)
        dec_out = keras.layers.Conv2DTranspose(3, 3, strides=2, padding="same")(x)
    encoder = keras.Model(enc_in, enc_out, name="encoder")
    decoder = keras.Model(dec_in, dec_out, name="decoder")
    inputs = keras.Input(shape, name="face")
    x = keras.layers.GaussianNoise(cfg["noise"], name="noise")(inputs) if cfg["noise"] > 0 else inputs
    model = keras.Model(inputs, decoder(encoder(x)), name=f"autoencoder_{cfg['model']}")
    optimizer = {"adamax": keras.optimizers.Adamax, "adam": keras.optimizers.Adam}[cfg["optimizer"]](cfg["lr"])
    model.compile(optimizer=optimizer, loss="mse", jit_compile=cfg["jit_compile"])
    return model


def parts(model):
    return model.get_layer("encoder"), model.get_layer("decoder")


def load(ctx: Context):
    return training.load_model(ctx.model_path, "autoencoder")


# -- train / evaluate ---------------------------------------------------------------------


def train(ctx: Context) -> dict:
    cfg = ctx.cfg
    if cfg["code"] < 1:
        raise UsageError(f"code must be >= 1, got {cfg['code']}")
    training.set_seed(cfg["seed"])
    split = faces.load_split(cfg, ctx.run, ctx.reporter)
    x_train, x_val = scale(split["x_train"]), scale(split["x_val"])
    ctx.reporter.info(f"{len(x_train)} training and {len(x_val)} validation faces, {cfg['image_size']}x{cfg['image_size']}")
    train_ds = tf.data.Dataset.from_tensor_slices((x_train, x_train)).cache()

    def train_data(epoch):
        seed = training.epoch_seed(cfg["seed"], epoch)
        return train_ds.shuffle(len(x_train), seed=seed).batch(cfg["batch_size"]).prefetch(tf.data.AUTOTUNE)

    val_ds = tf.data.Dataset.from_tensor_slices((x_val, x_val)).batch(256).cache()
    model, history = training.fit(
        ctx, build_model=lambda: build_model(cfg), train_data=train_data, val_data=val_ds,
        steps_per_epoch=-(-len(x_train) // cfg["batch_size"]), callbacks=[schedule(cfg)],
    )
    return {"train_mse": history[-1]["loss"], "val_mse": history[-1]["val_loss"],
            "val_faces": len(x_val), "code": cfg["code"], "model": cfg["model"]}


def schedule(cfg: dict):
    """The learning-rate callback: a half cosine over the run (the default: it lets the
    first epochs take large steps and the last ones settle), or x`lr_decay` each epoch."""
    if cfg["lr_schedule"] == "exponential":
        return training.decay_per_epoch(cfg["lr"], cfg["lr_decay"])
    return schedules.cosine_per_epoch(cfg["lr"], first=0, length=cfg["epochs"])


def evaluate(ctx: Context) -> dict:
    """MSE on the run's held-out faces, and the MSE of predicting the mean face, for scale.

    On other data (`--dataset OTHER`) every face of it, as `mse`, `mean_face_mse`, `faces`.
    """
    model = load(ctx)
    x, prefix = faces.eval_faces(ctx.cfg, ctx.run, ctx.on_other_data, ctx.reporter)
    x = scale(x)
    recon = model.predict(x, batch_size=256, verbose=0)
    return {f"{prefix}mse": float(np.mean((recon - x) ** 2)),
            "mean_face_mse": float(np.mean((x - x.mean(0)) ** 2)),
            f"{prefix}faces": int(len(x))}


# -- predict ------------------------------------------------------------------------------


def _out_dir(ctx: Context) -> Path:
    out = ctx.out or ctx.run.file("predictions")
    out.mkdir(parents=True, exist_ok=True)
    return out


def batched(run, x: np.ndarray, size: int = 256) -> np.ndarray:
    """`run` (an exported or Keras part) over `x` in batches of `size`."""
    return np.concatenate([run(x[s: s + size]) for s in range(0, len(x), size)])


def index_codes(ctx: Context, encoder, folder: str) -> tuple[list[str], np.ndarray]:
    """Codes of every image under `folder`, computed once and cached in the run's index/."""
    files = faces.list_images(folder)
    key = faces.folder_fingerprint(files)
    cache = ctx.run.file("index") / f"{Path(folder).resolve().name}-{key}-{ctx.cfg['crop']}.npz"
    if cache.exists():
        with np.load(cache, allow_pickle=False) as data:
            return [str(p) for p in data["paths"]], data["codes"]
    ctx.reporter.info(f"indexing {len(files)} faces of {folder} (cached in {cache.parent})")
    codes = batched(encoder, scale(faces.read_faces(files, ctx.cfg)))
    paths = np.array([str(f) for f in files])
    atomic_write_npz(cache, paths=paths, codes=codes)
    return [str(p) for p in paths], codes


def nearest(codes: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and Euclidean distances of the k codes nearest to `query`."""
    dist = np.sqrt(((codes - query) ** 2).sum(1))
    order = np.argsort(dist, kind="stable")[:k]
    return order, dist[order]


def morph_codes(a: np.ndarray, b: np.ndarray, steps: int) -> np.ndarray:
    """`steps` codes on the straight line from a to b, both ends included."""
    t = np.linspace(0.0, 1.0, steps, dtype=np.float32)[:, None]
    return (1 - t) * a[None] + t * b[None]


def strip(images: list[np.ndarray]) -> np.ndarray:
    """Images side by side with a 1-pixel white gap."""
    gap = np.full((images[0].shape[0], 1, 3), 255, np.uint8)
    parts_ = []
    for img in images:
        parts_ += [img, gap]
    return np.concatenate(parts_[:-1], axis=1)


def unique_name(out: Path, stem: str, suffix: str, taken: set) -> Path:
    """out/<stem><suffix>, numbered when two inputs share a file name (a/face.jpg, b/face.jpg)."""
    name, i = f"{stem}{suffix}", 1
    while name in taken:
        i += 1
        name = f"{stem}-{i}{suffix}"
    taken.add(name)
    return out / name


def predict(ctx: Context, inputs: list[str]) -> list[dict]:
    opts = ctx.options
    morph = opts.get("morph")
    if morph:
        if inputs:
            raise UsageError("--morph A B takes its two images itself; give no other inputs")
        inputs = list(morph)
    if not inputs:
        raise UsageError("give face images: `dlcli predict autoencoder face.jpg [--similar K --index DIR | --morph A B]`")
    if opts["similar"] and not opts["index"]:
        raise UsageError("--similar K needs --index DIR, the folder of faces to search")
    if opts["index"] and not Path(opts["index"]).is_dir():
        raise UsageError(f"--index {opts['index']}: no such folder")
    if opts["steps"] < 2:
        raise UsageError(f"--steps must be >= 2, got {opts['steps']}")
    models = lite.models_for(ctx, "autoencoder")  # the exported encoder and decoder where current, else Keras
    encoder, decoder = models["encoder"], models["decoder"]
    good, images, failures = read_many(inputs, lambda p: faces.read_face(p, ctx.cfg))
    out = _out_dir(ctx)
    rows: list[dict] = []
    taken: set = set()
    if morph:
        if failures:
            return failures
        codes = encoder(scale(np.stack(images)))
        frames = unscale(batched(decoder, morph_codes(codes[0], codes[1], opts["steps"])))
        path = out / f"morph-{Path(good[0]).stem}-{Path(good[1]).stem}.png"
        faces.save_png(strip(list(frames)), path, PNG_SCALE)
        return [{"input": f"{good[0]} -> {good[1]}", "steps": opts["steps"], "path": str(path)}]
    if images:
        x = scale(np.stack(images))
        codes = batched(encoder, x)
        recon = batched(decoder, codes)
        if opts["similar"]:
            index_paths, index_codes_ = index_codes(ctx, encoder, opts["index"])
        for path, img, code, rec, xs in zip(good, images, codes, recon, x):
            row = {"input": path, "mse": round(float(np.mean((rec - xs) ** 2)), 6)}
            if opts["similar"]:
                found, dist = nearest(index_codes_, code, opts["similar"])
                neighbours = [faces.read_face(index_paths[i], ctx.cfg) for i in found]
                target = unique_name(out, Path(path).stem, "-similar.png", taken)
                faces.save_png(strip([img, *neighbours]), target, PNG_SCALE)
                row["similar"] = [{"image": index_paths[i], "distance": round(float(d), 4)} for i, d in zip(found, dist)]
            else:
                target = unique_name(out, Path(path).stem, "-reconstruction.png", taken)
                faces.save_png(unscale(rec), target, PNG_SCALE)
            row["path"] = str(target)
            rows.append(row)
    return in_input_order(inputs, rows + failures)


# -- views --------------------------------------------------------------------------------


def _val_faces(ctx: Context, n: int | None = None) -> np.ndarray:
    x = faces.load_split(ctx.cfg, ctx.run)["x_val"]
    return x if n is None else x[:n]


def view_reconstructions(ctx: Context) -> Path:
    """Original, code (as a strip of cells) and reconstruction for a few held-out faces."""
    from dlcli.plots import pyplot, save_figure

    model = load(ctx)
    encoder, decoder = parts(model)
    originals = _val_faces(ctx, ctx.options["n"])
    codes = encoder.predict(scale(originals), verbose=0)
    recon = decoder.predict(codes, verbose=0)
    mse = ((recon - scale(originals)) ** 2).mean(axis=(1, 2, 3))
    plt = pyplot()
    n = len(originals)
    fig, axes = plt.subplots(3, n, figsize=(1.4 * n, 4.6), squeeze=False,
                             gridspec_kw={"height_ratios": [1, 0.35, 1]})
    limit = float(np.abs(codes).max()) or 1.0
    for i in range(n):
        axes[0, i].imshow(originals[i])
        axes[1, i].imshow(codes[i][None, :], cmap="coolwarm", vmin=-limit, vmax=limit, aspect="auto")
        axes[2, i].imshow(unscale(recon[i]))
        axes[2, i].set_title(f"mse {mse[i]:.4f}", fontsize=7)
        for ax in axes[:, i]:
            ax.axis("off")
    axes[0, 0].set_title("original", fontsize=7, loc="left")
    axes[1, 0].set_title(f"code ({codes.shape[1]})", fontsize=7, loc="left")
    fig.suptitle(f"autoencoder / {ctx.run.name}: held-out faces, mean mse {mse.mean():.4f}")
    return save_figure(fig, ctx.view_path("autoencoder-reconstructions"))


def view_similar(ctx: Context) -> Path:
    """Held-out faces (first column) and their nearest training faces in code space."""
    from dlcli.plots import image_grid

    model = load(ctx)
    encoder, _ = parts(model)
    split = faces.load_split(ctx.cfg, ctx.run)
    k, n = ctx.options["k"], ctx.options["n"]
    train_codes = encoder.predict(scale(split["x_train"]), batch_size=256, verbose=0)
    queries = split["x_val"][:n]
    images, titles = [], []
    for img, code in zip(queries, encoder.predict(scale(queries), verbose=0)):
        found, dist = nearest(train_codes, code, k)
        images += [img, *split["x_train"][found]]
        titles += ["query", *[f"d {d:.2f}" for d in dist]]
    return image_grid(images, ctx.view_path("autoencoder-similar"), titles=titles, cols=k + 1,
                      suptitle=f"autoencoder / {ctx.run.name}: nearest training faces in code space")


def view_morph(ctx: Context) -> Path:
    """Decoded codes on the line between pairs of held-out faces, one pair a row."""
    from dlcli.plots import image_grid

    model = load(ctx)
    encoder, decoder = parts(model)
    steps, pairs = ctx.options["steps"], ctx.options["n"]
    x = _val_faces(ctx, 2 * pairs)
    codes = encoder.predict(scale(x), verbose=0)
    images = []
    for i in range(0, len(codes) - 1, 2):
        images += list(unscale(decoder.predict(morph_codes(codes[i], codes[i + 1], steps), verbose=0)))
    return image_grid(images, ctx.view_path("autoencoder-morph"), cols=steps,
                      suptitle=f"autoencoder / {ctx.run.name}: morphing between held-out faces")


def export_preprocessing(cfg: dict) -> dict:
    """What a user of the exported encoder does to a photo before it (export.json)."""
    size, crop = cfg["image_size"], cfg["crop"]
    return {"input": "RGB face photo", "steps": [
        f"the centred square of side {crop if crop > 0 else 'min(height, width)'}", f"resize to {size}x{size} (Lanczos)",
        "x / 255 - 0.5"], "code": "dlcli.data.faces.preprocess + dlcli.tasks.autoencoder.scale",
        "shape": [size, size, 3], "scale": 1 / 255, "offset": -0.5, "output": "the encoder's code"}


# encoder.tflite: a photo in, its code out; decoder.tflite: a code in, a face out (x + 0.5,
# x 255 for pixels). predict's reconstructions, look-alikes and morphs run on the two.
EXPORT = ExportSpec(preprocessing=export_preprocessing,
                    models={"encoder": lambda model, ctx: model.get_layer("encoder"),
                            "decoder": lambda model, ctx: model.get_layer("decoder")},
                    output="encoder: the code of a face; decoder: the face of a code, on the scale x / 255 - 0.5; "
                           "in batches of 16", batch=16)  # fixed: the decoder's transposed convolutions run on XNNPACK


# What this task's own config keys mean (and its own meaning of shared ones), for
# `dlcli tasks TASK` and `train --help`; keys every task shares are in `config.KEY_HELP`.
KEY_HELP = {
    "split": "person: hold out whole people (a folder's sub-folder, tfds lfw's label; by photo where no "
             "person is known); photo: hold out photos at random",
    "model": "pca: one dense layer each way; deep: convolutional encoder and decoder",
    "code": "numbers in the code between encoder and decoder",
    "noise": "std of Gaussian noise added to the input while training (a denoising autoencoder)",
    "optimizer": "the optimizer",
    "lr_schedule": "cosine: a half cosine from lr to about 0 over the epochs; exponential: lr x lr_decay each epoch",
    "lr_decay": "lr_schedule exponential: the learning rate is multiplied by this after every epoch",
}


TASK = TaskSpec(
    name="autoencoder",
    summary="faces through a 32-number code: the course's PCA and deep conv autoencoders",
    defaults=DEFAULTS,
    data=DataRules(kinds=("tfds", "folder")),
    choices=CHOICES,
    train=train,
    evaluate=evaluate,
    predict=predict,
    predict_options={
        "similar": Option(int, 0, "find the K nearest faces of --index DIR in code space"),
        "index": Option(str, None, "folder of face images to search with --similar"),
        "morph": Option(str, None, "morph between two faces: --morph A.jpg B.jpg", nargs=2),
        "steps": Option(int, 7, "images in a --morph strip, both ends included"),
    },
    views={
        "autoencoder-reconstructions": View(view_reconstructions, "held-out faces, their codes and reconstructions",
                                            options={"n": Option(int, 8, "how many faces")}),
        "autoencoder-similar": View(view_similar, "nearest training faces in code space",
                                    options={"n": Option(int, 5, "how many query faces"),
                                             "k": Option(int, 3, "neighbours per face")}),
        "autoencoder-morph": View(view_morph, "morph strips between held-out faces",
                                  options={"n": Option(int, 4, "how many pairs"),
                                           "steps": Option(int, 7, "images per strip")}),
    },
    key_help=KEY_HELP,
    inputs=FileInputs(),
    export=EXPORT,
)
