"""Atomic writes: every file of a run is written to a temporary file, fsynced and renamed,
so a crash or a full disk leaves either the old complete file or the new complete one.

The crash test's hook: with DLCLI_FAULT_AT=N in the environment, the process kills itself
(SIGKILL) at the N-th write, fsync, rename or delete of a run's files (`fault_point`);
DLCLI_FAULT_TRACE=FILE appends one line per such point to FILE, which is how a test learns
how many points a run has.

Example:
    >>> from pathlib import Path; import tempfile
    >>> path = atomic_write_json(Path(tempfile.mkdtemp()) / "metrics.json", {"accuracy": 0.99})
    >>> path.read_text()
    '{\n  "accuracy": 0.99\n}\n'
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any, Callable

from dlcli.errors import RunError

_fault_count = 0


def fault_point(kind: str, path: Path | str) -> None:
    """One write, fsync, rename or delete of a run's files: where DLCLI_FAULT_AT=N kills the
    process at the N-th such point (and DLCLI_FAULT_TRACE=FILE records each point)."""
    global _fault_count
    at, trace = os.environ.get("DLCLI_FAULT_AT"), os.environ.get("DLCLI_FAULT_TRACE")
    if not at and not trace:
        return
    _fault_count += 1
    if trace:
        with open(trace, "a") as fh:
            fh.write(f"{_fault_count} {kind} {path}\n")
    if at and _fault_count == int(at):
        os.kill(os.getpid(), signal.SIGKILL)


class Snapshot:
    """A file's content taken when the snapshot was made: `write(path)` puts it on disk at any
    later time, from another thread too, reading nothing that has changed since (a checkpoint's
    model file, taken at its step while training goes on)."""

    def __init__(self, write: Callable[[Path], None]):
        self.write = write

    def __call__(self, path: Path) -> None:
        self.write(path)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _describe_os_error(exc: OSError, path: Path) -> str:
    if exc.errno == errno.ENOSPC:
        return f"no space left on the device while writing {path}"
    if exc.errno == errno.EROFS:
        return f"cannot write {path}: the file system is read-only"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"cannot write {path}: permission denied"
    return f"cannot write {path}: {exc.strerror or exc}"


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` and move tmp over `path` only if it succeeded."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        fault_point("write", tmp)
        fsync_file(tmp)
        fault_point("fsync", tmp)
        os.replace(tmp, path)
        # rename() does nothing where tmp and path are already hard links of one file
        # (link_or_copy of a model file a killed run had put in place): remove tmp then.
        tmp.unlink(missing_ok=True)
        fault_point("rename", path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise RunError(_describe_os_error(exc, path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_all(writes: dict[Path, Callable[[Path], None]]) -> list[Path]:
    """`atomic_write` of many files at once: each written to its temporary file, all of them
    fsynced together (in threads, so that the file system commits them in a few journal
    commits instead of one each: 65 small PNGs in 0.02 s instead of 0.2-0.5 s), then all
    renamed into place."""
    from concurrent.futures import ThreadPoolExecutor

    tmps = {Path(path): Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}") for path in writes}
    try:
        for path, write in writes.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            write(tmps[path])
            fault_point("write", tmps[path])
        with ThreadPoolExecutor(min(16, len(tmps)) or 1) as pool:
            list(pool.map(fsync_file, tmps.values()))
            for tmp in tmps.values():
                fault_point("fsync", tmp)
            # renaming over an old file makes ext4 flush it (auto_da_alloc): in threads too
            list(pool.map(lambda item: os.replace(item[1], item[0]), tmps.items()))
        for path, tmp in tmps.items():
            tmp.unlink(missing_ok=True)
            fault_point("rename", path)
    except OSError as exc:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
        raise RunError(_describe_os_error(exc, next(iter(tmps)))) from None
    except BaseException:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
        raise
    return list(tmps)


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, default=_jsonable) + "\n")


def atomic_write_npz(path: Path, **arrays) -> Path:
    """NumPy arrays to an .npz file, atomically."""
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # an open file: np.savez would append .npz to the tmp name
            np.savez(fh, **arrays)

    return atomic_write(path, write)


def atomic_write_npy(path: Path, array) -> Path:
    """One NumPy array to an .npy file, atomically."""
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array)

    return atomic_write(path, write)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def link_or_copy(src: Path, dst: Path) -> None:
    """Put a finished file at `dst` atomically, without copying where a hard link works."""

    def write(tmp: Path) -> None:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)

    atomic_write(dst, write)
