"""Task `gan`: a DCGAN that draws 36x36 faces (week 4 of the course, honour track).

The generator is the course's (code 256 -> dense 640 elu -> 8x8x10 -> transposed convs
-> 36x36x3, linear output on the [0, 1] pixel scale). The discriminator is a small
strided conv net ending in dense 256 tanh and one logit (the course's 2-way log-softmax
in its equivalent one-logit form) with an L2 penalty on that last layer. `FaceGAN` is a
Keras Model with a custom `train_step` that makes `d_steps` discriminator updates (fresh
noise each) and one generator update per batch, each network with its own optimizer;
real labels are smoothed to `label_smoothing`.

It trains through the engine's `training.fit` with its own `GanCheckpoint`: saving the
FaceGAN with `model.save` would need this Model subclass registered for safe-mode loading
and would restore only a compile-time optimizer, so each checkpoint holds the two networks
as plain functional .keras files plus both optimizers' variables (`optimizers.npz`), and
`--resume` rebuilds the optimizers and puts those variables back, so a resumed run
continues exactly where the killed one stopped. The distance and the progress row of each
epoch are per-epoch extras (`training.after_each_epoch`).

Quality is measured, not eyeballed: the kernel two-sample distance MMD^2 (Gaussian
kernels) between generated faces and held-out real faces, in a fixed feature space (the
top principal components of the training faces at half resolution). Each epoch's history
row has `mmd` beside two references: `mmd_real` (held-out faces against other held-out
faces: what a perfect generator would score) and `mmd_noise` (uniform noise images).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from dlcli import faces, training
from dlcli.errors import UsageError
from dlcli.lazy import lazy_import
from dlcli.runs import atomic_write_npy, atomic_write_npz
from dlcli.tasks import Context, Option, TaskSpec, View, common_defaults

keras = lazy_import("keras")
tf = lazy_import("tensorflow")

DEFAULTS = {
    **common_defaults(dataset="lfw", epochs=10, batch_size=100, lr=2e-4),
    **training.keras_defaults(),
    **faces.face_defaults(image_size=36),
    "code_size": 256,
    "d_steps": 2,
    "d_lr": 2e-4,
    "label_smoothing": 0.9,
    "d_l2": 1e-3,
    "mmd_samples": 500,
}
GENERATOR_FILE, DISCRIMINATOR_FILE = "generator.keras", "discriminator.keras"
OPTIMIZERS_FILE, FEATURES_FILE, PROGRESS_FILE = "optimizers.npz", "mmd_features.npz", "progress.npy"
FIXED_SEED = 20240  # the latent batch of gan-samples/gan-progress: the same for every run
PROGRESS_ROW = 8


# -- networks -----------------------------------------------------------------------------


def build_generator(cfg: dict):
    """The course's generator; 36x36 comes from 8 -> 12 -> 16 -> 32 -> 34 -> 36 -> 38 -> 36."""
    if cfg["image_size"] != 36:
        raise UsageError(f"the course's generator draws 36x36 faces; image_size must be 36, got {cfg['image_size']}")
    z = keras.Input((cfg["code_size"],), name="code")
    x = keras.layers.Dense(10 * 8 * 8, activation="elu")(z)
    x = keras.layers.Reshape((8, 8, 10))(x)
    x = keras.layers.Conv2DTranspose(64, 5, activation="elu")(x)
    x = keras.layers.Conv2DTranspose(64, 5, activation="elu")(x)
    x = keras.layers.UpSampling2D(2)(x)
    for _ in range(3):
        x = keras.layers.Conv2DTranspose(32, 3, activation="elu")(x)
    out = keras.layers.Conv2D(3, 3, name="image")(x)
    return keras.Model(z, out, name="gan_generator")


def build_discriminator(cfg: dict):
    """Strided convs (no pooling, leaky ReLU: the DCGAN advice), dense 256 tanh, one logit."""
    size = cfg["image_size"]
    x_in = keras.Input((size, size, 3), name="image")
    x = keras.layers.Rescaling(2.0, offset=-1.0)(x_in)  # [0, 1] pixels -> [-1, 1]
    for filters, stride in ((32, 1), (64, 2), (128, 2), (256, 2)):
        x = keras.layers.Conv2D(filters, 3, strides=stride, padding="same")(x)
        x = keras.layers.LeakyReLU(0.2)(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(256, activation="tanh", kernel_regularizer=keras.regularizers.L2(cfg["d_l2"]))(x)
    logit = keras.layers.Dense(1, kernel_regularizer=keras.regularizers.L2(cfg["d_l2"]), name="logit")(x)
    return keras.Model(x_in, logit, name="gan_discriminator")


def make_optimizers(cfg: dict):
    """(generator, discriminator) optimizers: Adam with beta_1 0.5, the DCGAN setting."""
    return (keras.optimizers.Adam(cfg["lr"], beta_1=0.5, name="generator_adam"),
            keras.optimizers.Adam(cfg["d_lr"], beta_1=0.5, name="discriminator_adam"))


@functools.cache
def face_gan_class():
    """FaceGAN, defined on first use so that importing this module never loads TensorFlow."""
    return _define_face_gan()


def _define_face_gan():
    class FaceGAN(keras.Model):
        """Both networks and both optimizers; `fit` calls `train_step` once per real batch."""

        def __init__(self, generator, discriminator, g_optimizer, d_optimizer, cfg: dict):
            super().__init__(name="gan_trainer")
            self.generator, self.discriminator = generator, discriminator
            self.g_optimizer, self.d_optimizer = g_optimizer, d_optimizer
            self.code_size, self.d_steps = cfg["code_size"], cfg["d_steps"]
            self.smooth = cfg["label_smoothing"]
            self.noise = keras.random.SeedGenerator(cfg["seed"] or 0)  # reseeded per epoch by training.reseed_model
            self.bce = keras.losses.BinaryCrossentropy(from_logits=True)
            self.trackers = {name: keras.metrics.Mean(name=name) for name in ("loss", "d_loss", "d_real", "d_fake")}
            self.built = True  # both networks are built; fit must not build this by calling it on images

        @property
        def metrics(self):
            return list(self.trackers.values())  # fit resets them each epoch: the logs are epoch means

        def call(self, z, training=False):
            return self.generator(z, training=training)

        def build_optimizers(self) -> None:
            self.g_optimizer.build(self.generator.trainable_variables)
            self.d_optimizer.build(self.discriminator.trainable_variables)

        def _codes(self, n):
            return keras.random.normal((n, self.code_size), seed=self.noise)

        def train_step(self, real):
            n = tf.shape(real)[0]
            # Under a tf.distribute strategy each replica's Keras losses come divided by the number
            # of replicas (the optimizer sums gradients over replicas); the penalty is divided here.
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            d_vars = self.discriminator.trainable_variables
            for _ in range(self.d_steps):  # several discriminator steps, fresh noise each
                fake = self.generator(self._codes(n), training=True)
                with tf.GradientTape() as tape:
                    real_logit = self.discriminator(real, training=True)
                    fake_logit = self.discriminator(fake, training=True)
                    d_loss = (self.bce(tf.fill(tf.shape(real_logit), self.smooth), real_logit)  # smoothed labels
                              + self.bce(tf.zeros_like(fake_logit), fake_logit)
                              + tf.add_n(self.discriminator.losses) / replicas)
                self.d_optimizer.apply_gradients(zip(tape.gradient(d_loss, d_vars), d_vars))
            g_vars = self.generator.trainable_variables
            with tf.GradientTape() as tape:
                fake_logit = self.discriminator(self.generator(self._codes(n), training=True), training=True)
                g_loss = self.bce(tf.ones_like(fake_logit), fake_logit)
            self.g_optimizer.apply_gradients(zip(tape.gradient(g_loss, g_vars), g_vars))
            values = {"loss": g_loss * replicas, "d_loss": d_loss * replicas,
                      "d_real": tf.reduce_mean(tf.sigmoid(real_logit)), "d_fake": tf.reduce_mean(tf.sigmoid(fake_logit))}
            for name, value in values.items():
                self.trackers[name].update_state(value)
            return {name: tracker.result() for name, tracker in self.trackers.items()}

    return FaceGAN


# -- quality: MMD in a fixed feature space ------------------------------------------------


def fit_features(x_train: np.ndarray, dims: int = 32, seed: int = 0) -> dict:
    """A fixed feature map: the top principal components of training faces at half size,
    and the Gaussian kernel bandwidth (median distance between real faces' features)."""
    flat = _half(x_train[np.random.default_rng(seed).permutation(len(x_train))[:3000]])
    mean = flat.mean(0)
    _, _, vt = np.linalg.svd(flat - mean, full_matrices=False)
    basis = vt[: min(dims, len(vt))].astype(np.float32)
    feats = (flat - mean) @ basis.T
    d2 = ((feats[:, None] - feats[None]) ** 2).sum(-1)
    sigma = float(np.sqrt(np.median(d2[np.triu_indices(len(feats), 1)])))
    return {"mean": mean.astype(np.float32), "basis": basis, "sigma": np.float32(sigma or 1.0)}


def _half(x: np.ndarray) -> np.ndarray:
    """Images on [0, 1] (N, H, W, 3) -> 2x2-averaged and flattened, so features ignore pixel noise."""
    x = np.clip(np.asarray(x, np.float32), 0, 1)
    n, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c).mean((2, 4))
    return x.reshape(n, -1)


def features(x: np.ndarray, fmap: dict) -> np.ndarray:
    return (_half(x) - fmap["mean"]) @ fmap["basis"].T


MMD_BLOCK = 1 << 24  # pairwise feature differences held at once by mmd2 (64 MB of float32)


def mmd2(a: np.ndarray, b: np.ndarray, sigma: float) -> float:
    """Unbiased MMD^2 with a sum of Gaussian kernels at 0.5, 1 and 2 times sigma (0 for equal
    distributions; it can come out slightly negative).

    The kernel matrices are summed in blocks of rows (about 16M differences at a time), so
    `eval --dataset OTHER` can compare thousands of faces; up to ~1,000 rows, as in training,
    it is one block."""
    def kernel(x, y) -> tuple[float, float]:  # (sum of the kernel matrix, its trace)
        rows = max(1, MMD_BLOCK // max(1, len(y) * x.shape[1]))
        total = trace = 0.0
        for i in range(0, len(x), rows):
            d2 = ((x[i: i + rows, None] - y[None]) ** 2).sum(-1)
            k = sum(np.exp(-d2 / (2 * (s * sigma) ** 2)) for s in (0.5, 1.0, 2.0))
            total += k.sum()
            trace += np.trace(k, offset=i)
        return total, trace

    (saa, taa), (sbb, tbb), (sab, _) = kernel(a, a), kernel(b, b), kernel(a, b)
    m, n = len(a), len(b)
    return float((saa - taa) / (m * (m - 1)) + (sbb - tbb) / (n * (n - 1)) - 2 * sab / (m * n))


def latent(n: int, seed: int | None, code_size: int) -> np.ndarray:
    """A reproducible latent batch: the same seed gives the same faces."""
    return np.random.default_rng(seed).standard_normal((n, code_size)).astype(np.float32)


def to_pixels(images: np.ndarray) -> np.ndarray:
    return faces.to_uint8(images, 0.0, 1.0)


class Quality:
    """MMD^2 of generated faces against half the held-out faces, with its two references."""

    def __init__(self, x_val: np.ndarray, fmap: dict, n: int, seed: int | None):
        half = len(x_val) // 2
        if half < 2:
            raise UsageError(f"{len(x_val)} held-out faces are too few to measure MMD; use more faces or a larger val_fraction")
        self.n = min(n, half)
        self.fmap, self.seed = fmap, seed
        self.ref = features(x_val[: self.n], fmap)
        self.other = features(x_val[half: half + self.n], fmap)
        noise = np.random.default_rng(1).uniform(0, 1, (self.n, *x_val.shape[1:])).astype(np.float32)
        self.noise_mmd = mmd2(self.ref, features(noise, fmap), float(fmap["sigma"]))
        self.real_mmd = mmd2(self.ref, self.other, float(fmap["sigma"]))

    def __call__(self, generator) -> dict:
        fake = generator.predict(latent(self.n, 7 + (self.seed or 0), generator.input_shape[-1]), batch_size=250, verbose=0)
        return {"mmd": mmd2(self.ref, features(fake, self.fmap), float(self.fmap["sigma"])),
                "mmd_real": self.real_mmd, "mmd_noise": self.noise_mmd}


# -- saving and resuming ------------------------------------------------------------------


def save_optimizers(gan: "FaceGAN", path: Path) -> None:
    """Both optimizers' variables (iterations, Adam moments) in one .npz file."""
    arrays = {}
    for prefix, opt in (("g", gan.g_optimizer), ("d", gan.d_optimizer)):
        store: dict = {}
        opt.save_own_variables(store)
        arrays.update({f"{prefix}_{k}": v for k, v in store.items()})
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def load_optimizers(gan: "FaceGAN", path: Path) -> None:
    gan.build_optimizers()
    with np.load(path, allow_pickle=False) as data:
        for prefix, opt in (("g", gan.g_optimizer), ("d", gan.d_optimizer)):
            store = {k[2:]: data[k] for k in data.files if k.startswith(prefix + "_")}
            if len(store) != len(opt.variables):
                raise UsageError(f"{path} does not match the {prefix} optimizer: {len(store)} arrays for {len(opt.variables)} variables")
            opt.load_own_variables(store)


def new_gan(cfg: dict, backup: Path | None = None) -> "FaceGAN":
    """A fresh FaceGAN, or the one saved in an epoch backup with its optimizers' state."""
    if backup is None:
        generator, discriminator = build_generator(cfg), build_discriminator(cfg)
    else:
        generator = training.load_model(backup / GENERATOR_FILE, "gan")
        discriminator = training.load_model(backup / DISCRIMINATOR_FILE, "gan")
    gan = face_gan_class()(generator, discriminator, *make_optimizers(cfg), cfg)
    if backup is not None:
        load_optimizers(gan, backup / OPTIMIZERS_FILE)
    else:
        gan.build_optimizers()
    gan.compile(jit_compile=cfg["jit_compile"])
    return gan


class GanCheckpoint(training.CheckpointState):
    """A gan checkpoint: generator.keras, discriminator.keras and optimizers.npz; at the end
    both networks are put in the run."""

    def __init__(self, cfg: dict):
        super().__init__(model_file=GENERATOR_FILE)
        self.cfg = cfg

    def build(self):
        return new_gan(self.cfg)

    def restore(self, backup: Path):
        return new_gan(self.cfg, backup)

    def files(self, gan) -> dict:
        return {GENERATOR_FILE: gan.generator.save, DISCRIMINATOR_FILE: gan.discriminator.save,
                OPTIMIZERS_FILE: lambda path: save_optimizers(gan, path)}

    def outputs(self) -> dict:
        return {GENERATOR_FILE: GENERATOR_FILE, DISCRIMINATOR_FILE: DISCRIMINATOR_FILE}


# -- train / evaluate ---------------------------------------------------------------------


def scale(x: np.ndarray) -> np.ndarray:
    return x.astype("float32") / 255.0


def train(ctx: Context) -> dict:
    cfg, run, reporter = ctx.cfg, ctx.run, ctx.reporter
    if cfg["d_steps"] < 1:
        raise UsageError(f"d_steps must be >= 1, got {cfg['d_steps']}")
    training.set_seed(cfg["seed"])
    split = faces.load_split(cfg, run)
    x_train, x_val = scale(split["x_train"]), scale(split["x_val"])
    reporter.info(f"{len(x_train)} training and {len(x_val)} held-out faces, {cfg['image_size']}x{cfg['image_size']}")
    fmap = fit_features(x_train)
    atomic_write_npz(run.path(FEATURES_FILE), **fmap)
    quality = Quality(x_val, fmap, cfg["mmd_samples"], cfg["seed"])
    batch = min(cfg["batch_size"], len(x_train))
    steps = len(x_train) // batch  # whole batches only: every step sees `batch` real faces
    train_ds = tf.data.Dataset.from_tensor_slices(x_train).cache()

    def train_data(epoch):
        seed = training.epoch_seed(cfg["seed"], epoch)
        return train_ds.shuffle(len(x_train), seed=seed).batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

    fixed = latent(PROGRESS_ROW, FIXED_SEED, cfg["code_size"])
    progress_path = run.path(PROGRESS_FILE)

    def add_progress_row(gan, epoch: int, logs: dict) -> None:
        """progress.npy gets the fixed batch's faces after each epoch; rows beyond the epochs
        before this one (left by a run killed before its checkpoint) are cut."""
        rows = list(np.load(progress_path)[:epoch]) if epoch and progress_path.exists() else []
        rows.append(to_pixels(gan.generator.predict(fixed, verbose=0)))
        atomic_write_npy(progress_path, np.stack(rows))

    extras = [training.after_each_epoch(lambda gan, epoch, logs: logs.update(quality(gan.generator))),
              training.after_each_epoch(add_progress_row)]
    gan, history = training.fit(ctx, GanCheckpoint(cfg), train_data, steps_per_epoch=steps, callbacks=extras,
                                tensorboard=False)
    first, final = history[0], history[-1]
    return {"mmd": final["mmd"], "mmd_first_epoch": first["mmd"], "mmd_real": final["mmd_real"],
            "mmd_noise": final["mmd_noise"], "d_real": final["d_real"], "d_fake": final["d_fake"],
            "iterations": int(gan.g_optimizer.iterations.numpy())}


def evaluate(ctx: Context) -> dict:
    """MMD^2 of fresh samples against the run's held-out faces, beside the two references.

    On other data (`--dataset OTHER`) every face of it takes part, in a seeded random order:
    one half is the reference the samples are compared with, the other half gives `mmd_real`
    (no `mmd_samples` cap); the count is `faces` instead of `held_out_faces`.
    """
    generator = training.load_model(ctx.model_path, "gan")
    path = ctx.run.path(FEATURES_FILE)
    if not path.exists():
        raise UsageError(f"run {ctx.run.dir} has no {FEATURES_FILE}; it was not trained by this version")
    with np.load(path) as data:
        fmap = {k: data[k] for k in data.files}
    other = ctx.on_other_data
    x, _ = faces.eval_faces(ctx.cfg, ctx.run, other, ctx.reporter)
    if other:
        x = x[np.random.default_rng(ctx.cfg["seed"]).permutation(len(x))]
    samples = len(x) if other else ctx.cfg["mmd_samples"]
    result = Quality(scale(x), fmap, samples, ctx.cfg["seed"])(generator)
    return {**result, ("faces" if other else "held_out_faces"): int(len(x))}


# -- predict ------------------------------------------------------------------------------


def predict(ctx: Context, inputs: list[str]) -> list[dict]:
    if inputs:
        raise UsageError("the GAN takes no input files: `dlcli predict gan --n 64 --seed 1 --out samples/`")
    n = ctx.options["n"]
    if n < 1:
        raise UsageError(f"--n must be >= 1, got {n}")
    generator = training.load_model(ctx.model_path, "gan")
    seed = ctx.cfg["seed"]
    images = to_pixels(generator.predict(latent(n, seed, generator.input_shape[-1]), batch_size=256, verbose=0))
    out = ctx.out or ctx.run.path("samples")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, img in enumerate(images):
        path = faces.save_png(img, out / f"face-{seed}-{i:04d}.png")
        rows.append({"input": f"seed {seed} #{i}", "path": str(path)})
    from dlcli.plots import image_grid

    grid = image_grid(list(images), out / f"grid-{seed}.png", cols=min(8, n), tile_inches=0.9)
    rows.append({"input": f"seed {seed} grid", "path": str(grid)})
    return rows


# -- views --------------------------------------------------------------------------------


def view_samples(ctx: Context) -> Path:
    from dlcli.plots import image_grid

    generator = training.load_model(ctx.model_path, "gan")
    n = ctx.options["n"]
    images = to_pixels(generator.predict(latent(n, FIXED_SEED, generator.input_shape[-1]), verbose=0))
    return image_grid(list(images), ctx.view_path("gan-samples"), cols=8, tile_inches=0.9,
                      suptitle=f"gan / {ctx.run.name}: the fixed latent batch")


def view_progress(ctx: Context) -> Path:
    from dlcli.plots import image_grid

    path = ctx.run.path(PROGRESS_FILE)
    if not path.exists():
        raise UsageError(f"run {ctx.run.dir} has no {PROGRESS_FILE}")
    rows = np.load(path)
    history = ctx.run.read_history()
    titles = []
    for epoch in range(len(rows)):
        mmd = history[epoch]["mmd"] if epoch < len(history) else float("nan")
        titles += [f"epoch {epoch + 1} mmd {mmd:.3f}"] + [""] * (rows.shape[1] - 1)
    return image_grid(list(rows.reshape(-1, *rows.shape[2:])), ctx.view_path("gan-progress"),
                      titles=titles, cols=rows.shape[1], tile_inches=0.9,
                      suptitle=f"gan / {ctx.run.name}: the fixed latent batch after each epoch")


def view_discriminator(ctx: Context) -> Path:
    """How well D tells held-out real faces from generated ones, as two histograms."""
    from dlcli.plots import pyplot, save_figure

    generator = training.load_model(ctx.model_path, "gan")
    discriminator = training.load_model(ctx.run.path(DISCRIMINATOR_FILE), "gan")
    x_val = scale(faces.load_split(ctx.cfg, ctx.run)["x_val"])
    fake = generator.predict(latent(len(x_val), FIXED_SEED + 1, generator.input_shape[-1]), verbose=0)
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    d_real = sig(discriminator.predict(x_val, verbose=0)[:, 0])
    d_fake = sig(discriminator.predict(fake, verbose=0)[:, 0])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    bins = np.linspace(0, 1, 41)
    ax.hist(d_real, bins=bins, alpha=0.6, label=f"D(x), held-out real (mean {d_real.mean():.2f})")
    ax.hist(d_fake, bins=bins, alpha=0.6, label=f"D(G(z)), generated (mean {d_fake.mean():.2f})")
    ax.set_xlabel("discriminator's probability of 'real'")
    ax.legend(fontsize=8)
    ax.set_title(f"gan / {ctx.run.name}: {len(x_val)} held-out faces")
    return save_figure(fig, ctx.view_path("gan-discriminator"))


TASK = TaskSpec(
    name="gan",
    summary="a DCGAN drawing 36x36 faces, scored by MMD against held-out faces",
    defaults=DEFAULTS,
    train=train,
    evaluate=evaluate,
    predict=predict,
    model_file=GENERATOR_FILE,
    predict_options={"n": Option(int, 64, "how many faces to draw")},
    views={
        "gan-samples": View(view_samples, "a grid drawn from the fixed latent batch (comparable across runs)",
                            options={"n": Option(int, 32, "how many faces")}),
        "gan-progress": View(view_progress, "the fixed latent batch after each epoch, one row per epoch"),
        "gan-discriminator": View(view_discriminator, "histograms of D(x) and D(G(z)) on held-out faces"),
    },
)
