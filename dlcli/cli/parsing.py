"""Task options on the command line: predict's and the views' own options (`--top-k 5`) and a
task's config keys given as flags on `train` (`--model cnn`), which Click does not know of,
parsed from the tokens it leaves over.
"""

from __future__ import annotations

from typing import Any

from dlcli import config as config_lib
from dlcli.contract import Option
from dlcli.errors import UsageError


def parse_task_options(tokens: list[str], spec: dict[str, Option], where: str) -> tuple[dict, list[str]]:
    """Split leftover tokens into task options (`--top-k 5`) and positional inputs."""
    values = {name: opt.default for name, opt in spec.items()}
    inputs: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token == "--":  # the end of the options: the rest are inputs, whatever they look like
            inputs.extend(tokens[i + 1:])
            break
        if not token.startswith("--"):
            inputs.append(token)
            i += 1
            continue
        name, eq, inline = token[2:].partition("=")
        key = name.replace("-", "_")
        negated = key.startswith("no_") and key[3:] in spec and spec[key[3:]].type is bool
        if key not in spec and not negated:
            valid = ", ".join("--" + k.replace("_", "-") for k in spec) or "none"
            raise UsageError(f"unknown option --{name} for {where}; its options: {valid}")
        if negated:
            values[key[3:]] = False
            i += 1
            continue
        opt = spec[key]
        if opt.type is bool and not eq:
            values[key] = True
            i += 1
            continue
        raw = [inline] if eq else tokens[i + 1 : i + 1 + opt.nargs]
        if len(raw) < opt.nargs or any(r.startswith("--") for r in raw if not eq):
            raise UsageError(f"--{name} needs {opt.nargs} value(s)")
        converted = [_convert(r, opt.type, name) for r in raw]
        values[key] = converted[0] if opt.nargs == 1 else converted
        i += 1 + (0 if eq else opt.nargs)
    return values, inputs


def _convert(raw: str, kind: type, name: str) -> Any:
    if kind is bool:
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise UsageError(f"--{name} must be true or false; got {raw!r}")
    try:
        return kind(raw)
    except ValueError:
        raise UsageError(f"--{name} must be {'an integer' if kind is int else 'a number' if kind is float else kind.__name__}; got {raw!r}") from None


def config_flags(tokens: list[str], defaults: dict, task: str) -> dict:
    """Top-level config keys given as flags on `train`: `--model cnn` means model=cnn."""
    spec = {k: Option(str, None, "") for k, v in defaults.items() if not isinstance(v, dict)}
    values, inputs = parse_task_options(tokens, spec, f"`dlcli train {task}` (or use --set KEY=VALUE)")
    if inputs:
        raise UsageError(f"unexpected argument {inputs[0]!r}")
    return {k: config_lib.parse_set(f"{k}={v}")[1] for k, v in values.items() if v is not None}

