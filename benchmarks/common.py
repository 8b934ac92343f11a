"""Shared helpers of the benchmark suite: measured subprocesses, medians, machine facts, data.

Every figure is measured in a child process, so the runner itself never imports TensorFlow
and each child's peak resident set is its own (`os.wait4` returns one child's rusage;
`RUSAGE_CHILDREN` would be the maximum over all children waited for so far).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
PYTHON = sys.executable
DLCLI = str(Path(PYTHON).with_name("dlcli")) if Path(PYTHON).with_name("dlcli").exists() else None


def dlcli_cmd(*args: str) -> list[str]:
    """`dlcli ARGS` through the installed entry point (or `python -m dlcli`)."""
    return ([DLCLI] if DLCLI else [PYTHON, "-m", "dlcli"]) + list(args)


def child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("DLCLI_DEBUG", None)
    return env


class Result:
    def __init__(self, rc, wall, maxrss_mb, stdout, stderr, lines):
        self.rc, self.wall, self.maxrss_mb = rc, wall, maxrss_mb
        self.stdout, self.stderr = stdout, stderr
        self.lines = lines  # [(seconds since start, stderr line)]

    def json(self):
        return json.loads(self.stdout)

    def check(self, what: str) -> "Result":
        if self.rc != 0:
            tail = "\n".join((self.stderr or self.stdout).strip().splitlines()[-6:])
            raise RuntimeError(f"{what} failed (exit {self.rc}): {tail}")
        return self


def run_measured(cmd: list[str], timeout: float = 600, cwd: str | Path | None = None) -> Result:
    """Run `cmd`; wall time, this child's peak RSS (MB), output, and stderr lines time-stamped as they arrive."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env(), cwd=cwd or ROOT, bufsize=1)
    lines: list[tuple[float, str]] = []
    out_parts: list[str] = []

    def read_err():
        for line in proc.stderr:
            lines.append((time.perf_counter() - start, line.rstrip("\n")))

    def read_out():
        out_parts.append(proc.stdout.read())

    threads = [threading.Thread(target=read_err, daemon=True), threading.Thread(target=read_out, daemon=True)]
    for t in threads:
        t.start()
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    wall = time.perf_counter() - start
    for t in threads:
        t.join(5)
    proc.returncode = os.waitstatus_to_exitcode(status)
    rss = usage.ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)
    return Result(proc.returncode, wall, rss, "".join(out_parts), "\n".join(l for _, l in lines), lines)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Call each fn (-> seconds) `warmup` times, then `repeats` rounds in turn; name -> list of seconds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for r in range(repeats):
        names = list(fns) if r % 2 == 0 else list(reversed(fns))  # alternate the order
        for name in names:
            times[name].append(fns[name]())
    return times


def machine_facts() -> dict:
    facts = {"python": platform.python_version(), "platform": platform.platform(),
             "cpu_count": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}
    try:
        facts["load_average_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    try:
        from importlib.metadata import version

        facts["tensorflow"] = version("tensorflow")
        facts["keras"] = version("keras")
    except Exception:  # noqa: BLE001
        pass
    try:
        cpu = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name"))
        facts["cpu"] = cpu.split(":", 1)[1].strip()
    except Exception:  # noqa: BLE001
        pass
    return facts


def shared_data(option: str | None) -> Path | None:
    """The shared data folder: --data, else $DLCLI_SHARED_DATA; None where absent (data is then generated)."""
    value = option or os.environ.get("DLCLI_SHARED_DATA")
    if value and Path(value).expanduser().is_dir():
        return Path(value).expanduser().resolve()
    return None


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)
