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
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from dlcli.errors import UsageError

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class _Loader(yaml.SafeLoader):
    """The safe loader, but `1e-3` is a number (YAML 1.1 wants `1.0e-3`; YAML 1.2 and people don't)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(f"^(?:{_FLOAT.pattern})$"), list("-+0123456789."))


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)

# Keys with a fixed set of values in every task that has them.
COMMON_CHOICES: dict[str, list] = {"strategy": ["default", "mirrored", "multi-worker"]}

# key -> (test, what is allowed); applied wherever the key appears in a task's defaults.
COMMON_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "epochs": (lambda v: v >= 1, "an integer >= 1"),
    "batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "lr": (lambda v: v > 0, "a number > 0"),
    "seed": (lambda v: v is None or v >= 0, "an integer >= 0"),
    "save_every_steps": (lambda v: v >= 0, "an integer >= 0 (0: save at epoch ends only)"),
}


def parse_set(expr: str) -> tuple[str, Any]:
    """`a.b=3` -> ("a.b", 3); the value is read as a YAML scalar."""
    key, sep, raw = expr.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UsageError(f"--set expects key=value, got {expr!r}")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, (dict, list)) and not raw.strip().startswith(("[", "{")):
        value = raw
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-3 as a string
    return key, value


def load_config_file(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UsageError(f"config file {path} is not valid YAML{where}") from None
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
    return list(_flatten(defaults))


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


def _flatten(data: Mapping, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
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
    if leaf in COMMON_CHECKS and value is not None:
        test, allowed = COMMON_CHECKS[leaf]
        if not test(value):
            raise UsageError(f"config key {key!r} must be {allowed}; got {value!r}")
    return value


def validate(cfg: Mapping, defaults: Mapping, choices: Mapping[str, list] | None = None) -> dict:
    """Check every key against the defaults and return a clean, typed copy."""
    choices = choices or {}
    flat_defaults = _flatten(defaults)
    out = copy.deepcopy(dict(defaults))
    for key, value in _flatten(cfg).items():
        if key not in flat_defaults:
            # A nested mapping given where the defaults hold a sub-tree, or an unknown key.
            _set_dotted({}, defaults, key, value)
            raise UsageError(f"config key {key!r} must be a mapping of sub-keys")
        _set_dotted(out, defaults, key, _coerce(key, value, flat_defaults[key], choices))
    return out


def resolve(
    defaults: Mapping,
    config_file: str | Path | None = None,
    sets: list[str] | tuple[str, ...] = (),
    flags: Mapping[str, Any] | None = None,
    choices: Mapping[str, list] | None = None,
    base: Mapping | None = None,
) -> dict:
    """Merge the four layers in order of precedence and validate the result.

    `base`, when given (a resumed run's saved config), stands in for the config file.
    """
    merged: dict = {}
    layers: list[dict] = [_flatten(base)] if base else []
    if config_file:
        layers.append(_flatten(load_config_file(config_file)))
    layers.append(dict(parse_set(s) for s in sets))
    layers.append({k: v for k, v in (flags or {}).items() if v is not None})
    for layer in layers:
        for key, value in layer.items():
            _set_dotted(merged, defaults, key, value)
    return validate(merged, defaults, choices)


def to_yaml(cfg: Mapping) -> str:
    return yaml.safe_dump(dict(cfg), sort_keys=False, default_flow_style=False)
