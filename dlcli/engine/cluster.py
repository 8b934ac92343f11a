"""Distribution strategies and cluster roles: everything `--set strategy=...` sets up.

`start` is what `dlcli train` calls before any other TensorFlow work: it makes the
strategy and, on a worker other than the chief, the private run directory that worker
writes (only the chief writes the real run; on --resume every worker reads the chief's
checkpoints). The roles come from TF_CONFIG; a multi-worker wait is bounded by
`ClusterWait`.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

from dlcli import config
from dlcli.errors import UsageError
from dlcli.engine.lazy import lazy_import
from dlcli.runs.run import Run

tf = lazy_import("tensorflow")


TF_CONFIG_SHAPE = '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": 0}}'


def read_tf_config() -> dict | None:
    """TF_CONFIG, checked whole before TensorFlow sees it (None where it is not set): each
    address host:port with a port 1-65535, the task's type among the cluster's roles and its
    index within that role's list. A `UsageError` says what is wrong."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return None

    def invalid(why: str) -> UsageError:
        return UsageError(f"TF_CONFIG is not valid: {why} (expected {TF_CONFIG_SHAPE})")

    try:
        tf_config = json.loads(raw)
    except (ValueError, RecursionError):
        raise invalid("not JSON") from None
    cluster, task = (tf_config.get("cluster"), tf_config.get("task")) if isinstance(tf_config, dict) else (None, None)
    if not isinstance(cluster, dict) or not cluster:
        raise invalid("no \"cluster\" mapping of roles to address lists")
    for role, addresses in cluster.items():
        if not isinstance(addresses, list) or not addresses:
            raise invalid(f"the cluster's {role!r} is not a list of addresses")
        for address in addresses:
            host, sep, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
            if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
                raise invalid(f"{role} address {address!r} is not host:port with a port 1-65535")
    if not isinstance(task, dict) or task.get("type") not in cluster:
        kind = task.get("type") if isinstance(task, dict) else None
        raise invalid(f"the task's type {kind!r} is none of the cluster's roles ({', '.join(map(str, cluster))})")
    index = task.get("index")
    if isinstance(index, str) and index.isdigit():
        index = int(index)
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(cluster[task["type"]]):
        raise invalid(f"the task's index {task.get('index')!r} is not one of {task['type']} 0-{len(cluster[task['type']]) - 1}")
    return {"cluster": cluster, "task": {"type": task["type"], "index": index}}


def cluster_task() -> tuple[str, int, bool]:
    """(task type, task index, whether the cluster has a chief) from TF_CONFIG."""
    tf_config = read_tf_config()
    if tf_config is None:
        return "chief", 0, True
    task = tf_config["task"]
    return task["type"], task["index"], "chief" in tf_config["cluster"]


def check_own_address(tf_config: dict) -> None:
    """Refuse at once, naming it, an address of this task that another process holds
    (TensorFlow would say only "Could not start gRPC server")."""
    import errno
    import socket

    task = tf_config["task"]
    address = tf_config["cluster"][task["type"]][task["index"]]
    host, _, port = address.rpartition(":")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: a closed port's TIME_WAIT is no obstacle
            probe.bind(("", int(port)))  # gRPC listens on every interface, on this port
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(f"{task['type']} {task['index']}'s address {address} (TF_CONFIG) is already in use "
                             f"by another process: stop it, or give this task a free port") from None


def is_chief() -> bool:
    """Only the chief writes checkpoints and logs: the "chief" task, else worker 0."""
    kind, index, has_chief = cluster_task()
    return kind == "chief" or (kind == "worker" and index == 0 and not has_chief)


def cpu_replicas() -> int:
    """DLCLI_CPU_REPLICAS=N: with `mirrored` and no GPU, mirror over N logical CPU devices."""
    raw = os.environ.get("DLCLI_CPU_REPLICAS", "").strip()
    if not raw:
        return 0
    if not raw.isdigit() or int(raw) < 1:
        raise UsageError(f"DLCLI_CPU_REPLICAS must be a positive whole number, got {raw!r}")
    return int(raw)


DEFAULT_WORKER_TIMEOUT = 600.0


def worker_timeout() -> float:
    """DLCLI_WORKER_TIMEOUT=SECONDS: how long a worker waits for the others to join (600)."""
    return config.env_seconds("DLCLI_WORKER_TIMEOUT", DEFAULT_WORKER_TIMEOUT)


class ClusterWait:
    """Bounds the wait for the other workers: from the strategy's creation to the end of the
    first training step (the first step every worker must take together). TensorFlow waits
    inside C++ code that holds the GIL, where neither a Python thread nor a signal handler
    runs, so a watchdog process does it: past the timeout it says what the worker waited
    for, on stderr, and kills the worker (exit status 137)."""

    current: "ClusterWait | None" = None

    def __init__(self, timeout: float, what: str):
        import subprocess
        import sys

        message = (f"error: waited {timeout:g} s for {what} and the cluster never took its first step together; "
                   "start every worker (the same --run, and on --resume a --runs-dir they all share), "
                   "or give them longer with DLCLI_WORKER_TIMEOUT=SECONDS")
        watchdog = ("import os, sys, time; time.sleep(float(sys.argv[2])); "
                    "sys.stderr.write(sys.argv[3] + '\\n'); sys.stderr.flush(); os.kill(int(sys.argv[1]), 9)")
        self.process = subprocess.Popen([sys.executable, "-c", watchdog, str(os.getpid()), str(timeout), message],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        ClusterWait.current = self

    @classmethod
    def joined(cls) -> None:
        if cls.current is not None:
            cls.current.process.kill()
            cls.current.process.wait()
            cls.current = None


def make_strategy(name: str, say: Callable[[str], None] | None = None):
    """The tf.distribute strategy for `--set strategy=...` (validated by the config);
    create it before any other TensorFlow work, as multi-worker training requires.
    Multi-worker: `say` is told what the worker waits for, and the wait is bounded."""
    if name == "mirrored":
        replicas = cpu_replicas()
        if replicas > 1 and not tf.config.list_physical_devices("GPU"):
            # No GPU: split the CPU into logical devices, one replica each (how multi-replica
            # code paths are tested on a machine without GPUs).
            cpu = tf.config.list_physical_devices("CPU")[0]
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
            return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)])
        return tf.distribute.MirroredStrategy()
    if name == "multi-worker":
        if not os.environ.get("TF_CONFIG"):
            raise UsageError("strategy multi-worker needs TF_CONFIG describing the cluster (see the README)")
        tf_config = read_tf_config()  # all of it checked, before any waiting
        kind, index = tf_config["task"]["type"], tf_config["task"]["index"]
        workers = tf_config["cluster"]
        others = [f"{role} {i} ({address})" for role, addresses in workers.items() for i, address in enumerate(addresses)
                  if (role, i) != (kind, index)]
        what = "the other workers of the cluster: " + ", ".join(others)
        timeout = worker_timeout()
        check_own_address(tf_config)
        if say is not None:
            say(f"{kind} {index}: waiting for {what} (at most {timeout:g} s, DLCLI_WORKER_TIMEOUT)")
        create = tf.distribute.MultiWorkerMirroredStrategy  # imports TensorFlow first: its time does not count
        ClusterWait(timeout, what)
        return create()  # waits here (and in the first step) for every worker
    return None


def strategy_scope(strategy):
    """Where models and optimizers are built: the strategy's scope, or nothing special."""
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def check_worker_sees_chief(root: Path, task: str, run_name: str | None, resume: bool) -> None:
    """On --resume, a worker other than the chief continues from the chief's run: refuse at
    once (before TensorFlow loads) when it cannot see it, which means no shared directory."""
    if not (resume and os.environ.get("TF_CONFIG") and run_name) or is_chief():
        return
    if not (Path(root) / task / run_name).is_dir():
        kind, index, _ = cluster_task()
        raise UsageError(
            f"{kind} {index} cannot see the chief's run {Path(root) / task / run_name}: on --resume every worker "
            "continues from the chief's checkpoints, so the workers need a --runs-dir they all share"
        )


def start(cfg: dict, root: Path, task: str, run_name: str | None, say: Callable[[str], None]):
    """(strategy, chief_run, worker_run) for a run's `strategy` key: (None, None, None) for
    `default`. A worker other than the chief gets the chief's run (to resume from) and a
    private temporary run to write, which the caller deletes at the end."""
    if cfg.get("strategy", "default") == "default":
        return None, None, None
    strategy = make_strategy(cfg["strategy"], say)  # before any other TensorFlow work
    if is_chief():
        return strategy, None, None
    if not run_name:
        raise UsageError("every worker of a multi-worker run needs the same --run NAME")
    chief_run = Run(task, Path(root) / task / run_name)
    worker_run = Run(task, Path(tempfile.mkdtemp(prefix=f"dlcli-{task}-worker-")))
    return strategy, chief_run, worker_run
