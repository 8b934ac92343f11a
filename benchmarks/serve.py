"""`dlcli serve` against in-memory `model.predict`: throughput, latency and memory over HTTP.

    python benchmarks/serve.py --data DIR                  # mnist and cnn, 8 and 32 clients, the load run
    python benchmarks/serve.py --data DIR --tasks mnist,cnn,finetune --json-out benchmarks/results/serve.json

DIR is the folder of the shared real data sets (default: $DLCLI_SHARED_DATA).

For each task a short run is trained on small real data (`--data`, else generated data of
the same shapes) and mnist's is exported (predict's default path for it); `dlcli serve` runs
as its own process on 127.0.0.1. Clients are threads in child processes of this script, each
with one keep-alive connection, sending one image a request (its file's bytes, base64) in a
closed loop, for a bounded number of requests and seconds. Figures:

- images/s of the server with 8 and 32 clients, beside `model.predict` on the same 1,000
  images already decoded and preprocessed in memory (`workers.py predict-ref`, with the
  task's test views (`tta`); the mean of a run before the server's and one after),
  and the ratio (target >= 0.9);
- p50 and p99 latency of one request at each of those concurrencies, and alone (1 client);
- the load run: 10,000 requests from 32 clients to mnist, the errors (target 0), and the
  server's RSS after 1,000 requests and at the end (flat).

`run.py` calls `main` as its `serve` part. Traffic goes only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import datasets  # noqa: E402
from benchmarks.common import BENCH, PYTHON, child_env, dlcli_cmd, median, run_measured, shared_data  # noqa: E402

TRAIN = {  # a short run of each task on small data: flags of `dlcli train`
    "mnist": lambda tmp, shared: ["--dataset", f"npz:{datasets.mnist_npz(tmp, shared, 10000, 2000)}", "--epochs", "1",
                                  "--set", "val_size=2000"],
    "cnn": lambda tmp, shared: ["--dataset", f"folder:{datasets.image_folder(tmp, 'cifar', shared / 'cifar10' if shared else None, 2256, 1000)}",
                                "--epochs", "1", "--set", "val_size=256"],
    "finetune": lambda tmp, shared: ["--dataset", f"folder:{datasets.image_folder(tmp, 'flowers', shared / 'flowers' if shared else None, 100, 100, size=256, splits=('train', 'val'))}",
                                     "--epochs", "2", "--set", "head_epochs=1", "--set", "weights=none"],
}
EXPORTED = ("mnist",)  # exported as predict's default path for the task (cnn's bfloat16 model predicts with Keras)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


# -- clients ---------------------------------------------------------------------------------


def _request_bytes(task: str, image: Path) -> bytes:
    body = json.dumps({"instances": [{"b64": base64.b64encode(image.read_bytes()).decode()}]}).encode()
    return (f"POST /v1/models/{task}:predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def _read_response(sock: socket.socket, buffer: bytearray) -> tuple[int, bytes]:
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buffer += chunk
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    status = int(head[9:12])
    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        rest += chunk
    buffer[:] = rest[length:]
    return status, rest[:length]


def client_main(args) -> None:
    """Child: `clients` threads, `requests` requests in all (at most `seconds`), one image each."""
    images = [Path(p) for p in Path(args.images).read_text().splitlines()]
    payloads = [_request_bytes(args.task, p) for p in images]
    counter = iter(range(args.requests))
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + args.seconds

    def one_client(k: int) -> None:
        sock = socket.create_connection(("127.0.0.1", args.port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffer = bytearray()
        mine = []
        while time.monotonic() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            t = time.perf_counter()
            try:
                sock.sendall(payloads[i % len(payloads)])
                status, body = _read_response(sock, buffer)
                if status != 200 or b'"error"' in body:
                    errors.append(f"{status} {body[:200]!r}")
            except OSError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                sock.close()
                sock, buffer = socket.create_connection(("127.0.0.1", args.port), timeout=30), bytearray()
            mine.append(time.perf_counter() - t)
        sock.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=one_client, args=(k,)) for k in range(args.clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    sys.stdout.write(json.dumps({"latencies": latencies, "errors": errors[:20], "error_count": len(errors),
                                 "wall": wall, "started": started}) + "\n")


def clients(task: str, port: int, images: Path, n_clients: int, requests: int, seconds: float, procs: int) -> dict:
    """`n_clients` clients over `procs` child processes; requests/s over the run and latencies."""
    procs = max(1, min(procs, n_clients))
    children = []
    for p in range(procs):
        share = n_clients // procs + (1 if p < n_clients % procs else 0)
        reqs = requests // procs + (1 if p < requests % procs else 0)
        children.append(subprocess.Popen(
            [PYTHON, str(BENCH / "serve.py"), "client", "--task", task, "--port", str(port), "--images", str(images),
             "--clients", str(share), "--requests", str(reqs), "--seconds", str(seconds)],
            stdout=subprocess.PIPE, env=child_env(), text=True))
    t = time.perf_counter()
    outs = [json.loads(c.communicate(timeout=seconds + 120)[0]) for c in children]
    wall = time.perf_counter() - t
    latencies = [x for o in outs for x in o["latencies"]]
    busy = max(o["wall"] for o in outs)  # the clients' own span: not their start-up
    return {"requests": len(latencies), "errors": sum(o["error_count"] for o in outs),
            "error_examples": [e for o in outs for e in o["errors"]][:5], "per_s": len(latencies) / busy,
            "p50_ms": 1000 * percentile(latencies, 0.5), "p99_ms": 1000 * percentile(latencies, 0.99),
            "wall": wall}


# -- the server ------------------------------------------------------------------------------


def model_stats(port: int, task: str) -> tuple[int, int]:
    """(model calls, instances predicted) so far, from the server's model status."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", f"/v1/models/{task}")
    status = json.loads(conn.getresponse().read())
    conn.close()
    return status["batches"], status["predicted"]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(tasks: list[str], runs: Path, batch_wait_ms: float | None) -> tuple[subprocess.Popen, int]:
    extra = ["--batch-wait-ms", str(batch_wait_ms)] if batch_wait_ms is not None else []
    proc = subprocess.Popen(dlcli_cmd("serve", *tasks, "--runs-dir", str(runs), "--port", "0", *extra),
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=child_env())
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("serving on "):
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # keep it drained
            return proc, int(line.strip().rsplit(":", 1)[1])
    raise RuntimeError("dlcli serve did not start:\n" + "".join(lines[-20:]))


def stop_server(proc: subprocess.Popen) -> int:
    proc.terminate()
    return proc.wait(timeout=60)


# -- the suite -------------------------------------------------------------------------------


def prepare(tasks: list[str], tmp: Path, shared: Path | None) -> dict:
    """task -> {"run": run folder, "images": a file listing 1,000 test images}."""
    runs = tmp / "runs"
    out = {}
    for task in tasks:
        log(f"serve: training a short {task} run")
        r = run_measured(dlcli_cmd("train", task, "--runs-dir", str(runs), "--run", "bench", "--quiet",
                                   *TRAIN[task](tmp, shared)), timeout=1200).check(f"train {task}")
        if task in EXPORTED:
            run_measured(dlcli_cmd("export", task, "--runs-dir", str(runs), "--run", "bench", "--quiet")).check(f"export {task}")
        if task == "mnist":
            paths = datasets.mnist_images(tmp, tmp / "mnist.npz", 1000)
        else:
            folder = tmp / ("cifar" if task == "cnn" else "flowers") / ("test" if task == "cnn" else "val")
            paths = datasets.flat_images(folder, 1000 if task == "cnn" else 200)
        listing = tmp / f"{task}-images.txt"
        listing.write_text("\n".join(paths))
        out[task] = {"runs": runs, "run_dir": runs / task / "bench", "images": listing, "train_s": r.wall}
    return out


def reference(task: str, info: dict) -> float:
    """In-memory `model.predict` images/s on the same images (the median of its repeats)."""
    ref = run_measured([PYTHON, str(BENCH / "workers.py"), "predict-ref", task, "--model",
                        str(info["run_dir"] / "model.keras"), "--images", str(info["images"]), "--repeats",
                        "2" if task == "finetune" else "5"], timeout=1200).check("predict-ref").json()
    return ref["images"] / median(ref["seconds"])


def main(argv: list[str] | None = None, rows: list | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="the shared real data sets (default: $DLCLI_SHARED_DATA)")
    p.add_argument("--tasks", default="mnist,cnn")
    p.add_argument("--clients", default="8,32")
    p.add_argument("--requests", type=int, default=3000, help="requests per throughput figure")
    p.add_argument("--load", type=int, default=10000, help="requests of the load run (mnist, 32 clients)")
    p.add_argument("--seconds", type=float, default=120, help="the most one client run may take")
    p.add_argument("--procs", type=int, default=2, help="client processes")
    p.add_argument("--batch-wait-ms", type=float, default=None)
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    shared = shared_data(args.data)
    tasks = [t for t in args.tasks.split(",") if t]
    rows = [] if rows is None else rows
    with tempfile.TemporaryDirectory(prefix="dlcli-serve-bench-") as tmp_name:
        tmp = Path(tmp_name)
        info = prepare(tasks, tmp, shared)
        refs = {task: reference(task, info[task]) for task in tasks}
        for task in tasks:
            log(f"serve: {task}: in-memory model.predict {refs[task]:.0f} img/s")
        proc, port = start_server(tasks, info[tasks[0]]["runs"], args.batch_wait_ms)
        try:
            for task in tasks:
                n = args.requests if task != "finetune" else max(100, args.requests // 20)
                clients(task, port, info[task]["images"], 8, min(n, 400), args.seconds, args.procs)  # warm-up
                alone = clients(task, port, info[task]["images"], 1, min(n, 300), args.seconds, 1)
                rows.append({"task": task, "clients": 1, **alone, "reference_per_s": refs[task]})
                log(f"  {task:9} 1 client: {alone['per_s']:.0f} req/s, p50 {alone['p50_ms']:.2f} ms, p99 {alone['p99_ms']:.2f} ms")
                measured = []
                for k in (int(c) for c in args.clients.split(",")):
                    calls, predicted = model_stats(port, task)
                    res = clients(task, port, info[task]["images"], k, n, args.seconds, args.procs)
                    calls_after, predicted_after = model_stats(port, task)
                    res["mean_batch"] = (predicted_after - predicted) / max(1, calls_after - calls)
                    measured.append((k, res))
                # the reference again, after the server's runs (the server idle): the machine's
                # drift between the two is in the figure, not in the ratio
                after = reference(task, info[task])
                log(f"  {task:9} in-memory model.predict before / after: {refs[task]:.0f} / {after:.0f} img/s")
                refs[task] = (refs[task] + after) / 2
                for k, res in measured:
                    rows.append({"task": task, "clients": k, **res, "reference_per_s": refs[task],
                                 "ratio": res["per_s"] / refs[task]})
                    log(f"  {task:9} {k:2} clients: {res['per_s']:.0f} img/s vs {refs[task]:.0f} in memory "
                        f"(ratio {res['per_s'] / refs[task]:.2f}), p50 {res['p50_ms']:.2f} ms, p99 {res['p99_ms']:.2f} ms, "
                        f"{res['errors']} errors, {res['mean_batch']:.1f} images a model call")
            if args.load and "mnist" in tasks:
                first = clients("mnist", port, info["mnist"]["images"], 32, 1000, args.seconds, args.procs)
                rss_1000 = rss_mb(proc.pid)
                rest = clients("mnist", port, info["mnist"]["images"], 32, args.load - 1000, args.seconds * 4, args.procs)
                rss_end = rss_mb(proc.pid)
                load = {"task": "mnist", "load_requests": first["requests"] + rest["requests"],
                        "errors": first["errors"] + rest["errors"], "error_examples": first["error_examples"] + rest["error_examples"],
                        "rss_mb_at_1000": rss_1000, "rss_mb_at_end": rss_end, "per_s": rest["per_s"],
                        "p50_ms": rest["p50_ms"], "p99_ms": rest["p99_ms"]}
                rows.append(load)
                log(f"  load: {load['load_requests']} requests from 32 clients, {load['errors']} errors, "
                    f"RSS {rss_1000:.0f} MB at 1,000 and {rss_end:.0f} MB at the end; {rest['per_s']:.0f} req/s")
        finally:
            code = stop_server(proc)
            log(f"serve: the server exited {code} on SIGTERM")
            rows.append({"server_exit_code": code})
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| task | clients | img/s | in-memory model.predict | ratio | p50 ms | p99 ms | errors |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "clients" in r:
            ratio = f"{r['ratio']:.2f}" if "ratio" in r else ""
            lines.append(f"| {r['task']} | {r['clients']} | {r['per_s']:,.0f} | {r['reference_per_s']:,.0f} | {ratio} | "
                         f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']} |")
    for r in rows:
        if "load_requests" in r:
            lines.append(f"\nload: {r['load_requests']:,} requests from 32 clients to mnist, {r['errors']} errors, "
                         f"{r['per_s']:,.0f} req/s; server RSS {r['rss_mb_at_1000']:.0f} MB after 1,000 requests, "
                         f"{r['rss_mb_at_end']:.0f} MB at the end")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        cp = argparse.ArgumentParser()
        cp.add_argument("what")
        for name, kind in (("--task", str), ("--port", int), ("--images", str), ("--clients", int),
                           ("--requests", int), ("--seconds", float)):
            cp.add_argument(name, type=kind, required=True)
        client_main(cp.parse_args())
    else:
        print(table(main()))
