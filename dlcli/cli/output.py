"""What the commands print: human lines, one `--json` document, or `--jsonl` rows; errors
as one line on stderr with the right exit code, never a traceback.

With `--json` or `--jsonl`, stdout carries only the JSON and everything else goes to stderr,
so `dlcli predict mnist digits/ --jsonl | jq` reads clean objects.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Iterable

import typer
from rich.markup import escape

from dlcli.engine import streams
from dlcli.engine.progress import Reporter
from dlcli.errors import DlcliError

ERR = streams.console(stderr=True)


def reporter(json_mode: bool, quiet: bool) -> Reporter:
    """The command's reporter: on stdout, or on stderr where stdout carries JSON. Where
    stdout will be written and is closed, the command stops here, before any work."""
    if json_mode or not quiet:
        streams.check_stdout()
    return Reporter(streams.console(stderr=json_mode), quiet=quiet)


def human(value: Any) -> str:
    """One format for numbers in human output: 4 decimals (0.9965, 0.0000), 4 digits when large."""
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value)


def emit_json(data: Any) -> None:
    streams.write(json.dumps(data, indent=2, default=str) + "\n")


def print_error(message: object, hint: str = "") -> None:
    """One `error:` line on stderr of a message that may hold names from files (no markup, no
    control characters), and a hint after it."""
    ERR.print(f"[red]error:[/] {escape(streams.printable(message))}{escape(hint)}", markup=True, highlight=False,
              soft_wrap=True)


def _stopped_line(exc: KeyboardInterrupt, command: str) -> str:
    what = "stopped by SIGTERM" if getattr(exc, "exit_code", 130) == 143 else "interrupted"
    return f"{what}; `--resume` continues the run from its last checkpoint" if command == "train" else what


def handle_errors(command):
    """Turn every failure into one line on stderr and the right exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except BrokenPipeError:  # `dlcli ... | head`: the reader has what it wanted
            streams.silence_stdout()
            raise typer.Exit(141)
        except DlcliError as exc:
            print_error(exc)
            raise typer.Exit(exc.exit_code)
        except KeyboardInterrupt as exc:
            ERR.print(_stopped_line(exc, command.__name__.removesuffix("_command")), markup=False)
            raise typer.Exit(getattr(exc, "exit_code", 130))
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as exc:  # the last resort: still one line, never a traceback
            if os.environ.get("DLCLI_DEBUG"):
                raise
            if isinstance(exc, OSError) and exc.strerror:  # a read-only or full disk, a missing folder
                where = f"{exc.filename}: " if exc.filename else ""
                print_error(f"{where}{exc.strerror}")
                raise typer.Exit(1)
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "no message"
            print_error(f"an unexpected failure ({first}); set DLCLI_DEBUG=1 for the traceback")
            raise typer.Exit(1)

    return wrapper


def print_predictions(rows: Iterable[dict], reporter: Reporter, json_mode: bool, jsonl: bool) -> None:
    """Each row as it comes (human lines, or JSON lines), errors on stderr; exit 2 if any failed."""
    if json_mode:
        rows = list(rows)
        emit_json(rows)
    failed = total = 0
    for row in rows:  # a reader that went away (`| head`): handle_errors exits 141
        total += 1
        if "error" in row:
            failed += 1
            print_error(row["error"])
        if jsonl:
            streams.write(json.dumps(row, default=str) + "\n")
        elif not json_mode and "error" not in row:
            streams.write(human_row(row) + "\n")  # one line per input, never wrapped: scripts read it line by line
    if failed:
        ERR.print(f"{failed} of {total} inputs failed", highlight=False)
        raise typer.Exit(2)


def human_row(row: dict) -> str:
    """A prediction as one line, its names (file, class, caption) with control characters escaped."""
    shown = row.get("text") or "  ".join(f"{k} {human(v)}" for k, v in row.items() if k not in ("input", "note"))
    if row.get("note"):
        shown += f"  ({row['note']})"
    return streams.printable(f"{row['input']}: {shown}" if "input" in row else shown)


def print_path(path) -> None:
    """A written file's path on stdout (export, visualize), escaped like every name."""
    streams.write(streams.printable(path) + "\n")
