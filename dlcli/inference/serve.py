"""`dlcli serve`: trained models kept warm behind an HTTP server that speaks TF Serving's REST format.

    POST /v1/models/TASK:predict   {"instances": [...], "options": {...}} -> {"predictions": [...]}
    GET  /v1/models/TASK           the run, the engine and the state of the task's model
    GET  /v2/health/live           200 while the process serves
    GET  /v2/health/ready          200 once every model is loaded, 503 before and while stopping

Each prediction is the row `dlcli predict --json` gives for one input, its `input` the
instance's index where the instance has no name of its own. An instance is what the task
reads: an image as `{"b64": "<base64 of the file's bytes>"}`, a point as `"0.5,-1.2"` or
`[0.5, -1.2]`, or, for a task that takes no inputs, its predict options (`{"n": 5}`), whose
rows come back together as `{"input": "0", "rows": [...]}`. A bad instance is a row with an
`error` and the others are still predicted; a request none of whose instances could be
predicted is answered 400. `options` are the task's predict options, checked as the CLI
checks them, and `seed` (predict's `--seed`).

The model: each task's run is opened once at start, and a task with a `Predictor` (rule 8 of
`dlcli.contract`) keeps it loaded (`dlcli.inference.lite.model_for`: the current export, else
the Keras model) and warm: every batch size it will run is run once before the server says it
is ready. Its images are decoded in the request's own thread, from the request's bytes
(`ImageBytes`, no temporary file), and one thread per task runs the model: it takes what the
requests have queued, up to the task's batch size, waiting at most `batch_wait` seconds for
requests already on their way, so concurrent clients share one model call. A task without a `Predictor` runs its own
`predict` for each batch in that thread.

Safe by default: it binds 127.0.0.1; bodies over `max_body` bytes are refused (413) unread;
images have predict's limits against decompression bombs; a client that sends nothing for
`timeout` seconds is disconnected, and a prediction that takes longer is answered 504; at
most `max_connections` clients at once (503 beyond). Every error is a JSON `{"error": ...}`
with a 4xx (or 5xx) status, never a traceback. `Server.stop` (SIGTERM, SIGINT in `serve`)
stops accepting, finishes the requests in flight and returns.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from queue import Empty, SimpleQueue
from typing import Any, Callable, Iterable

from dlcli.errors import DlcliError, UsageError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8500
MAX_BODY = 32 * 1024 * 1024
TIMEOUT_S = 30.0
BATCH_WAIT_S = 0.002
MAX_CONNECTIONS = 64
CONTEXTS_KEPT = 16  # distinct sets of request options, each with its context (and predictor)
_STOP = object()


class RequestError(Exception):
    """What a request got wrong: its HTTP status and one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _error_row(name: str, message: str) -> dict:
    return {"input": name, "error": message}


def _b64_image(instance: Any, name: str):
    """An image instance's bytes as an `ImageBytes` named `name`."""
    from dlcli.data.images import ImageBytes

    if not (isinstance(instance, dict) and set(instance) == {"b64"} and isinstance(instance["b64"], str)):
        raise UsageError(f'instance {name}: an image is {{"b64": "<base64 of the file\'s bytes>"}}, got {_brief(instance)}')
    try:
        data = base64.b64decode(instance["b64"], validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(f"instance {name}: its b64 is not base64") from None
    return ImageBytes(name, data)


def _brief(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _point(instance: Any, name: str) -> str:
    """A point instance (`"0.5,-1.2"` or `[0.5, -1.2]`) as the CLI's input string."""
    if isinstance(instance, str):
        return instance
    if isinstance(instance, list) and instance and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in instance):
        return ",".join(repr(v) for v in instance)
    raise UsageError(f"instance {name}: an input is a string or a list of numbers, got {_brief(instance)}")


class _Job:
    """One request's instances in the model thread's queue: filled in as their batches finish,
    by that thread alone; `wait` returns once all are (a held lock as the latch: cheaper than an
    Event, which is a condition and a lock)."""

    def __init__(self, n: int):
        self.rows: list = [None] * n
        self.left = n
        self.latch = threading.Lock()
        if n:
            self.latch.acquire()

    def put(self, slot: int, row: dict) -> None:
        self.rows[slot] = row
        self.left -= 1
        if self.left == 0:
            self.latch.release()

    def wait(self, timeout: float) -> bool:
        return self.latch.acquire(timeout=timeout)


class _Item:
    __slots__ = ("key", "run", "name", "x", "job", "slot")

    def __init__(self, key, run, name, x, job, slot):
        self.key, self.run, self.name, self.x, self.job, self.slot = key, run, name, x, job, slot


class ServedModel:
    """One task's run, loaded once, with the thread that runs its batches."""

    def __init__(self, task: str, *, run: str | None = None, runs_dir: str | Path | None = None,
                 engine: str = "auto", batch_wait: float = BATCH_WAIT_S, warm: bool = True):
        from dlcli import api
        from dlcli.tasks import get_task

        self.task, self.spec, self.batch_wait = task, get_task(task), batch_wait
        self.engine_asked, self.warm = engine, warm
        self.base = api.predict_context(task, run=run, runs_dir=runs_dir, engine=engine)
        self.run = self.base.run
        self.batch_size = 256
        self.engine = "task predict"
        self.state = "LOADING"
        self.contexts: OrderedDict = OrderedDict()
        self.contexts_lock = threading.Lock()
        self.queue: SimpleQueue = SimpleQueue()
        self.arriving = 0  # requests read or decoded now, whose instances are not queued yet
        self.arriving_lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, name=f"dlcli-serve-{task}", daemon=True)
        self.calls = 0  # batches run (model calls), and the instances in them: written by its thread alone
        self.predicted = 0

    # -- loading ---------------------------------------------------------------------------

    def load(self) -> None:
        """Load the model (and, with `warm`, run each batch size it will run once)."""
        ctx, predictor = self._context({})
        if predictor is not None:
            self.batch_size = predictor.batch_size
            self.engine = getattr(ctx, "engine", None) or "keras"
            if self.warm:
                self._warm_up(predictor)
        self.thread.start()
        self.state = "AVAILABLE"

    def _warm_up(self, predictor) -> None:
        """Run the powers of two up to the batch size (and the batch size) on a made-up image,
        so no request pays the model's first call or a trace of a new batch shape."""
        import io

        import numpy as np
        from PIL import Image

        from dlcli.data.images import ImageBytes

        buffer = io.BytesIO()
        pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, format="PNG")
        try:
            x = predictor.prepare(ImageBytes("warm-up", buffer.getvalue()))
        except DlcliError:
            return  # the task reads other images: the first requests warm it instead
        sizes = sorted({min(2 ** i, self.batch_size) for i in range(int(math.log2(self.batch_size)) + 2)})
        for n in sizes:
            predictor.finish([f"warm-up {i}" for i in range(n)], [x] * n)

    def _context(self, options: dict):
        """(context, predictor or None) for a request's options, made once per set of options."""
        from dlcli import api

        key = json.dumps(options, sort_keys=True)
        with self.contexts_lock:
            if key in self.contexts:
                self.contexts.move_to_end(key)
                return self.contexts[key]
        options = dict(options)
        seed = options.pop("seed", None)  # predict's --seed, for the tasks that sample
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise UsageError(f"seed must be an integer; got {_brief(seed)}")
        ctx = api.predict_context(self.task, run=self.run, engine=self.engine_asked, seed=seed, **options)
        predictor = self.spec.predictor(ctx) if self.spec.predictor is not None else None
        with self.contexts_lock:
            self.contexts[key] = (ctx, predictor)
            while len(self.contexts) > CONTEXTS_KEPT:
                self.contexts.popitem(last=False)
        return ctx, predictor

    def status(self) -> dict:
        return {"model_version_status": [{
            "version": self.run.name, "state": self.state,
            "status": {"error_code": "OK", "error_message": ""}}],
            "task": self.task, "run": self.run.name, "run_dir": str(self.run.dir), "engine": self.engine,
            "batch_size": self.batch_size, "batches": self.calls, "predicted": self.predicted}

    # -- a request --------------------------------------------------------------------------

    def arrive(self, delta: int) -> None:
        """A request starts (+1) or stops (-1) being on its way to the queue: while one is, a batch
        waits for it (at most `batch_wait`); while none is, it waits for nobody."""
        with self.arriving_lock:
            self.arriving += delta

    def predict(self, instances: list, options: dict, timeout: float) -> list[dict]:
        """One row per instance (errors as rows); UsageError where the options are wrong. The
        caller has called `arrive(1)`; this calls `arrive(-1)` once the instances are queued."""
        try:
            job, items, job_rows = self._queue(instances, options)
        finally:
            self.arrive(-1)
        if not job.wait(timeout):
            raise RequestError(504, f"the prediction took longer than {timeout:g} s")
        for (i, _, _), row in zip(items, job.rows):
            job_rows[i] = row
        return job_rows

    def _queue(self, instances: list, options: dict):
        if not isinstance(options, dict):
            raise RequestError(400, f'"options" must be an object of predict options, got {_brief(options)}')
        job_rows: list = [None] * len(instances)
        items: list[tuple[int, Any, Any]] = []  # (index, key, what the model thread gets)
        ctx, predictor = self._context(options)
        key = ("inputs", json.dumps(options, sort_keys=True))  # a batch shares its options, and its kind
        for i, instance in enumerate(instances):
            name = str(i)
            try:
                if predictor is not None:
                    items.append((i, key, (name, predictor.prepare(_b64_image(instance, name)))))
                elif self.spec.inputs is not None:
                    items.append((i, key, (name, _b64_image(instance, name))))
                elif isinstance(instance, dict):
                    merged = {**options, **instance}
                    self._context(merged)  # its options checked here, so a bad one is this instance's error
                    items.append((i, ("options", json.dumps(merged, sort_keys=True)), (name, None)))
                else:
                    items.append((i, key, (name, _point(instance, name))))
            except DlcliError as exc:
                message = str(exc)  # a file's error names it first: here the instance
                job_rows[i] = _error_row(name, f"instance {message}" if message.startswith(f"{name}: ") else message)
            except Exception as exc:  # noqa: BLE001 - one bad instance never costs the others theirs
                job_rows[i] = _error_row(name, f"instance {name}: cannot use it ({type(exc).__name__}: {exc})")
        job = _Job(len(items))
        for slot, (i, item_key, (name, x)) in enumerate(items):
            run = predictor.finish if predictor is not None else None
            self.queue.put(_Item(item_key, run, name, x, job, slot))
        return job, items, job_rows

    # -- the model thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        waiting: deque = deque()  # items of another key than the batch being gathered
        while True:
            first = waiting.popleft() if waiting else self.queue.get()
            if first is _STOP:
                return
            batch, other = [first], deque()
            stop = False
            for item in list(waiting):
                if len(batch) < self.batch_size and item.key == first.key:
                    batch.append(item)
                else:
                    other.append(item)
            deadline = time.monotonic() + self.batch_wait
            while len(batch) < self.batch_size:
                try:
                    item = self.queue.get_nowait()
                except Empty:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not self.arriving:  # nobody on the way: run what is here
                        break
                    try:
                        item = self.queue.get(timeout=min(remaining, 0.0005))
                    except Empty:
                        continue
                if item is _STOP:
                    stop = True
                    break
                (batch if item.key == first.key else other).append(item)
            waiting = other
            self._run(batch)
            self.calls += 1
            self.predicted += len(batch)
            if stop:
                for item in waiting:
                    self._run([item])
                return

    def _run(self, batch: list[_Item]) -> None:
        try:
            rows = self._rows(batch)
        except DlcliError as exc:
            rows = [_error_row(item.name, str(exc)) for item in batch]
        except Exception as exc:  # noqa: BLE001 - the server answers, and keeps serving
            rows = [_error_row(item.name, f"the model failed ({type(exc).__name__}: {exc})") for item in batch]
        for item, row in zip(batch, rows):
            item.job.put(item.slot, row)

    def _rows(self, batch: list[_Item]) -> list[dict]:
        if batch[0].run is not None:  # a Predictor's finish: one model call for the batch
            rows = list(batch[0].run([item.name for item in batch], [item.x for item in batch]))
        elif batch[0].x is None:  # a task without inputs: each instance is one predict of its options
            rows = []
            for item in batch:
                ctx, _ = self._context(json.loads(item.key[1]))
                rows.append({"input": item.name, "rows": list(self.spec.predict(ctx, []))})
        else:
            ctx, _ = self._context(json.loads(batch[0].key[1]))
            rows = list(self.spec.predict(ctx, [item.x for item in batch]))
        if len(rows) != len(batch):
            raise DlcliError(f"the task gave {len(rows)} rows for {len(batch)} inputs")
        return rows

    def stop(self) -> None:
        if self.thread.is_alive():
            self.queue.put(_STOP)
            self.thread.join()


# -- HTTP --------------------------------------------------------------------------------------


_DATE: list = [0, ""]  # (second, its HTTP date): formatted once a second, not once a response


def _http_date() -> str:
    now = int(time.time())
    if _DATE[0] != now:
        from email.utils import formatdate

        _DATE[:] = [now, formatdate(now, usegmt=True)]
    return _DATE[1]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client's requests share one connection
    server_version = "dlcli"
    error_content_type = "application/json"
    server: "_HTTPServer"

    def setup(self) -> None:
        self.timeout = self.server.owner.timeout
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # an answer is one write: send it now

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet: no line per request
        pass

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (a malformed request line, too long headers) as JSON."""
        self.close_connection = True
        self._reply(code, {"error": message or self.responses.get(code, ("error",))[0]})

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        phrase = self.responses.get(status, ("",))[0]
        head = (f"HTTP/1.1 {status} {phrase}\r\nServer: {self.server_version}\r\nDate: {_http_date()}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                + ("Connection: close\r\n" if self.close_connection else "") + "\r\n")
        try:
            self.wfile.write(head.encode("latin-1") + data)  # one write: no wait for the client's ack between parts
        except OSError:  # the client went away: nothing to tell it
            self.close_connection = True

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        owner = self.server.owner
        if not owner.enter():
            self.close_connection = True
            self._reply(503, {"error": "the server is stopping"})
            return
        try:  # in flight until its answer is written: `Server.stop` waits for it
            try:
                status, body = self._route(method, owner)
            except RequestError as exc:
                status, body = exc.status, {"error": str(exc)}
            except DlcliError as exc:
                status, body = 400, {"error": str(exc)}
            except (ConnectionError, TimeoutError, socket.timeout):
                self.close_connection = True
                return
            except Exception as exc:  # noqa: BLE001 - one line, never a traceback
                status, body = 500, {"error": f"internal error ({type(exc).__name__}: {exc})"}
            if status in (411, 413, 500, 503) or owner.draining:  # the body unread, trouble, or stopping
                self.close_connection = True
            self._reply(status, body)
        finally:
            owner.leave()
        if status in (411, 413):
            self._linger()

    def _linger(self, seconds: float = 1.0, most: int = 64 * 1024 * 1024) -> None:
        """After refusing a body unread: stop sending, and read (and drop) what the client still
        sends for a moment, so that closing does not reset the connection before the client has
        read the answer."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(seconds)
            deadline, read = time.monotonic() + seconds, 0
            while read < most and time.monotonic() < deadline:
                chunk = self.connection.recv(65536)
                if not chunk:
                    break
                read += len(chunk)
        except OSError:
            pass

    def _route(self, method: str, owner: "Server") -> tuple[int, dict]:
        path = self.path.split("?", 1)[0]
        if path in ("/v2/health/live", "/v2/health/ready"):
            if method != "GET":
                raise RequestError(405, f"{path} takes GET")
            if path.endswith("live"):
                return 200, {"live": True}
            ready = owner.ready()
            return (200 if ready else 503), {"ready": ready}
        if not path.startswith("/v1/models/"):
            raise RequestError(404, f"no such route: {path} (try /v1/models/TASK:predict)")
        rest = path[len("/v1/models/"):]
        name, _, verb = rest.partition(":")
        if "/versions/" in name:  # TF Serving's /v1/models/NAME/versions/V: the version is the run
            name, _, version = name.partition("/versions/")
            model = owner.model(name)
            if version != model.run.name:
                raise RequestError(404, f"model {name} serves run {model.run.name}, not {version}")
        model = owner.model(name)
        if verb == "":
            if method != "GET":
                raise RequestError(405, f"{path} takes GET")
            return 200, model.status()
        if verb != "predict":
            raise RequestError(404, f"no such route: {path} (the verb is :predict)")
        if method != "POST":
            raise RequestError(405, f"{path} takes POST")
        if model.state != "AVAILABLE":
            raise RequestError(503, f"model {name} is {model.state.lower()}")
        model.arrive(1)
        try:
            request = self._json_body(owner)
            instances, options = self._instances(request)
        except BaseException:
            model.arrive(-1)
            raise
        rows = model.predict(instances, options, owner.timeout)
        failed = [row for row in rows if "error" in row]
        if len(failed) == len(rows):
            return 400, {"error": failed[0]["error"], "predictions": rows}
        return 200, {"predictions": rows}

    @staticmethod
    def _instances(request: Any) -> tuple[list, Any]:
        if not isinstance(request, dict) or "instances" not in request:
            raise RequestError(400, 'the body must be a JSON object with "instances": [...]')
        unknown = sorted(set(request) - {"instances", "options", "signature_name"})
        if unknown:
            raise RequestError(400, f"unknown key {unknown[0]!r} in the body; it takes instances and options")
        instances = request["instances"]
        if not isinstance(instances, list):
            raise RequestError(400, f'"instances" must be a list, got {type(instances).__name__}')
        if not instances:
            raise RequestError(400, '"instances" is empty')
        return instances, request.get("options") or {}

    def _json_body(self, owner: "Server") -> Any:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise RequestError(411, "send the body with a Content-Length, not chunked")
        length = self.headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            raise RequestError(411, "the request needs a Content-Length")
        length = int(length)
        if length > owner.max_body:
            raise RequestError(413, f"the body is {length:,} bytes; the limit is {owner.max_body:,} (--max-body)")
        data = self.rfile.read(length)
        if len(data) < length:
            raise ConnectionError("the client closed the connection mid-body")
        try:
            return json.loads(data)
        except (ValueError, RecursionError):
            raise RequestError(400, "the body is not JSON") from None


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, owner: "Server"):
        self.owner = owner
        self.slots = threading.BoundedSemaphore(owner.max_connections)
        super().__init__(address, _Handler)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            try:
                body = json.dumps({"error": f"more than {self.owner.max_connections} clients at once"}).encode()
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request, client_address) -> None:
        """A connection that failed (reset, timed out): closed without a traceback."""


class Server:
    """The server: `start()` binds and loads the models, `stop()` drains and closes.

    Example (a test on an ephemeral port):
        >>> with Server(["linear"], runs_dir="runs", port=0) as server:
        ...     print(server.url)
        http://127.0.0.1:41523
    """

    def __init__(self, tasks: Iterable[str], *, run: str | None = None, runs_dir: str | Path | None = None,
                 host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, engine: str = "auto", max_body: int = MAX_BODY,
                 timeout: float = TIMEOUT_S, batch_wait: float = BATCH_WAIT_S, max_connections: int = MAX_CONNECTIONS,
                 warm: bool = True):
        tasks = list(tasks)
        if not tasks:
            raise UsageError("give the tasks to serve: `dlcli serve mnist [cnn ...]`")
        if len(set(tasks)) != len(tasks):
            raise UsageError(f"a task is named twice: {' '.join(tasks)}")
        for name, value in (("--max-body", max_body), ("--timeout", timeout), ("--max-connections", max_connections)):
            if not value > 0:
                raise UsageError(f"{name} must be > 0; got {value}")
        if batch_wait < 0:
            raise UsageError(f"--batch-wait-ms must be >= 0; got {batch_wait * 1000:g}")
        self.host, self.port_asked = host, port
        self.max_body, self.timeout, self.max_connections = max_body, timeout, max_connections
        self.models = {task: ServedModel(task, run=run, runs_dir=runs_dir, engine=engine, batch_wait=batch_wait,
                                         warm=warm) for task in tasks}
        self.httpd: _HTTPServer | None = None
        self.thread: threading.Thread | None = None
        self.in_flight = 0
        self.draining = False
        self.flight = threading.Condition()

    @property
    def port(self) -> int:
        return self.httpd.server_address[1] if self.httpd else self.port_asked

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def model(self, name: str) -> ServedModel:
        if name not in self.models:
            raise RequestError(404, f"no model {name!r} here; served: {', '.join(self.models)}")
        return self.models[name]

    def ready(self) -> bool:
        return not self.draining and all(m.state == "AVAILABLE" for m in self.models.values())

    def enter(self) -> bool:
        with self.flight:
            if self.draining:
                return False
            self.in_flight += 1
            return True

    def leave(self) -> None:
        with self.flight:
            self.in_flight -= 1
            self.flight.notify_all()

    def start(self) -> "Server":
        """Bind, serve (health answers at once; predict once its model is loaded), load the models."""
        import ipaddress

        family = socket.AF_INET
        try:
            if ipaddress.ip_address(self.host).version == 6:
                family = socket.AF_INET6
        except ValueError:
            pass
        _HTTPServer.address_family = family
        try:
            self.httpd = _HTTPServer((self.host, self.port_asked), self)
        except OSError as exc:
            raise UsageError(f"cannot listen on {self.host}:{self.port_asked} ({exc.strerror or exc})") from None
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                       name="dlcli-serve", daemon=True)
        self.thread.start()
        try:
            for model in self.models.values():
                model.load()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let the requests in flight finish (at most `grace` seconds, by default
        the request timeout), stop the model threads, close the socket."""
        with self.flight:
            self.draining = True
        if self.httpd is None:
            return
        self.httpd.shutdown()
        self.httpd.server_close()  # new clients are refused; those in flight keep their connections
        deadline = time.monotonic() + (self.timeout if grace is None else grace)
        with self.flight:
            while self.in_flight and time.monotonic() < deadline:
                self.flight.wait(max(0.0, deadline - time.monotonic()))
        for model in self.models.values():
            model.stop()
            model.state = "END"
        self.httpd = None

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(tasks: Iterable[str], *, run: str | None = None, runs_dir: str | Path | None = None,
          host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, say: Callable[[str], None] | None = None,
          **settings) -> int:
    """Serve until SIGTERM or SIGINT, then finish the requests in flight and return 0.

    `say` hears the lines worth printing (where it listens, a warning for another host than
    127.0.0.1); `settings` are `Server`'s (engine, max_body, timeout, batch_wait, ...)."""
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    server = Server(tasks, run=run, runs_dir=runs_dir, host=host, port=port, **settings)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        if host not in ("127.0.0.1", "localhost", "::1"):
            say(f"warning: listening on {host}, not only 127.0.0.1: other machines can reach these models "
                f"(there is no authentication)")
        for name, model in server.models.items():
            say(f"{name}: run {model.run.name} ({model.engine}) at {server.url}/v1/models/{name}:predict")
        say(f"serving on {server.url}")
        while not stop.wait(0.1):
            pass
        say("stopping: finishing the requests in flight")
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
