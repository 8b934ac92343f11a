"""Opening the user's input files without ever blocking on one.

Opening a FIFO for reading waits for a writer, and reading a character device (`/dev/zero`,
a terminal) may never end; neither is an input file. `open_regular` opens without waiting
(O_NONBLOCK, which changes nothing for a regular file) and refuses whatever is not a
regular file: one `open` and one `fstat`, the cost of a plain `open` and a size check.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


class NotRegularFile(OSError):
    """A FIFO, a device or a socket where an input file was expected."""

    def __init__(self, path, kind: str):
        super().__init__(errno.EINVAL, f"not a regular file ({kind})", str(path))
        self.kind = kind


def kind_of(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a file"


def open_regular(path: str | Path, text: bool = False, encoding: str | None = None):
    """`path` opened for reading, refused with `NotRegularFile` unless a regular file (no
    FIFO is ever waited on); other failures are the usual OSErrors."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(path, kind_of(mode))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return open(fd, "r" if text else "rb", encoding=encoding if text else None)


def check_regular(path: str | Path) -> None:
    """Refuse (`NotRegularFile`) an existing path that is not a regular file, without opening it."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise NotRegularFile(path, kind_of(mode))
