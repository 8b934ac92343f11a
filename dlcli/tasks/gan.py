"""Task `gan`: a GAN that draws 36x36 faces (week 4 of the course, honour track).

Two models (`model`):
- `dcgan` (the default): code 128 -> dense 9x9x256 -> two stride-2 transposed convs (128, 64
  filters) with BatchNorm and ReLU -> 3x3 conv, sigmoid; a discriminator of three stride-2
  convs (64/128/256, leaky ReLU) and one logit, without the course's dense layer. `width`
  (256) is the widest layer's filters; 128 halves both networks and ends at twice the KID
  (README). Trained with one discriminator step per generator step on the faces the generator
  step then learns from (one generator forward a step), the non-saturating loss, DiffAugment's
  translation (`augment`, on real and generated faces alike, so the discriminator cannot
  memorise 10k faces; `augment_color` adds its colour changes, which slowed learning colour),
  bfloat16 arithmetic where the CPU runs it faster (`precision`; 1.4x the steps with AMX) and an
  exponential moving average of the generator's weights (`ema`) that draws the samples, with
  BatchNorm statistics of its own (`recalibrate_batchnorm`). Adam at 3e-4 for both networks
  (beta_1 0.5): with the average drawing the samples, a faster rate than DCGAN's 2e-4 pays
  within 30 minutes, and 4e-4 no longer did (README). 36 epochs: 29 minutes on 2 idle cores
  with AMX (bfloat16), about 31 without it (float32).
- `course`: the course's generator (dense 640 elu -> 8x8x10 -> transposed convs -> 36x36x3,
  linear output) and its discriminator (strided convs, dense 256 tanh, one logit, L2 penalty
  `d_l2` on the last layers). The old default recipe is this with `batch_size 100, code_size
  256, d_steps 2, label_smoothing 0.9, augment false, ema 0, precision float32, lr 2e-4,
  d_lr 2e-4` (README).

`FaceGAN` is a Keras Model with a custom `train_step` that makes `d_steps` discriminator
updates (one: on the generator update's faces; more: fresh noise each) and one generator
update per batch, each network with its own optimizer; real labels are smoothed to
`label_smoothing` (1: none). The moving average is Keras's own optimizer EMA (`use_ema`, with
a warm-up), so it lives in the generator optimizer's variables and resumes exactly with them.

It trains through the engine's `training.fit` with its own `GanCheckpoint`: saving the
FaceGAN with `model.save` would need this Model subclass registered for safe-mode loading
and would restore only a compile-time optimizer, so each checkpoint holds the networks
as plain functional .keras files plus both optimizers' variables (`optimizers.npz`), and
`--resume` rebuilds the optimizers and puts those variables back, so a resumed run
continues exactly where the killed one stopped. The distance and the progress row of each
epoch are per-epoch extras (`training.after_each_epoch`).

Quality is measured the way the field does (`dlcli.pretrained.image_distance`): KID (with its standard
error) and FID between `kid_samples` generated faces and as many held-out real faces, on
EfficientNet-Lite0's pooled ImageNet features at `kid_image_size` pixels. Beside them in
every history row: the floor `kid_real` / `fid_real` (held-out faces against other held-out
faces: what a perfect generator would score at this size) and `kid_noise` / `fid_noise`
(uniform noise images). The held-out faces' features are computed once and kept in the run
(`kid_features.npz`). The old home-made distance (MMD on principal components) is gone.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from dlcli.data import sources as data_lib
from dlcli.data import faces
from dlcli.pretrained import image_distance
from dlcli.engine import keras_workarounds, training
from dlcli.inference import lite
from dlcli.errors import UsageError
from dlcli.engine.lazy import lazy_import
from dlcli.runs.files import atomic_write_npy, atomic_write_npz
from dlcli.tasks import Context, DataRules, ExportSpec, Option, TaskSpec, View, common_defaults

keras = lazy_import("keras")
tf = lazy_import("tensorflow")

DEFAULTS = {
    **common_defaults(dataset="lfw", epochs=36, batch_size=64, lr=3e-4),
    **training.keras_defaults(),
    **faces.face_defaults(image_size=36),
    "model": "dcgan",
    "code_size": 128,
    "width": 256,
    "d_steps": 1,
    "d_lr": 3e-4,
    "label_smoothing": 1.0,
    "d_l2": 1e-3,
    "augment": True,
    "augment_color": False,
    "precision": "auto",
    "ema": 0.999,
    "kid_samples": 500,
    "kid_every": 1,
    "kid_image_size": image_distance.FEATURE_SIZE,
}
CHOICES = {"model": ["dcgan", "course"]}
GENERATOR_FILE, DISCRIMINATOR_FILE = "generator.keras", "discriminator.keras"
LIVE_GENERATOR_FILE = "generator_live.keras"  # with `ema`: the trained weights; generator.keras holds their average
OPTIMIZERS_FILE, KID_FILE, PROGRESS_FILE = "optimizers.npz", "kid_features.npz", "progress.npy"
FIXED_SEED = 20240  # the latent batch of gan-samples/gan-progress: the same for every run
PROGRESS_ROW = 8


# -- networks -----------------------------------------------------------------------------


def build_generator(cfg: dict):
    """The `model`'s generator: codes -> images on the [0, 1] pixel scale."""
    return _course_generator(cfg) if cfg["model"] == "course" else _dcgan_generator(cfg)


def build_discriminator(cfg: dict):
    """The `model`'s discriminator: images on [0, 1] -> one logit."""
    return _course_discriminator(cfg) if cfg["model"] == "course" else _dcgan_discriminator(cfg)


def _dcgan_generator(cfg: dict):
    """size/4 x size/4 x width -> two stride-2 transposed convs (width/2, width/4) -> size x size x 3 (sigmoid)."""
    size = cfg["image_size"]
    if size % 4:
        raise UsageError(f"the dcgan generator doubles its size twice; image_size must be a multiple of 4, got {size}")
    z = keras.Input((cfg["code_size"],), name="code")
    width = cfg["width"]
    x = keras.layers.Dense(size // 4 * size // 4 * width, use_bias=False)(z)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    x = keras.layers.Reshape((size // 4, size // 4, width))(x)
    for filters in (max(1, width // 2), max(1, width // 4)):
        x = keras.layers.Conv2DTranspose(filters, 4, strides=2, padding="same", use_bias=False)(x)
        x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    out = keras.layers.Conv2D(3, 3, padding="same", activation="sigmoid", name="image", dtype="float32")(x)
    return keras.Model(z, out, name="gan_generator")


def _dcgan_discriminator(cfg: dict):
    """Three stride-2 convs (width/4, width/2, width: 64/128/256 by default; leaky ReLU) and one
    logit. At width 256 it does about the course's discriminator's multiply-adds per image (a
    quarter at 128) with a quarter of its weights, and the recipe runs it once per generator
    step where the old one ran it twice."""
    size = cfg["image_size"]
    x_in = keras.Input((size, size, 3), name="image")
    x = keras.layers.Rescaling(2.0, offset=-1.0)(x_in)  # [0, 1] pixels -> [-1, 1]
    width = cfg["width"]
    for filters, kernel in ((max(1, width // 4), 4), (max(1, width // 2), 4), (width, 3)):
        x = keras.layers.Conv2D(filters, kernel, strides=2, padding="same")(x)
        x = keras.layers.LeakyReLU(0.2)(x)
    logit = keras.layers.Dense(1, name="logit", dtype="float32")(keras.layers.Flatten()(x))
    return keras.Model(x_in, logit, name="gan_discriminator")


def _course_generator(cfg: dict):
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
    out = keras.layers.Conv2D(3, 3, name="image", dtype="float32")(x)
    return keras.Model(z, out, name="gan_generator")


def _course_discriminator(cfg: dict):
    """Strided convs (no pooling, leaky ReLU: the DCGAN advice), dense 256 tanh, one logit."""
    size = cfg["image_size"]
    x_in = keras.Input((size, size, 3), name="image")
    x = keras.layers.Rescaling(2.0, offset=-1.0)(x_in)  # [0, 1] pixels -> [-1, 1]
    for filters, stride in ((32, 1), (64, 2), (128, 2), (256, 2)):
        x = keras.layers.Conv2D(filters, 3, strides=stride, padding="same")(x)
        x = keras.layers.LeakyReLU(0.2)(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(256, activation="tanh", kernel_regularizer=keras.regularizers.L2(cfg["d_l2"]))(x)
    logit = keras.layers.Dense(1, kernel_regularizer=keras.regularizers.L2(cfg["d_l2"]), name="logit", dtype="float32")(x)
    return keras.Model(x_in, logit, name="gan_discriminator")


def make_optimizers(cfg: dict):
    """(generator, discriminator) optimizers: Adam with beta_1 0.5, the DCGAN setting; with
    `ema` > 0 the generator's keeps the moving average of its weights."""
    ema = {"use_ema": True, "ema_momentum": cfg["ema"]} if cfg["ema"] > 0 else {}
    return (keras_workarounds.warm_ema_adam_class()(cfg["lr"], beta_1=0.5, name="generator_adam", **ema),
            keras.optimizers.Adam(cfg["d_lr"], beta_1=0.5, name="discriminator_adam"))


def batchnorm_codes(code_size: int) -> np.ndarray:
    """The fixed batch of 1,024 codes whose pass gives the averaged generator its BatchNorm statistics."""
    return latent(1024, FIXED_SEED + 2, code_size)


def recalibrate_batchnorm(generator) -> None:
    """Give a generator BatchNorm statistics of its own: one training-mode pass over
    `batchnorm_codes`, each BatchNorm layer taking that batch's mean and variance.

    The averaged (EMA) weights compute other activations than the live weights whose moving
    statistics the training left, and normalising with the live ones blurs the samples
    (BigGAN's "standing statistics" fix the same). Measured on a 30-minute run's averaged
    generator: KID 0.132 with the live statistics, 0.121 with its own (README). The codes are
    fixed, so the samples stay a function of the weights and a resumed run stays exact."""
    norms = [layer for layer in generator.layers if isinstance(layer, keras.layers.BatchNormalization)]
    if not norms:
        return
    momenta = [layer.momentum for layer in norms]
    for layer in norms:
        layer.momentum = 0.0  # the moving statistics become this pass's
    try:
        generator(batchnorm_codes(generator.input_shape[-1]), training=True)
    finally:
        for layer, momentum in zip(norms, momenta):
            layer.momentum = momentum


def diff_augment(x, seed, shift: int, color: bool = True):
    """DiffAugment (Zhao et al. 2020): a translation of up to `shift` pixels (zero padding) and,
    with `color`, random brightness, saturation and contrast, per image, differentiable, on
    [0, 1] images. Applied to every image the discriminator sees, real or generated, in both
    steps."""
    n = tf.shape(x)[0]

    def uniform(shape):
        return keras.random.uniform(shape, seed=seed)

    if color:
        x = x + (uniform((n, 1, 1, 1)) - 0.5) * 0.5
        mean = tf.reduce_mean(x, axis=3, keepdims=True)
        x = (x - mean) * (uniform((n, 1, 1, 1)) * 2.0) + mean
        mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
        x = (x - mean) * (uniform((n, 1, 1, 1)) + 0.5) + mean
    if shift:
        h, w = x.shape[1], x.shape[2]
        offsets = tf.cast(tf.floor(uniform((n, 2)) * (2 * shift + 1)), tf.int32)
        padded = tf.pad(x, [[0, 0], [shift, shift], [shift, shift], [0, 0]])
        x = tf.gather(padded, tf.range(h)[None] + offsets[:, :1], axis=1, batch_dims=1)
        x = tf.gather(x, tf.range(w)[None] + offsets[:, 1:], axis=2, batch_dims=1)
    return x


@functools.cache
def face_gan_class():
    """FaceGAN, defined on first use so that importing this module never loads TensorFlow."""
    return _define_face_gan()


def _define_face_gan():
    class FaceGAN(keras.Model):
        """Both networks and both optimizers; `fit` calls `train_step` once per real batch."""

        def __init__(self, generator, discriminator, g_optimizer, d_optimizer, cfg: dict, sampler=None):
            super().__init__(name="gan_trainer")
            self.generator, self.discriminator = generator, discriminator
            self.sampler = sampler or generator  # with `ema`, a copy that gets the averaged weights
            self.sampler_step = None  # the generator step whose averaged weights the sampler holds
            self.g_optimizer, self.d_optimizer = g_optimizer, d_optimizer
            self.code_size, self.d_steps = cfg["code_size"], cfg["d_steps"]
            self.smooth = cfg["label_smoothing"]
            self.shift = cfg["image_size"] // 8 if cfg["augment"] else None
            self.color = cfg["augment_color"]
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

        def _seen(self, images):
            """What the discriminator sees: the images, DiffAugmented when `augment` is on."""
            return images if self.shift is None else diff_augment(images, self.noise, self.shift, self.color)

        def sampling_generator(self):
            """The generator that draws samples: with `ema`, the copy given the optimizer's
            averaged weights now, with BatchNorm statistics of its own (`recalibrate_batchnorm`);
            asked again at the same step (KID, progress row and checkpoint at an epoch's end),
            the copy as it is."""
            step = int(self.g_optimizer.iterations.numpy())
            if self.sampler is not self.generator and step != self.sampler_step:
                averages = keras_workarounds.ema_averages(self.g_optimizer)
                for var, average in zip(self.sampler.trainable_variables, averages):
                    var.assign(average)
                recalibrate_batchnorm(self.sampler)
                self.sampler_step = step
            return self.sampler

        def train_step(self, real):
            n = tf.shape(real)[0]
            # Under a tf.distribute strategy each replica's Keras losses come divided by the number
            # of replicas (the optimizer sums gradients over replicas); the penalty is divided here.
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            d_vars, g_vars = self.discriminator.trainable_variables, self.generator.trainable_variables
            with tf.GradientTape() as g_tape:
                fake = self.generator(self._codes(n), training=True)  # the faces the generator learns from
                with g_tape.stop_recording():
                    for _ in range(self.d_steps):
                        # One step: the discriminator learns on those same faces first, so a step
                        # runs the generator forward once (as PyTorch's DCGAN example does); with
                        # more (the course's), each discriminator step draws fresh faces.
                        shown = fake if self.d_steps == 1 else self.generator(self._codes(n), training=True)
                        with tf.GradientTape() as tape:
                            real_logit = self.discriminator(self._seen(real), training=True)
                            fake_logit = self.discriminator(self._seen(shown), training=True)
                            d_loss = (self.bce(tf.fill(tf.shape(real_logit), self.smooth), real_logit)  # smoothed labels
                                      + self.bce(tf.zeros_like(fake_logit), fake_logit))
                            if self.discriminator.losses:  # the course's L2 penalty
                                d_loss += tf.add_n(self.discriminator.losses) / replicas
                        self.d_optimizer.apply_gradients(zip(tape.gradient(d_loss, d_vars), d_vars))
                fake_logit = self.discriminator(self._seen(fake), training=True)  # the updated discriminator
                g_loss = self.bce(tf.ones_like(fake_logit), fake_logit)
            self.g_optimizer.apply_gradients(zip(g_tape.gradient(g_loss, g_vars), g_vars))
            values = {"loss": g_loss * replicas, "d_loss": d_loss * replicas,
                      "d_real": tf.reduce_mean(tf.sigmoid(real_logit)), "d_fake": tf.reduce_mean(tf.sigmoid(fake_logit))}
            for name, value in values.items():
                self.trackers[name].update_state(value)
            return {name: tracker.result() for name, tracker in self.trackers.items()}

    return FaceGAN


# -- quality: KID and FID on ImageNet features --------------------------------------------


def latent(n: int, seed: int | None, code_size: int) -> np.ndarray:
    """A reproducible latent batch: the same seed gives the same faces."""
    return np.random.default_rng(seed).standard_normal((n, code_size)).astype(np.float32)


def to_pixels(images: np.ndarray) -> np.ndarray:
    return faces.to_uint8(images, 0.0, 1.0)


class Distance:
    """KID and FID of generated faces against `kid_samples` real faces, beside the floor (those
    faces against as many other real faces) and noise images.

    `x` is split in halves: the reference comes from the first, the floor's other faces from
    the second. With fewer than 2 x `kid_samples` faces it says so and uses half of them per
    side. The reference features and the two references' figures are kept in `cache` (the
    run's kid_features.npz) and reused while the size and count match, so an epoch pays only
    for its generated faces.
    """

    def __init__(self, x: np.ndarray, cfg: dict, reporter=None, cache: Path | None = None, what: str = "held-out faces"):
        want, half = cfg["kid_samples"], len(x) // 2
        if half < 2:
            raise UsageError(f"KID needs at least 4 {what} (2 a side), got {len(x)}; use more faces or a larger val_fraction")
        self.n = min(want, half)
        if self.n < want and reporter is not None:
            reporter.info(f"KID asked for {want} {what} a side, there are {len(x)}: using {self.n} against {self.n}")
        self.seed, self.size = cfg["seed"], cfg["kid_image_size"]
        self.subset = min(image_distance.SUBSET, max(2, self.n // 2))  # at least 2 subsets: an error bar
        self.net = image_distance.FeatureNet(self.size)
        stored = self._load(cache)
        if stored is None:
            self.ref = self.net(x[: self.n])
            other = self.net(x[half: half + self.n])
            noise = self.net(image_distance.uniform_noise(self.n, x.shape[1:]))
            kid_real, kid_real_err = image_distance.kid(other, self.ref, self.subset)
            self.refs = {"kid_real": kid_real, "kid_real_err": kid_real_err,
                         "kid_noise": image_distance.kid(noise, self.ref, self.subset)[0],
                         "fid_real": image_distance.fid(other, self.ref), "fid_noise": image_distance.fid(noise, self.ref)}
            if cache is not None:
                atomic_write_npz(cache, ref=self.ref, n=self.n, size=self.size,
                               **{k: np.float64(v) for k, v in self.refs.items()})

    def _load(self, cache: Path | None):
        if cache is None or not cache.exists():
            return None
        with np.load(cache) as data:
            if int(data["n"]) != self.n or int(data["size"]) != self.size:
                return None
            self.ref = data["ref"]
            self.refs = {k: float(data[k]) for k in ("kid_real", "kid_real_err", "kid_noise", "fid_real", "fid_noise")}
        return True

    def __call__(self, generator) -> dict:
        fake = generator.predict(latent(self.n, 7 + (self.seed or 0), generator.input_shape[-1]), batch_size=250, verbose=0)
        feats = self.net(fake)
        kid, err = image_distance.kid(feats, self.ref, self.subset)
        return {"kid": kid, "kid_err": err, "fid": image_distance.fid(feats, self.ref), **self.refs}


# -- saving and resuming ------------------------------------------------------------------


def optimizers_file(gan: "FaceGAN") -> "training.Snapshot":
    """Both optimizers' variables (iterations, Adam moments) as they are now, in one .npz file
    written later (`load_optimizers` reads it)."""
    arrays = {}
    for prefix, opt in (("g", gan.g_optimizer), ("d", gan.d_optimizer)):
        store: dict = {}
        opt.save_own_variables(store)
        arrays.update({f"{prefix}_{k}": np.array(v, copy=True) for k, v in store.items()})

    def write(path: Path) -> None:
        with open(path, "wb") as fh:
            np.savez(fh, **arrays)

    return training.Snapshot(write)


def load_optimizers(gan: "FaceGAN", path: Path) -> None:
    gan.build_optimizers()
    with np.load(path, allow_pickle=False) as data:
        for prefix, opt in (("g", gan.g_optimizer), ("d", gan.d_optimizer)):
            store = {k[2:]: data[k] for k in data.files if k.startswith(prefix + "_")}
            if len(store) != len(opt.variables):
                raise UsageError(f"{path} does not match the {prefix} optimizer: {len(store)} arrays for {len(opt.variables)} variables")
            opt.load_own_variables(store)


def new_gan(cfg: dict, backup: Path | None = None) -> "FaceGAN":
    """A fresh FaceGAN, or the one saved in an epoch backup with its optimizers' state (the
    weight average included: the sampling copy gets it from there)."""
    if backup is None:
        with training.precision(cfg["precision"]):  # each layer keeps its dtype policy when saved
            generator, discriminator = build_generator(cfg), build_discriminator(cfg)
    else:
        generator = training.load_model(backup / (LIVE_GENERATOR_FILE if cfg["ema"] > 0 else GENERATOR_FILE), "gan")
        discriminator = training.load_model(backup / DISCRIMINATOR_FILE, "gan")
    sampler = keras.models.clone_model(generator) if cfg["ema"] > 0 else None
    gan = face_gan_class()(generator, discriminator, *make_optimizers(cfg), cfg, sampler=sampler)
    if backup is not None:
        load_optimizers(gan, backup / OPTIMIZERS_FILE)
    else:
        gan.build_optimizers()
    gan.compile(jit_compile=cfg["jit_compile"])
    return gan


class GanCheckpoint(training.CheckpointState):
    """A gan checkpoint: generator.keras (the one that draws: with `ema`, the averaged weights),
    generator_live.keras (with `ema`: the trained weights), discriminator.keras and
    optimizers.npz; at the end the drawing generator and the discriminator are put in the run."""

    def __init__(self, cfg: dict):
        super().__init__(model_file=GENERATOR_FILE)
        self.cfg = cfg

    def build(self):
        return new_gan(self.cfg)

    def restore(self, backup: Path):
        return new_gan(self.cfg, backup)

    def files(self, gan) -> dict:
        files = {GENERATOR_FILE: training.model_file(gan.sampling_generator()),
                 DISCRIMINATOR_FILE: training.model_file(gan.discriminator), OPTIMIZERS_FILE: optimizers_file(gan)}
        if gan.sampler is not gan.generator:
            files[LIVE_GENERATOR_FILE] = training.model_file(gan.generator)
        return files

    def outputs(self) -> dict:
        return {GENERATOR_FILE: GENERATOR_FILE, DISCRIMINATOR_FILE: DISCRIMINATOR_FILE}


# -- train / evaluate ---------------------------------------------------------------------


def scale(x: np.ndarray) -> np.ndarray:
    return data_lib.unit_float(x)


def train(ctx: Context) -> dict:
    cfg, run, reporter = ctx.cfg, ctx.run, ctx.reporter
    if cfg["d_steps"] < 1:
        raise UsageError(f"d_steps must be >= 1, got {cfg['d_steps']}")
    training.set_seed(cfg["seed"])
    split = faces.load_split(cfg, run)
    x_train, x_val = scale(split["x_train"]), scale(split["x_val"])
    reporter.info(f"{len(x_train)} training and {len(x_val)} held-out faces, {cfg['image_size']}x{cfg['image_size']}")
    every = cfg["kid_every"]
    distance = Distance(x_val, cfg, reporter, cache=run.file(KID_FILE)) if every else None
    batch = min(cfg["batch_size"], len(x_train))
    steps = len(x_train) // batch  # whole batches only: every step sees `batch` real faces
    train_ds = tf.data.Dataset.from_tensor_slices(x_train).cache()

    def train_data(epoch):
        seed = training.epoch_seed(cfg["seed"], epoch)
        return train_ds.shuffle(len(x_train), seed=seed).batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

    fixed = latent(PROGRESS_ROW, FIXED_SEED, cfg["code_size"])
    progress_path = run.file(PROGRESS_FILE)

    def add_progress_row(gan, epoch: int, logs: dict) -> None:
        """progress.npy gets the fixed batch's faces after each epoch; rows beyond the epochs
        before this one (left by a run killed before its checkpoint) are cut."""
        rows = list(np.load(progress_path)[:epoch]) if epoch and progress_path.exists() else []
        # One batch: `predict_on_batch` runs predict's own step on it without predict's data
        # set and iterator, the same pixels for a fiftieth of the time (0.015 s against 0.5-1.4 s).
        rows.append(to_pixels(np.asarray(gan.sampling_generator().predict_on_batch(fixed))))
        atomic_write_npy(progress_path, np.stack(rows))

    def add_distance(gan, epoch: int, logs: dict) -> None:
        """KID and FID after every `kid_every`-th epoch and the last."""
        if (epoch + 1) % every == 0 or epoch + 1 == cfg["epochs"]:
            logs.update(distance(gan.sampling_generator()))

    extras = ([training.after_each_epoch(add_distance)] if distance else []) + [training.after_each_epoch(add_progress_row)]
    gan, history = training.fit(ctx, GanCheckpoint(cfg), train_data, steps_per_epoch=steps, callbacks=extras,
                                tensorboard=False)
    final = history[-1]
    kid = {k: final[k] for k in ("kid", "kid_err", "kid_real", "kid_noise", "fid", "fid_real", "fid_noise") if k in final}
    if "kid" in history[0]:
        kid["kid_first_epoch"] = history[0]["kid"]
    return {**kid, "d_real": final["d_real"], "d_fake": final["d_fake"], "iterations": int(gan.g_optimizer.iterations.numpy())}


def evaluate(ctx: Context) -> dict:
    """KID and FID of fresh samples against the run's held-out faces, beside the two references.

    On other data (`--dataset OTHER`) every face of it takes part, in a seeded random order:
    one half is the reference the samples are compared with, the other half gives the floor
    (no `kid_samples` cap); the count is `faces` instead of `held_out_faces`.
    """
    generator = training.load_model(ctx.model_path, "gan")
    other = ctx.on_other_data
    x, _ = faces.eval_faces(ctx.cfg, ctx.run, other, ctx.reporter)
    if other:
        x = x[np.random.default_rng(ctx.cfg["seed"]).permutation(len(x))]
        distance = Distance(scale(x), {**ctx.cfg, "kid_samples": len(x) // 2}, what="faces")
    else:
        distance = Distance(scale(x), ctx.cfg, ctx.reporter, cache=ctx.run.file(KID_FILE))
    return {**distance(generator), ("faces" if other else "held_out_faces"): int(len(x))}


# -- predict ------------------------------------------------------------------------------


def predict(ctx: Context, inputs: list[str]) -> list[dict]:
    if inputs:
        raise UsageError("the GAN takes no input files: `dlcli predict gan --n 64 --seed 1 --out samples/`")
    n = ctx.options["n"]
    if n < 1:
        raise UsageError(f"--n must be >= 1, got {n}")
    generator = lite.model_for(ctx, "gan")  # the export's generator where it is current, else Keras
    seed = ctx.cfg["seed"]
    codes = latent(n, seed, ctx.cfg["code_size"])
    images = to_pixels(np.concatenate([generator(codes[s: s + 256]) for s in range(0, n, 256)]))
    out = ctx.out or ctx.run.file("samples")
    out.mkdir(parents=True, exist_ok=True)
    paths = faces.save_pngs({out / f"face-{seed}-{i:04d}.png": img for i, img in enumerate(images)})
    rows = [{"input": f"seed {seed} #{i}", "path": str(path)} for i, path in enumerate(paths)]
    grid = faces.save_png(faces.tile(images, min(8, n)), out / f"grid-{seed}.png", scale=2)
    rows.append({"input": f"seed {seed} grid", "path": str(grid)})
    return rows


def export_preprocessing(cfg: dict) -> dict:
    """What a user of the exported generator gives it (export.json)."""
    return {"input": f"codes (N, {cfg['code_size']}) drawn from the standard normal distribution",
            "shape": [cfg["code_size"]], "code": "dlcli.tasks.gan.latent",
            "output": f"faces (N, {cfg['image_size']}, {cfg['image_size']}, 3) on [0, 1]; x 255 for pixels"}


# The generator that draws the samples (with `ema`, the averaged weights): codes in, faces out.
# A fixed batch of 16: the transposed convolutions then run on XNNPACK (64 faces in 0.16 s, not 0.42).
EXPORT = ExportSpec(preprocessing=export_preprocessing, output="faces on [0, 1] (N, size, size, 3), in batches of 16",
                    batch=16)


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

    path = ctx.run.file(PROGRESS_FILE)
    if not path.exists():
        raise UsageError(f"run {ctx.run.dir} has no {PROGRESS_FILE}")
    rows = np.load(path)
    history = ctx.run.read_history()
    titles = []
    for epoch in range(len(rows)):
        kid = history[epoch].get("kid") if epoch < len(history) else None
        kid_text = f" KID {kid:.3f}" if isinstance(kid, float) else ""  # `kid_every` skips epochs
        titles += [f"epoch {epoch + 1}{kid_text}"] + [""] * (rows.shape[1] - 1)
    return image_grid(list(rows.reshape(-1, *rows.shape[2:])), ctx.view_path("gan-progress"),
                      titles=titles, cols=rows.shape[1], tile_inches=0.9,
                      suptitle=f"gan / {ctx.run.name}: the fixed latent batch after each epoch" + _floor_note(history))


def _floor_note(history: list) -> str:
    """The KID references of the last epoch, for a picture's title."""
    last = history[-1] if history else {}
    if "kid_real" not in last:
        return ""
    return f"\nKID of real faces (floor) {last['kid_real']:.4f}, of noise {last['kid_noise']:.2f}"


def view_discriminator(ctx: Context) -> Path:
    """How well D tells held-out real faces from generated ones, as two histograms."""
    from dlcli.plots import pyplot, save_figure

    generator = training.load_model(ctx.model_path, "gan")
    discriminator = training.load_model(ctx.run.file(DISCRIMINATOR_FILE), "gan")
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


# What this task's own config keys mean (and its own meaning of shared ones), for
# `dlcli tasks TASK` and `train --help`; keys every task shares are in `config.KEY_HELP`.
KEY_HELP = {
    "model": "dcgan: the default networks; course: the course's generator and discriminator",
    "image_size": "face size in pixels (the course's generator draws 36x36; dcgan any multiple of 4)",
    "code_size": "length of the random code the generator starts from",
    "d_steps": "discriminator updates per generator update",
    "d_lr": "the discriminator's learning rate (--lr is the generator's)",
    "label_smoothing": "the target of real faces for the discriminator (1.0: no smoothing)",
    "d_l2": "L2 penalty on the last layers of the course's discriminator",
    "augment": "DiffAugment: random shifts of every face the discriminator sees",
    "augment_color": "DiffAugment also changes brightness, saturation and contrast (slower to learn colour)",
    "ema": "decay of the moving average of the generator's weights that draws the faces (0: none)",
    "kid_samples": "generated and held-out faces compared for KID and FID after each epoch",
    "kid_every": "KID and FID after every N-th epoch and the last (0: never while training)",
    "width": "filters of the dcgan's widest layers (generator width, /2, /4; discriminator /4, /2, width)",
    "kid_image_size": "pixels the faces are resized to for the ImageNet features of KID and FID",
}


TASK = TaskSpec(
    name="gan",
    summary="a DCGAN drawing 36x36 faces, scored by KID and FID against held-out faces",
    defaults=DEFAULTS,
    data=DataRules(kinds=("tfds", "folder")),
    choices=CHOICES,
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
    key_help=KEY_HELP,
    export=EXPORT,
)
