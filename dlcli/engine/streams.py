"""What dlcli prints: standard output that fails in one clear line, text that cannot drive the terminal.

- `guard_standard_streams` (at process start): a closed stdin, stdout or stderr gets
  /dev/null on its file descriptor, so no file dlcli opens later takes that number (and
  receives output meant for the terminal); a closed stderr then swallows what libraries
  write there, and a closed stdout stays visible to `write` as closed.
- `write`, `console`: standard output whose failures (closed, full, an I/O error) are
  `OutputError`, "cannot write to standard output", exit 1; a reader that went away
  (`| head`) is a `BrokenPipeError` the CLI turns into exit 141 without a word.
- `printable`: a name read from a file or the file system with its control characters
  escaped (`\\x1b`), for human output; JSON escapes them itself.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sys

from rich.console import Console

from dlcli.errors import RunError


class OutputError(RunError):
    """Standard output cannot be written (closed, a full device, an I/O error)."""

    def __init__(self, why: str | None = None):
        super().__init__("cannot write to standard output" + (f" ({why})" if why else ""))


def _why(exc: OSError) -> str | None:
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    if exc.errno == errno.EBADF:
        return "it is closed"
    return exc.strerror or None


def guard_standard_streams() -> None:
    """Put /dev/null on each closed standard file descriptor (0, 1, 2); a closed stderr also
    gets a Python stream on it, since libraries call `sys.stderr.flush()` unguarded."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            if fd == 2 and sys.stderr is None:
                sys.stderr = open(fd, "w", closefd=False)


def check_stdout() -> None:
    """Refuse at once, before any work, when standard output is closed."""
    if sys.stdout is None:
        raise OutputError("it is closed")


@contextlib.contextmanager
def _stdout_failures():
    """A failure of standard output as `OutputError`; a broken pipe stays itself (exit 141)."""
    if sys.stdout is None:
        raise OutputError("it is closed")
    try:
        yield sys.stdout
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise OutputError(_why(exc)) from None
    except ValueError:  # a closed Python stream
        raise OutputError("it is closed") from None


def write(text: str) -> None:
    """Write and flush `text` on standard output."""
    with _stdout_failures() as stream:
        stream.write(text)
        stream.flush()


class _Stdout:
    """sys.stdout, looked up at each write, for a Rich console: its failures are `OutputError`."""

    def write(self, text: str) -> int:
        with _stdout_failures() as stream:
            return stream.write(text)

    def flush(self) -> None:
        with _stdout_failures() as stream:
            stream.flush()

    def isatty(self) -> bool:
        return sys.stdout is not None and sys.stdout.isatty()

    def fileno(self) -> int:
        return sys.stdout.fileno()

    @property
    def encoding(self) -> str:
        return getattr(sys.stdout, "encoding", None) or "utf-8"


class _Console(Console):
    """A Rich console that leaves a broken pipe to the caller (Rich's own exits 1 silently)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError(errno.EPIPE, "broken pipe")


def console(stderr: bool = False, **options) -> Console:
    """A console on stdout (failures as `OutputError`, a broken pipe raised) or on stderr."""
    options.setdefault("highlight", False)
    if stderr:
        return Console(stderr=True, **options)
    return _Console(file=_Stdout(), **options)


def silence_stdout() -> None:
    """After a broken pipe: /dev/null on stdout, so Python's last flush at exit is quiet."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno() if sys.stdout is not None else 1)
        os.close(null)
    except (OSError, ValueError):
        pass


# C0 controls but none (a name holds no tab or newline worth keeping on one line), DEL, C1
# controls, and the Unicode line and paragraph separators and bidirectional overrides.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: object, newlines: bool = False) -> str:
    """`text` with every control character written as an escape (`\\x1b`, `\\n`): safe to print.
    `newlines`: keep line breaks (a message of several lines)."""
    def escaped(match) -> str:
        char = match.group()
        return char if newlines and char == "\n" else char.encode("unicode_escape").decode("ascii")

    return _CONTROL.sub(escaped, str(text))
