"""`dlcli serve`: a real server on 127.0.0.1 (an ephemeral port), started and stopped by each
test, answering what `dlcli predict --json` answers, batching concurrent requests, refusing
bad ones with a 4xx and keeping on serving, and draining on SIGTERM."""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dlcli
from dlcli.inference.serve import Server

from .conftest import Cli, digit_images, render_digit


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A runs folder with a tiny trained mnist run (exported) and a linear run."""
    folder = tmp_path_factory.mktemp("serve")
    x_train, y_train = digit_images(20, seed=1)
    x_test, y_test = digit_images(3, seed=2)
    data = folder / "digits.npz"
    np.savez(data, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    root = folder / "runs"
    dlcli.train("mnist", dataset=f"npz:{data}", epochs=1, batch_size=32, runs_dir=root, run="m", sets=["val_size=40"])
    dlcli.export("mnist", run="m", runs_dir=root)
    dlcli.train("linear", runs_dir=root, run="l", epochs=1)
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[Path]:
    """Digit files of several kinds: grey PNGs, an RGB JPEG, a dark-on-light PNG."""
    folder = tmp_path_factory.mktemp("digits")
    rng = np.random.default_rng(3)
    paths = []
    for i in range(6):
        path = folder / f"d{i}.png"
        Image.fromarray(render_digit(i, rng, size=28 + 4 * i)).save(path)
        paths.append(path)
    Image.fromarray(render_digit(7, rng)).convert("RGB").save(folder / "seven.jpg", quality=95)
    Image.fromarray(255 - render_digit(3, rng)).save(folder / "light.png")
    return paths + [folder / "seven.jpg", folder / "light.png"]


@pytest.fixture(scope="module")
def server(runs):
    with Server(["mnist", "linear"], runs_dir=runs, port=0, max_body=256 * 1024, timeout=2.0,
                batch_wait=0.02) as s:
        yield s


def b64(path_or_bytes) -> dict:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    return {"b64": base64.b64encode(data).decode()}


def request(server, method: str, path: str, body=None, raw: bytes | None = None, headers=None):
    """(status, the JSON answer) of one request on a new connection."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=20)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers=headers or {})
    response = conn.getresponse()
    answer = response.read()
    conn.close()
    assert response.getheader("Content-Type") == "application/json"
    return response.status, json.loads(answer)


def predict(server, task: str, instances, **extra):
    return request(server, "POST", f"/v1/models/{task}:predict", {"instances": instances, **extra})


def without_input(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "input"} for row in rows]


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels (an IHDR and a little pixel data)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def good(server) -> None:
    """The server still answers a good request."""
    status, answer = predict(server, "linear", ["0.5,-1.2"])
    assert status == 200 and answer["predictions"][0]["input"] == "0.5,-1.2"


# -- answers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["auto", "keras"])
def test_predictions_equal_predict_json_for_the_same_files(runs, files, server, engine):
    cli = Cli(runs)
    expected = cli.json("predict", "mnist", *files, "--top-k", "3", "--engine", engine)
    if engine == "auto":
        status, answer = predict(server, "mnist", [b64(p) for p in files], options={"top_k": 3})
    else:
        with Server(["mnist"], runs_dir=runs, port=0, engine="keras") as keras_server:
            assert request(keras_server, "GET", "/v1/models/mnist")[1]["engine"] == "keras"
            status, answer = predict(keras_server, "mnist", [b64(p) for p in files], options={"top_k": 3})
    assert status == 200
    rows = answer["predictions"]
    assert [r["input"] for r in rows] == [str(i) for i in range(len(files))]
    assert without_input(rows) == without_input(expected)


def test_points_and_options_as_the_cli_takes_them(runs, server):
    expected = Cli(runs).json("predict", "linear", "0.5,-1.2", "3,3")
    status, answer = predict(server, "linear", ["0.5,-1.2", [3, 3], "nope", {"x": 1}])
    assert status == 200
    assert answer["predictions"][:2] == [expected[0], {**expected[1], "input": "3,3"}]
    assert "not a point" in answer["predictions"][2]["error"]
    assert "unknown option 'x'" in answer["predictions"][3]["error"]  # an object is predict options
    status, answer = predict(server, "mnist", [b64(png_header(8, 8))], options={"top_k": "three"})
    assert status == 400 and "top_k" in answer["error"] and "must be int" in answer["error"]
    status, answer = predict(server, "mnist", [b64(png_header(8, 8))], options={"colour": 1})
    assert status == 400 and "unknown option 'colour'" in answer["error"]


def test_concurrent_requests_each_get_their_own_answer_from_shared_model_calls(runs, files, server):
    expected = without_input(Cli(runs).json("predict", "mnist", *files))
    n = 24
    start, answers = threading.Barrier(n), [None] * n

    def client(i):
        start.wait()
        answers[i] = predict(server, "mnist", [b64(files[i % len(files)])])

    model = server.models["mnist"]
    calls_before = model.calls
    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (status, answer) in enumerate(answers):
        assert status == 200 and without_input(answer["predictions"]) == [expected[i % len(files)]], i
    assert model.calls - calls_before < n  # requests that arrived together shared a model call
    assert request(server, "GET", "/v1/models/mnist")[1]["batches"] == model.calls


def test_status_and_health(runs, server):
    status, answer = request(server, "GET", "/v1/models/mnist")
    assert status == 200 and answer["run"] == "m" and answer["engine"] == "lite"
    assert answer["model_version_status"][0]["state"] == "AVAILABLE" and answer["batch_size"] == 256
    assert request(server, "GET", "/v2/health/live") == (200, {"live": True})
    assert request(server, "GET", "/v2/health/ready") == (200, {"ready": True})
    assert request(server, "GET", "/v1/models/mnist/versions/m")[0] == 200
    assert request(server, "GET", "/v1/models/mnist/versions/other")[0] == 404


# -- bad requests ---------------------------------------------------------------------------------


BAD = {
    "not JSON": (dict(raw=b"{instances: nope"), 400, "not JSON"),
    "instances not a list": (dict(body={"instances": {"b64": ""}}), 400, "must be a list"),
    "no instances": (dict(body={"inputs": []}), 400, '"instances"'),
    "an instance that is not an image": (dict(body={"instances": ["digit.png"]}), 400, '{"b64"'),
    "a b64 that does not decode": (dict(body={"instances": [{"b64": "a*b"}]}), 400, "not base64"),
    "bytes that are not an image": (dict(body={"instances": [b64(b"GIF89a nonsense")]}), 400, "not an image"),
    "a huge-dimension PNG header": (dict(body={"instances": [b64(png_header(60000, 60000))]}), 400, "too large"),
    "a too-large body": (dict(raw=b"x" * (300 * 1024)), 413, "limit"),
    "an unknown task": (dict(body={"instances": [1]}, path="/v1/models/nope:predict"), 404, "no model 'nope'"),
    "an unknown route": (dict(body={"instances": [1]}, path="/v1/predict"), 404, "no such route"),
    "an unknown verb": (dict(body={"instances": [1]}, path="/v1/models/mnist:classify"), 404, ":predict"),
    "GET on predict": (dict(method="GET"), 405, "POST"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_request_gets_a_clear_4xx_and_the_server_keeps_serving(server, case):
    how, want_status, want_text = BAD[case]
    status, answer = request(server, how.get("method", "POST"), how.get("path", "/v1/models/mnist:predict"),
                             body=how.get("body"), raw=how.get("raw"))
    assert status == want_status and want_text in answer["error"], answer
    assert "Traceback" not in json.dumps(answer)
    good(server)


def test_one_bad_instance_costs_the_others_nothing(server, files):
    status, answer = predict(server, "mnist", [b64(files[0]), {"b64": "!!"}, b64(files[1])])
    assert status == 200
    rows = answer["predictions"]
    assert "digit" in rows[0] and "digit" in rows[2] and rows[1] == {"input": "1", "error": "instance 1: its b64 is not base64"}


def raw_connection(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return sock


def test_a_client_that_disconnects_or_stalls_is_dropped_while_others_are_served(server, files):
    head = b"POST /v1/models/mnist:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n"
    gone = raw_connection(server)
    gone.sendall(head + b'{"instances": [')
    gone.close()  # mid-body
    stalled = raw_connection(server)
    stalled.sendall(head + b'{"instances": [')
    started = time.monotonic()
    good(server)  # served while the stalled client holds its connection
    assert stalled.recv(1000) == b""  # closed by the server: its timeout is 2 s
    assert 1.5 < time.monotonic() - started < 10
    stalled.close()
    silent = raw_connection(server)  # connected, never a byte
    assert silent.recv(1000) == b""
    silent.close()
    good(server)


def test_keep_alive_serves_many_requests_on_one_connection(server, files):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    for path in files[:4]:
        conn.request("POST", "/v1/models/mnist:predict", body=json.dumps({"instances": [b64(path)]}))
        response = conn.getresponse()
        assert response.status == 200 and "digit" in json.loads(response.read())["predictions"][0]
    conn.close()


def test_other_hosts_only_on_request_and_bad_settings_refused(runs):
    with pytest.raises(dlcli.UsageError, match="--max-body"):
        Server(["linear"], runs_dir=runs, port=0, max_body=0)
    with pytest.raises(dlcli.UsageError, match="named twice"):
        Server(["linear", "linear"], runs_dir=runs, port=0)
    with Server(["linear"], runs_dir=runs, port=0) as s:
        assert s.httpd.server_address[0] == "127.0.0.1"


# -- stopping --------------------------------------------------------------------------------------


def _until_serving(proc) -> list[str]:
    """The lines a `dlcli serve` subprocess prints on stderr up to its "serving on URL"."""
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("serving on "):
            break
    return lines


def _refused_within(port: int, seconds: float) -> bool:
    """Whether connecting to `port` is refused before `seconds` pass (a connection that still
    gets in is closed at once, so it holds nothing up; one that the closing listener resets, with
    its handshake done but never accepted, is refused too)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        except (ConnectionRefusedError, ConnectionResetError):
            return True
        time.sleep(0.1)
    return False


def test_sigterm_finishes_the_request_in_flight_and_exits_0(runs, files):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dlcli", "serve", "mnist", "linear", "--runs-dir", str(runs),
                             "--port", "0"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        lines = _until_serving(proc)
        assert lines and lines[-1].startswith("serving on http://127.0.0.1:"), "".join(lines)
        assert not any("warning" in line for line in lines)
        port = int(lines[-1].strip().rsplit(":", 1)[1])
        body = json.dumps({"instances": [b64(files[0])]}).encode()
        head = f"POST /v1/models/mnist:predict HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()

        def answer_of(sock) -> bytes:
            answer = b""
            while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < int(
                    answer.split(b"Content-Length: ", 1)[1].split(b"\r\n", 1)[0]):
                chunk = sock.recv(65536)
                assert chunk, answer
                answer += chunk
            return answer

        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(head + body)  # a whole request first: the server has taken up the connection
        assert answer_of(sock).startswith(b"HTTP/1.1 200")
        sock.sendall(head + body[:10])
        time.sleep(0.3)  # the next request is in flight: its head read, its body on its way
        proc.send_signal(signal.SIGTERM)
        assert _refused_within(port, 20.0)  # no new connections once stopping (a busy machine takes a while)
        sock.sendall(body[10:])
        answer = answer_of(sock)
        assert answer.startswith(b"HTTP/1.1 200")
        assert "digit" in json.loads(answer.split(b"\r\n\r\n", 1)[1])["predictions"][0]
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


# -- the warm model and the contract ----------------------------------------------------------------


def test_a_second_predict_in_the_process_does_not_load_the_model_again(runs, files, monkeypatch):
    from dlcli.runs import checkpoints

    loads = []
    real = checkpoints.load_model
    monkeypatch.setattr(checkpoints, "load_model", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    first = list(dlcli.predict("mnist", [str(files[0])], run="m", runs_dir=runs, engine="keras"))
    second = list(dlcli.predict("mnist", [str(files[0])], run="m", runs_dir=runs, engine="keras"))
    assert first == second and len(loads) <= 1  # at most once (none where an earlier test loaded it)
    model = runs / "mnist" / "m" / "model.keras"
    stat = model.stat()
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # the file changed: loaded afresh
    try:
        list(dlcli.predict("mnist", [str(files[0])], run="m", runs_dir=runs, engine="keras"))
        assert loads and loads[-1] == model
    finally:
        os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the export stays current for the others


def test_a_predictor_needs_the_files_it_reads():
    from dlcli.contract import Predictor, check_spec
    from dlcli.errors import TaskError
    from dlcli.tasks import get_task

    spec = get_task("mnist")
    import dataclasses

    with pytest.raises(TaskError, match="predictor"):
        check_spec(dataclasses.replace(spec, inputs=None, predict_stream=None), "mnist")
    with pytest.raises(TaskError, match="predictor"):
        check_spec(dataclasses.replace(spec, predictor=Predictor(None, None, 1)), "mnist")


def test_the_command_refuses_an_unknown_task_and_warns_for_another_host(runs):
    result = Cli(runs)("serve", "nope", "--runs-dir", runs, expect=2)
    assert "unknown task 'nope'" in result.stderr
    result = Cli(runs)("serve", "mnist", "--runs-dir", runs / "empty", expect=2)
    assert "Traceback" not in result.stderr and result.stderr.startswith("error:")
    proc = subprocess.Popen([sys.executable, "-m", "dlcli", "serve", "linear", "--runs-dir", str(runs), "--port", "0",
                             "--host", "127.0.0.2"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        lines = _until_serving(proc)
        assert lines and lines[-1].startswith("serving on http://127.0.0.2:"), "".join(lines)
        assert any(line.startswith("warning: listening on 127.0.0.2") for line in lines), "".join(lines)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_task_without_inputs_takes_its_options_as_instances(tmp_path):
    from dlcli.tasks import names

    data = tmp_path / "names.txt"
    data.write_text("\n".join(names.census_names()[:200]) + "\n")
    root = tmp_path / "runs"
    dlcli.train("names", dataset=f"text:{data}", epochs=1, runs_dir=root, run="n", sets=["units=16", "samples=4"])
    expected = Cli(root).json("predict", "names", "--n", "3", "--prefix", "Al", "--seed", "2")
    with Server(["names"], runs_dir=root, port=0) as server:
        assert request(server, "GET", "/v1/models/names")[1]["engine"] == "task predict"
        status, answer = predict(server, "names", [{"n": 3, "prefix": "Al"}, {"n": 0}, {"colour": 1}],
                                 options={"seed": 2})
    assert status == 200
    first, bad_n, bad_option = answer["predictions"]
    assert first == {"input": "0", "rows": expected}
    assert "--n must be >= 1" in bad_n["error"] and "unknown option 'colour'" in bad_option["error"]


def test_inputs_and_options_in_one_request_are_predicted_apart(server):
    status, answer = predict(server, "linear", ["1,1", {}, [1, 1]])
    assert status == 200
    first, options, third = answer["predictions"]
    assert first["input"] == third["input"] == "1,1" and first["probability"] == third["probability"]
    assert "give points" in options["error"]  # {} is a predict of no inputs, as `dlcli predict linear` alone


def test_a_prediction_past_the_timeout_is_a_504_and_the_next_is_served(runs):
    import dataclasses

    with Server(["linear"], runs_dir=runs, port=0, timeout=0.3) as s:
        model = s.models["linear"]
        real = model.spec.predict
        model.spec = dataclasses.replace(model.spec, predict=lambda ctx, inputs: time.sleep(1.0) or real(ctx, inputs))
        status, answer = predict(s, "linear", ["1,1"])
        assert status == 504 and "longer than 0.3 s" in answer["error"]
        model.spec = dataclasses.replace(model.spec, predict=real)
        time.sleep(1.0)  # the slow batch ends; its answer goes nowhere
        good(s)
