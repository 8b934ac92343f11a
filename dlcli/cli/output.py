"""What the commands print: human lines, one `--json` document, or `--jsonl` rows; errors
as one line on stderr with the right exit code, never a traceback.

With `--json` or `--jsonl`, stdout carries only the JSON and everything else goes to stderr,
so `dlcli predict mnist digits/ --jsonl | jq` reads clean objects.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Any, Iterable

import typer
from rich.console import Console
from rich.markup import escape

from dlcli.engine.progress import Reporter
from dlcli.errors import DlcliError

ERR = Console(stderr=True, highlight=False)


def reporter(json_mode: bool, quiet: bool) -> Reporter:
    """The command's reporter: on stdout, or on stderr where stdout carries JSON."""
    return Reporter(Console(stderr=json_mode, highlight=False), quiet=quiet)


def human(value: Any) -> str:
    """One format for numbers in human output: 4 decimals (0.9965, 0.0000), 4 digits when large."""
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value)


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def handle_errors(command):
    """Turn every failure into one line on stderr and the right exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except DlcliError as exc:
            ERR.print(f"[red]error:[/] {exc}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code)
        except KeyboardInterrupt as exc:
            what = "stopped by SIGTERM" if getattr(exc, "exit_code", 130) == 143 else "interrupted"
            ERR.print(f"{what}; `--resume` continues a training run from its last checkpoint")
            raise typer.Exit(getattr(exc, "exit_code", 130))
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as exc:  # the last resort: still one line, never a traceback
            if os.environ.get("DLCLI_DEBUG"):
                raise
            if isinstance(exc, OSError) and exc.strerror:  # a read-only or full disk, a missing folder
                where = f"{exc.filename}: " if exc.filename else ""
                ERR.print(f"[red]error:[/] {where}{exc.strerror}", markup=True, highlight=False, soft_wrap=True)
                raise typer.Exit(1)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            ERR.print(
                f"[red]error:[/] {type(exc).__name__}: {first} (set DLCLI_DEBUG=1 for the traceback)",
                markup=True, highlight=False, soft_wrap=True,
            )
            raise typer.Exit(1)

    return wrapper


def print_predictions(rows: Iterable[dict], reporter: Reporter, json_mode: bool, jsonl: bool) -> None:
    """Each row as it comes (human lines, or JSON lines), errors on stderr; exit 2 if any failed."""
    if json_mode:
        rows = list(rows)
        emit_json(rows)
    failed = total = 0
    try:
        for row in rows:
            total += 1
            if "error" in row:
                failed += 1
                ERR.print(f"[red]error:[/] {escape(row['error'])}", markup=True, highlight=False, soft_wrap=True)
            if jsonl:
                sys.stdout.write(json.dumps(row, default=str) + "\n")
                sys.stdout.flush()
            elif not json_mode and "error" not in row:
                shown = row.get("text") or "  ".join(f"{k} {human(v)}" for k, v in row.items() if k not in ("input", "note"))
                if row.get("note"):
                    shown += f"  ({row['note']})"
                # one line per input, never wrapped: scripts read it line by line
                reporter.console.print(f"{row['input']}: {shown}" if "input" in row else shown, highlight=False,
                                       markup=False, soft_wrap=True)
    except BrokenPipeError:  # `dlcli predict ... --jsonl | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(141)
    if failed:
        ERR.print(f"{failed} of {total} inputs failed", highlight=False)
        raise typer.Exit(2)

