"""`predict` for batch jobs: many inputs named briefly, decoded ahead, results streamed.

`expand` turns the command line into paths lazily (files, directories searched
recursively, quoted globs, `-` for paths on stdin), so 100,000 files never sit in one
argument list or one Python list. `stream` decodes the next batches in threads (Pillow and
NumPy release the GIL) while the model runs on the current one, where the inputs are large
enough to gain from it, and yields each batch's rows in input order as soon as it is done,
so memory stays flat and `| head` answers at once.
Neither imports TensorFlow: the exported-model path (`dlcli.inference.lite`) runs without it.
"""

from __future__ import annotations

import glob
import os
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from queue import Empty, Full, Queue
from typing import Any, Callable, Iterable, Iterator

from dlcli.contract import IMAGE_SUFFIXES
from dlcli import config
from dlcli.errors import UsageError

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
    elif GLOB_CHARS & set(token) and not os.path.lexists(token):
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


class Inputs:
    """`expand`'s paths, read lazily; `live` where some come from stdin, and so may wait for
    input (`stream` then reads them in a thread of their own)."""

    def __init__(self, paths: Iterator[str | dict], live: bool):
        self.paths, self.live = paths, live

    def __iter__(self) -> Iterator[str | dict]:
        return self.paths


def expand(tokens: Iterable[str], suffixes: tuple[str, ...] = IMAGE_SUFFIXES, stdin=None) -> Inputs:
    """Paths to predict, lazily, in the order given; an error row {"input", "error"} for a token
    that yields nothing (an empty directory, a glob matching nothing, an empty stdin)."""
    tokens = list(tokens)
    return Inputs(_expanded(tokens, suffixes, stdin), live="-" in tokens)


def _expanded(tokens: list[str], suffixes: tuple[str, ...], stdin) -> Iterator[str | dict]:
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


READ_TIMEOUT_S = 60.0


def read_timeout() -> float:
    """DLCLI_READ_TIMEOUT=SECONDS: the longest one input may take to read and prepare (60)."""
    return config.env_seconds("DLCLI_READ_TIMEOUT", READ_TIMEOUT_S)


class ReadWatch:
    """Bounds the reading of each input: a file on a stalled file system (an NFS server gone,
    a FUSE mount hung) blocks its read inside the kernel, where no signal or thread can end
    it. A watchdog thread sees an input that has taken more than `timeout` seconds, says
    which on stderr and ends the process (exit 2); the rows of the batches before its own
    have been printed."""

    current: "ReadWatch | None" = None

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.reading: dict[int, tuple[str, float]] = {}  # thread -> (path, when its reading began)

    @classmethod
    def start(cls) -> "ReadWatch":
        """The process's watch (one thread), started at the first stream (again where the bound changed)."""
        timeout = read_timeout()
        if cls.current is None or cls.current.timeout != timeout:
            cls.current = cls(timeout)
            threading.Thread(target=cls.current._watch, name="dlcli-read-watch", daemon=True).start()
        return cls.current

    def _watch(self) -> None:
        while ReadWatch.current is self:
            time.sleep(min(0.5, self.timeout / 4))
            now = time.perf_counter()
            for path, started in list(self.reading.values()):
                if now - started > self.timeout:
                    self.give_up(path)

    def give_up(self, path: str) -> None:
        from dlcli.engine.streams import printable

        line = (f"error: {printable(path)}: reading it took more than {self.timeout:g} s (a stalled file system?); "
                f"stopped there (DLCLI_READ_TIMEOUT=SECONDS sets the bound)\n")
        try:
            os.write(2, line.encode("utf-8", "replace"))
        except OSError:
            pass
        os._exit(2)


def _attempt(prepare: Callable[[str], Any], path: str):
    """(prepared, None, seconds) or (None, the error's one line, seconds); the reading is
    watched (`ReadWatch`) while `stream` runs."""
    started = time.perf_counter()
    watch = ReadWatch.current
    if watch is not None:
        thread = threading.get_ident()
        watch.reading[thread] = (path, started)
    try:
        return prepare(path), None, time.perf_counter() - started
    except UsageError as exc:
        return None, str(exc), time.perf_counter() - started
    except Exception as exc:  # one bad input never costs the others their prediction
        return None, f"{path}: cannot use this input ({exc or 'no reason given'})", time.perf_counter() - started
    finally:
        if watch is not None:
            watch.reading.pop(thread, None)


class _Later:
    """An input prepared in the main thread when its batch is due, unless `send` handed it to
    the thread pool meanwhile (the same `result` as a future's)."""

    __slots__ = ("prepare", "path", "future")
    _sending = threading.Lock()  # the feeder and the main thread may both send one

    def __init__(self, prepare: Callable[[str], Any], path: str):
        self.prepare, self.path, self.future = prepare, path, None

    def send(self, pool: ThreadPoolExecutor) -> None:
        with self._sending:
            if self.future is None:
                self.future = pool.submit(_attempt, self.prepare, self.path)

    def result(self):
        return self.future.result() if self.future else _attempt(self.prepare, self.path)


_END = object()
THREADS_FROM_S = 50e-6  # an input that takes longer to prepare is worth a thread (see `stream`)


class _Entries:
    """The inputs waiting for their batch, at most `limit` ahead of the model: each (item,
    None) for an error row of `expand`, else (path, a future or a `_Later`). Pulled from the
    items in the main thread as batches are taken (no thread: a directory walk or a list of
    files never waits for anyone)."""

    def __init__(self, items: Iterable, make: Callable, limit: int):
        self.items, self.make, self.limit = iter(items), make, limit
        self.waiting: deque = deque()
        self.exhausted = False

    def fill(self) -> None:
        while not self.exhausted and len(self.waiting) < self.limit:
            x = next(self.items, _END)
            if x is _END:
                self.exhausted = True
            else:
                self.waiting.append(self.make(x))

    def take(self, n: int, wait: float) -> list:
        self.fill()
        chunk = [self.waiting.popleft() for _ in range(min(n, len(self.waiting)))]
        self.fill()  # the next batches, for the threads to prepare while this one runs
        return chunk

    def queued(self) -> list:
        return list(self.waiting)

    def close(self) -> None:
        pass


class _FedEntries(_Entries):
    """The same, read by a feeder thread, for items that wait for input (paths on a slow
    stdin): a batch is cut short when no new input came for `wait` seconds, so rows never
    wait for inputs that have not been given yet."""

    def __init__(self, items: Iterable, make: Callable, limit: int):
        super().__init__(items, make, limit)
        self.queue: Queue = Queue(maxsize=limit)
        self.stop = threading.Event()
        threading.Thread(target=self._feed, name="dlcli-inputs", daemon=True).start()

    def _feed(self) -> None:
        try:
            for x in self.items:
                entry = self.make(x)
                while not self.stop.is_set():
                    try:
                        self.queue.put(entry, timeout=0.1)
                        break
                    except Full:
                        continue
                if self.stop.is_set():
                    return
                if isinstance(entry[1], _Later) and self.make.in_threads:  # made before the switch
                    entry[1].send(self.make.pool)
            self.queue.put((_END, None))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            self.queue.put((_END, exc))

    def take(self, n: int, wait: float) -> list:
        chunk: list = []
        if self.exhausted:
            return chunk
        entry = self.queue.get()
        while True:
            if entry[0] is _END:
                if entry[1] is not None:
                    raise entry[1]
                self.exhausted = True
                return chunk
            chunk.append(entry)
            if len(chunk) >= n:
                return chunk
            try:
                entry = self.queue.get(timeout=wait)
            except Empty:
                return chunk

    def queued(self) -> list:
        with self.queue.mutex:
            return list(self.queue.queue)

    def close(self) -> None:
        self.stop.set()


class _MakeEntry:
    """An item's entry: prepared later in the main thread, or at once in the pool once
    `in_threads` is set."""

    def __init__(self, prepare: Callable[[str], Any], pool: ThreadPoolExecutor):
        self.prepare, self.pool, self.in_threads = prepare, pool, False

    def __call__(self, x):
        if isinstance(x, dict):
            return x, None
        return x, self.pool.submit(_attempt, self.prepare, x) if self.in_threads else _Later(self.prepare, x)


def stream_through(predictor: Callable[[Any], Any]) -> Callable[[Any, Iterable], Iterator[dict]]:
    """The `predict_stream` of a task that gives a `Predictor` (`predictor(ctx)`): `stream`
    over its `prepare` and `finish`, a batch of its size at a time."""

    def predict_stream(ctx, items: Iterable) -> Iterator[dict]:
        p = predictor(ctx)
        yield from stream(items, p.prepare, p.finish, p.batch_size)

    return predict_stream


def stream(items: Iterable[str | dict], prepare: Callable[[str], Any],
           finish: Callable[[list[str], list[Any]], list[dict]], batch_size: int,
           ahead: int = 2, workers: int | None = None, wait: float = 0.05,
           threads_from: float = THREADS_FROM_S) -> Iterator[dict]:
    """Rows for every item in order, one batch at a time.

    The items (paths, and error rows from `expand`, passed through at their place) are read
    at most `ahead` batches ahead of the model, so memory stays flat; in a feeder thread
    where they may wait for input (`expand`'s `live`: paths on stdin). Each path is
    prepared (`prepare(path)`: decode + per-image preprocessing; a `UsageError` names a bad
    file) either in a thread pool, decoding ahead while `finish(paths, prepared)` runs the
    model on the current batch, or in the main thread when its batch is due. Threads pay
    only where an input takes long enough: a 28x28 PNG decodes in 24 us, less than handing
    it between threads costs (2 cores, 1,000 MNIST files: 59 ms in the main thread, 75 ms
    with one decoding thread, 83-94 ms with two), while 32x32 JPEGs (125 us) and photos
    gain. So the first batch is prepared in the main thread, and the inputs after it (those
    queued too, while the model runs on the first batch) go to the threads once preparing one
    took `threads_from` seconds (the median).
    """
    ReadWatch.start()
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 2) as pool:
        make = _MakeEntry(prepare, pool)
        live = getattr(items, "live", not isinstance(items, (list, tuple)))  # an unknown iterator may wait
        entries = (_FedEntries if live else _Entries)(items, make, (ahead + 1) * batch_size)

        def decide(seconds: list[float]) -> None:
            """After a batch is prepared, before its model call: threads from now on?"""
            if not make.in_threads and seconds and sorted(seconds)[len(seconds) // 2] > threads_from:
                make.in_threads = True
                for _, later in entries.queued():  # and those queued already, while the model runs
                    if isinstance(later, _Later):
                        later.send(pool)
        try:
            while True:
                chunk = entries.take(batch_size, wait)
                if not chunk:
                    if entries.exhausted:
                        break
                    continue
                yield from _rows(chunk, finish, decide)
        finally:
            entries.close()
            for _, future in entries.queued():
                future = future.future if isinstance(future, _Later) else future
                if future is not None:
                    future.cancel()


def _rows(chunk: list, finish, prepared: Callable[[list[float]], None]) -> Iterator[dict]:
    """The chunk's rows in order; `prepared` hears, before `finish`, the seconds each input
    prepared in this thread took."""
    futures = [f.future if isinstance(f, _Later) else f for _, f in chunk]
    wait([f for f in futures if isinstance(f, Future)])  # one wake-up for the batch, not one a file
    done = [(x, None if future is None else future.result()) for x, future in chunk]
    prepared([result[2] for (_, future), (_, result) in zip(chunk, done) if isinstance(future, _Later) and not future.future])
    good = [(x, result[0]) for x, result in done if result is not None and result[1] is None]
    rows = iter(finish([x for x, _ in good], [p for _, p in good]) if good else [])
    for x, result in done:
        if result is None:
            yield x
        elif result[1] is not None:
            yield _error(x, result[1])
        else:
            yield next(rows)
