"""`predict` for batch jobs: many inputs named briefly, decoded ahead, results streamed.

`expand` turns the command line into paths lazily (files, directories searched
recursively, quoted globs, `-` for paths on stdin), so 100,000 files never sit in one
argument list or one Python list. `stream` decodes the next batches in threads (Pillow and
NumPy release the GIL) while the model runs on the current one, and yields each batch's rows
in input order as soon as it is done, so memory stays flat and `| head` answers at once.
Neither imports TensorFlow: the exported-model path (`dlcli.lite`) runs without it.
"""

from __future__ import annotations

import glob
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from queue import Empty, Full, Queue
from typing import Any, Callable, Iterable, Iterator

from dlcli.errors import UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
# The tasks whose predict reads files, and the file types a directory or glob is searched for.
FILE_TASKS = {name: IMAGE_SUFFIXES for name in ("mnist", "cnn", "finetune", "autoencoder", "caption")}
GLOB_CHARS = frozenset("*?[")


def _error(token: str, message: str) -> dict:
    return {"input": token, "error": message}


def _walk(folder: str, suffixes: tuple[str, ...]) -> Iterator[str]:
    """Files under `folder` with one of the suffixes, depth first, in name order (stable output)."""
    for top, dirs, files in os.walk(folder, onerror=None, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(suffixes) and not name.startswith("."):
                yield os.path.join(top, name)


def _one(token: str, suffixes: tuple[str, ...], kinds: str) -> Iterator[str | dict]:
    if os.path.isdir(token):
        n = 0
        for n, path in enumerate(_walk(token, suffixes), 1):
            yield path
        if n == 0:
            yield _error(token, f"{token}: a directory with no {kinds} files in it or below")
    elif not os.path.lexists(token) and GLOB_CHARS & set(token):
        matches = sorted(glob.glob(token, recursive=True))
        n = 0
        for match in matches:
            if os.path.isdir(match):
                for path in _walk(match, suffixes):
                    n += 1
                    yield path
            elif match.lower().endswith(suffixes):
                n += 1
                yield match
        if n == 0:
            yield _error(token, f"{token}: the pattern matches no {kinds} files")
    else:
        yield token  # a plain file, named on purpose: read whatever its type (errors name it)


def expand(tokens: Iterable[str], suffixes: tuple[str, ...] = IMAGE_SUFFIXES, stdin=None) -> Iterator[str | dict]:
    """Paths to predict, lazily, in the order given; an error row {"input", "error"} for a token
    that yields nothing (an empty directory, a glob matching nothing, an empty stdin)."""
    kinds = "image" if suffixes == IMAGE_SUFFIXES else "/".join(suffixes)
    for token in tokens:
        if token != "-":
            yield from _one(token, suffixes, kinds)
            continue
        n = 0
        for line in stdin if stdin is not None else sys.stdin:
            path = line.rstrip("\r\n")
            if not path.strip():
                continue
            n += 1
            if os.path.isdir(path):
                yield from _one(path, suffixes, kinds)
            else:
                yield path
        if n == 0:
            yield _error("-", "-: standard input gave no paths (one path a line)")


def _attempt(prepare: Callable[[str], Any], path: str):
    try:
        return prepare(path), None
    except UsageError as exc:
        return None, str(exc)
    except Exception as exc:  # one bad input never costs the others their prediction
        return None, f"{path}: cannot use this input ({type(exc).__name__}: {exc})"


_END = object()


def stream(items: Iterable[str | dict], prepare: Callable[[str], Any],
           finish: Callable[[list[str], list[Any]], list[dict]], batch_size: int,
           ahead: int = 2, workers: int | None = None, wait: float = 0.05) -> Iterator[dict]:
    """Rows for every item in order, one batch at a time.

    A feeder thread reads the items (a directory walk, stdin) and hands each path to a thread
    pool for `prepare(path)` (decode + per-image preprocessing; a `UsageError` names a bad
    file), at most `ahead` batches ahead of the model, so memory stays flat. `finish(paths,
    prepared)` runs the model on a batch and returns one row per path. A batch is cut short
    when no new input came for `wait` seconds (a slow stdin), so rows never wait for inputs
    that have not been given yet. Error rows from `expand` pass through at their place.
    """
    queue: Queue = Queue(maxsize=(ahead + 1) * batch_size)
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 2) as pool:
        stop = threading.Event()

        def feed():
            try:
                for x in items:
                    entry = (x, None) if isinstance(x, dict) else (x, pool.submit(_attempt, prepare, x))
                    while not stop.is_set():
                        try:
                            queue.put(entry, timeout=0.1)
                            break
                        except Full:
                            continue
                    if stop.is_set():
                        return
                queue.put((_END, None))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                queue.put((_END, exc))

        feeder = threading.Thread(target=feed, name="dlcli-inputs", daemon=True)
        feeder.start()
        try:
            done = False
            while not done:
                chunk = []
                entry = queue.get()
                while True:
                    if entry[0] is _END:
                        if entry[1] is not None:
                            raise entry[1]
                        done = True
                        break
                    chunk.append(entry)
                    if len(chunk) >= batch_size:
                        break
                    try:
                        entry = queue.get(timeout=wait)
                    except Empty:
                        break
                if chunk:
                    yield from _rows(chunk, finish)
        finally:
            stop.set()
            for future in [e[1] for e in list(queue.queue) if e[1] is not None and hasattr(e[1], "cancel")]:
                future.cancel()


def _rows(chunk: list, finish) -> Iterator[dict]:
    done = [(x, None if future is None else future.result()) for x, future in chunk]
    good = [(x, result[0]) for x, result in done if result is not None and result[1] is None]
    rows = iter(finish([x for x, _ in good], [p for _, p in good]) if good else [])
    for x, result in done:
        if result is None:
            yield x
        elif result[1] is not None:
            yield _error(x, result[1])
        else:
            yield next(rows)
