"""Run directories: where a training run keeps everything it makes.

    checkpoints/<task>/<run>/
        config.yaml      the resolved configuration
        model.keras      the trained model (model.npz for NumPy tasks)
        history.csv      one row per completed epoch
        metrics.json     final metrics; its presence marks the run as finished
        backup/          per-epoch checkpoints that --resume continues from
        logs/            TensorBoard event files
        views/           pictures made by `dlcli visualize`

Every file is written atomically (`dlcli.runs.files`), so a crash or a full disk leaves
either the old complete file or the new complete one.
"""

from __future__ import annotations

import copy
import csv
import datetime as _dt
import fcntl
import io
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from dlcli.errors import RunError, UsageError
from dlcli.runs.files import (
    Snapshot, _describe_os_error, atomic_write_json, atomic_write_text, fault_point, fsync_file,
)

DEFAULT_ROOT = Path("checkpoints")
KEEP_BACKUPS = 2
MAX_NAME = 100  # run names: file names stay far below every file system's limit

class Run:
    """One training run of one task, on disk: `path` is its folder, `config` its resolved
    configuration and `metrics` its final metrics (empty until it has finished).

    Example:
        >>> run = Run("linear", Path("checkpoints/linear/20261202-101500"))
        >>> run.name, run.file("model.npz").name
        ('20261202-101500', 'model.npz')
    """

    def __init__(self, task: str, directory: Path):
        self.task = task
        self.dir = Path(directory)
        self._lock_fh = None
        self._metrics: dict | None = None
        self._config_read: tuple | None = None  # (config.yaml's stamp, its content)

    name = property(lambda self: self.dir.name)
    config_path = property(lambda self: self.file("config.yaml"))
    history_path = property(lambda self: self.file("history.csv"))
    metrics_path = property(lambda self: self.file("metrics.json"))
    backup_dir = property(lambda self: self.file("backup"))
    logs_dir = property(lambda self: self.file("logs"))
    views_dir = property(lambda self: self.file("views"))

    path = property(lambda self: self.dir)

    def file(self, name: str) -> Path:
        """A file or folder of the run by its name (`run.file("model.keras")`, "views/x.png"),
        refused (exit 2) where a symbolic link on the way leads outside the run: dlcli never
        reads, writes or deletes anything outside a run through a run's own names."""
        path = self.dir / name
        if not any(p.is_symlink() for p in (path, *path.parents[: len(Path(name).parts) - 1])):
            return path  # the common case, two or three lstat calls: no link at all
        inside = self.dir.resolve()
        target = path.resolve()
        if target != inside and inside not in target.parents:
            raise UsageError(f"{path} is a symbolic link that leads outside the run {self.dir} (to {target}); "
                             "remove the link (a run's files and folders stay inside it)")
        return path

    @property
    def config(self) -> dict:
        return self.read_config() if self.config_path.exists() else {}

    @property
    def metrics(self) -> dict:
        """The final metrics: what this process trained, else metrics.json (without its `task`
        key); {} while unfinished."""
        if self._metrics is not None:
            return self._metrics
        data = self.read_json("metrics.json", {}) if self.finished else {}
        return {k: v for k, v in data.items() if k != "task"} if isinstance(data, dict) else {}

    @metrics.setter
    def metrics(self, values: dict) -> None:
        self._metrics = dict(values)

    def __repr__(self) -> str:
        return f"Run(task={self.task!r}, path={str(self.dir)!r})"

    @property
    def finished(self) -> bool:
        return self.metrics_path.exists()

    # -- creating and finding -------------------------------------------------

    @classmethod
    def create(cls, root: Path, task: str, name: str | None = None) -> "Run":
        """A new run directory; without a name, a time stamp made unique by a suffix
        (-2, -3, ...) when runs start in the same second (mkdir decides, so no race)."""
        if name is None:
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            for i in range(1, 1000):
                directory = Path(root) / task / (stamp if i == 1 else f"{stamp}-{i}")
                try:
                    directory.mkdir(parents=True)
                except FileExistsError:
                    continue
                except OSError as exc:
                    raise RunError(_describe_os_error(exc, directory)) from None
                return cls(task, directory)
            raise RunError(f"cannot find a free run name for {stamp} in {Path(root) / task}; pass --run NAME")
        _check_name(name)
        directory = Path(root) / task / name
        if directory.exists() and any(directory.iterdir()):
            raise UsageError(
                f"run directory {directory} already exists; use --resume to continue it "
                "or --run NAME for a new run"
            )
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunError(_describe_os_error(exc, directory)) from None
        return cls(task, directory)

    @classmethod
    def find(cls, root: Path, task: str, name: str | None = None, finished: bool = True) -> "Run":
        """The named run, or the newest (finished) run of the task."""
        task_dir = Path(root) / task
        if name:
            _check_name(name)
            run = cls(task, task_dir / name)
            if not run.dir.is_dir():
                raise UsageError(f"no run {name!r} of task {task} in {task_dir}")
            if finished and not run.finished:
                owner = run.in_use_by()
                if owner is not None:
                    raise UsageError(f"run {run.dir} is still training ({owner}); wait until it finishes, "
                                     "or name a finished run with --run")
                raise UsageError(
                    f"run {run.dir} has not finished training; resume it with "
                    f"`dlcli train {task} --run {name} --resume`"
                )
            return run
        runs = [r for r in cls.all(root, task) if r.finished or not finished]
        if not runs:
            what = "finished run" if finished else "run"
            raise UsageError(
                f"no {what} of task {task} in {task_dir}; train one with `dlcli train {task}`"
            )
        return runs[-1]

    @classmethod
    def all(cls, root: Path, task: str) -> list["Run"]:
        """The task's runs, oldest first (by the time their directory last changed)."""
        task_dir = Path(root) / task
        if not task_dir.is_dir():
            return []
        runs = [cls(task, d) for d in task_dir.iterdir() if d.is_dir() and not d.name.startswith(".")]
        return sorted(runs, key=lambda r: (r._stamp(), r.name))

    def _stamp(self) -> float:
        marker = self.metrics_path if self.finished else self.dir
        return marker.stat().st_mtime

    # -- locking --------------------------------------------------------------

    def lock(self) -> "Run":
        """Refuse a second process on the same run directory; then remove the temporary
        files a killed process left (holding the lock, no one else is writing them)."""
        try:
            fh = open(self.file(".lock"), "a+")
        except OSError as exc:
            raise RunError(_describe_os_error(exc, self.dir / ".lock")) from None
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            owner = fh.read().strip() or "another process"
            fh.close()
            raise UsageError(f"run {self.dir} is in use by {owner}; wait for it or pick another --run")
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        self._lock_fh = fh
        self.remove_leftovers()
        return self

    def in_use_by(self) -> str | None:
        """Who holds the run's lock now ("pid 123": a training still running), or None."""
        try:
            fh = open(self.file(".lock"))
        except OSError:
            return None
        with fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return fh.read().strip() or "another process"
            fcntl.flock(fh, fcntl.LOCK_UN)
        return None

    def remove_leftovers(self) -> None:
        """Temporary files (`.NAME.tmp-PID`) and checkpoint directories a killed process left."""
        for folder in (self.dir, self.views_dir):
            for leftover in folder.glob(".*.tmp-*") if folder.is_dir() else ():
                shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        if self.backup_dir.is_dir():
            for leftover in self.backup_dir.glob(".*"):
                shutil.rmtree(leftover, ignore_errors=True)

    def unlock(self) -> None:
        if self._lock_fh:
            self._lock_fh.close()
            self._lock_fh = None

    # -- reading and writing ---------------------------------------------------

    def write_config(self, cfg: dict) -> None:
        atomic_write_text(self.config_path, yaml.safe_dump(cfg, sort_keys=False))

    def read_config(self) -> dict:
        """config.yaml, parsed once while the file stays the same (a command asks for it several
        times: to check the run's task, to resolve its config, for the task itself)."""
        try:
            st = os.stat(self.config_path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            stamp = None
        if stamp is not None and self._config_read is not None and self._config_read[0] == stamp:
            return copy.deepcopy(self._config_read[1])
        data = self._parse_config()
        if stamp is not None:
            self._config_read = (stamp, copy.deepcopy(data))
        return data

    def _parse_config(self) -> dict:
        try:
            data = yaml.safe_load(self.config_path.read_text())
        except (OSError, ValueError, yaml.YAMLError, RecursionError):  # ValueError: not text (UnicodeDecodeError)
            raise UsageError(f"{self.config_path} cannot be read as YAML (missing, damaged or nested too deeply)") from None
        if not isinstance(data, dict):
            raise UsageError(f"{self.config_path} is not a configuration (a mapping of keys to values)")
        return data

    def write_metrics(self, metrics: dict) -> None:
        atomic_write_json(self.metrics_path, {"task": self.task, **metrics})

    def read_json(self, name: str, default: Any = None) -> Any:
        """A JSON file saved with the run (classes, vocabulary); `default` where it is absent."""
        path = self.file(name)
        if not path.exists():
            if default is not None:
                return default
            raise UsageError(f"run {self.dir} has no {name}; was it trained by {self.task}?")
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError, RecursionError):
            raise UsageError(f"{path} is corrupt (not JSON)") from None

    def read_names(self, name: str, what: str, default: list | None = None) -> "Names":
        """A JSON list of names saved with the run (classes.json, vocab.json), checked: a list of
        strings, not empty; `default` where the file is absent."""
        names = self.read_json(name, default)
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise UsageError(f"{self.file(name)} is not a list of {what}")
        return Names(names, self.file(name) if self.file(name).exists() else None, what)

    def write_history(self, rows: Iterable[dict]) -> None:
        rows = list(rows)
        buf = io.StringIO()
        if rows:
            fields = list(dict.fromkeys(k for row in rows for k in row))
            writer = csv.DictWriter(buf, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        atomic_write_text(self.history_path, buf.getvalue())

    def read_history(self) -> list[dict]:
        """history.csv's rows (numbers; "" where an epoch has no value), checked: one number
        per column and row, no text."""
        if not self.history_path.exists():
            return []
        try:
            with open(self.history_path, newline="") as fh:
                table = list(csv.DictReader(fh))
        except (OSError, ValueError, csv.Error):  # ValueError: not text
            raise UsageError(f"{self.history_path} is corrupt (not a CSV table)") from None
        rows = [{k: _number(v) for k, v in row.items()} if None not in row and None not in row.values() else None
                for row in table]  # None: a row longer or shorter than the header
        for row in rows:
            if row is None or any(not isinstance(v, (int, float)) and v != "" for v in row.values()):
                raise UsageError(f"{self.history_path} is not a table of numbers, one row per epoch")
        return rows

    # -- per-epoch checkpoints for --resume ----------------------------------------------

    def complete_backups(self) -> list[Path]:
        """The complete checkpoint directories under backup/ (each with its state.json), oldest
        first.

        Names sort in training order: epoch-0003 (3 epochs done) < epoch-0003-step-000100
        (and 100 steps of the 4th) < epoch-0004.
        """
        if not self.backup_dir.is_dir():
            return []
        return sorted(d for d in self.backup_dir.glob("epoch-*") if (d / "state.json").exists())

    def latest_backup(self) -> Path | None:
        """The newest complete checkpoint directory under backup/, if any."""
        done = self.complete_backups()
        return done[-1] if done else None

    def refuse_if_done(self, epochs_done: int, epochs: int) -> None:
        """On --resume: refuse a run with no epoch left to train, except one that was stopped
        after its last checkpoint and before its final metrics (resuming finishes it)."""
        if epochs_done < epochs or (epochs_done == epochs and not self.finished):
            return
        raise UsageError(
            f"run {self.dir} has already done {epochs_done} epochs; pass --epochs N with N > {epochs_done} to train on"
        )

    def read_backup_state(self, backup: Path) -> dict:
        try:
            state = json.loads((backup / "state.json").read_text())
        except (OSError, ValueError, RecursionError):
            raise UsageError(f"checkpoint {backup} is corrupt (unreadable state.json)") from None
        if not (isinstance(state, dict) and isinstance(state.get("epochs_done", 0), int)
                and isinstance(state.get("steps_done", 0), int) and isinstance(state.get("history", []), list)):
            raise UsageError(f"checkpoint {backup} is corrupt (its state.json is not a checkpoint's state)")
        return state

    def save_backup(
        self,
        epochs_done: int,
        history: list[dict],
        files: dict[str, Callable[[Path], Any]],
        steps_done: int = 0,
        extra: dict | None = None,
    ) -> Path:
        """Write a checkpoint directory completely (each `files` writer, then state.json),
        then rename it into place, so a crash never leaves a torn checkpoint."""
        return self.take_backup(epochs_done, history, files, steps_done, extra).finish()

    def take_backup(
        self,
        epochs_done: int,
        history: list[dict],
        files: dict[str, Callable[[Path], Any]],
        steps_done: int = 0,
        extra: dict | None = None,
    ) -> "PendingBackup":
        """A checkpoint as of now, not yet in place: its state, the content of its `Snapshot`
        files, and its other files written into its temporary directory. `finish()` writes
        the rest and renames it into place, here or in a `BackupWriter`'s thread."""
        name = f"epoch-{epochs_done:04d}" + (f"-step-{steps_done:06d}" if steps_done else "")
        final = self.backup_dir / name
        tmp = self.backup_dir / f".{name}.tmp-{os.getpid()}"
        state = json.dumps({"epochs_done": epochs_done, "steps_done": steps_done, "history": history, **(extra or {})})
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for file_name, write in files.items():
                if not isinstance(write, Snapshot):
                    write(tmp / file_name)
                    fault_point("write", tmp / file_name)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RunError(_describe_os_error(exc, final) + "; the previous checkpoint is intact") from None
        return PendingBackup(self, final, tmp, files, state)

    def _finish_backup(self, pending: "PendingBackup") -> Path:
        final, tmp = pending.final, pending.tmp
        try:
            for file_name, write in pending.files.items():
                if isinstance(write, Snapshot):
                    write(tmp / file_name)
                    fault_point("write", tmp / file_name)
                fsync_file(tmp / file_name)
                fault_point("fsync", tmp / file_name)
            with open(tmp / "state.json", "w") as fh:
                fh.write(pending.state)
                fh.flush()
                fault_point("write", tmp / "state.json")
                os.fsync(fh.fileno())
            fault_point("fsync", tmp / "state.json")
            if final.exists():
                self._discard(final)
            os.replace(tmp, final)
            fault_point("rename", final)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RunError(_describe_os_error(exc, final) + "; the previous checkpoint is intact") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for older in sorted(self.backup_dir.glob("epoch-*"))[:-KEEP_BACKUPS]:
            self._discard(older)
        # Temporary and half-deleted directories a killed process left (the lock makes them stale).
        for leftover in self.backup_dir.glob(".*"):
            shutil.rmtree(leftover, ignore_errors=True)
        return final

    def _discard(self, checkpoint: Path) -> None:
        """Rename a checkpoint out of sight first, so a crash while deleting it leaves no
        visible half-deleted directory, only a hidden one that the next save removes."""
        trash = checkpoint.with_name(f".trash-{checkpoint.name}-{os.getpid()}")
        os.replace(checkpoint, trash)
        fault_point("rename", trash)
        shutil.rmtree(trash, ignore_errors=True)
        fault_point("delete", trash)

    def views_path(self, view: str, suffix: str = ".png") -> Path:
        try:
            self.views_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunError(_describe_os_error(exc, self.views_dir)) from None
        return self.file(f"views/{view}{suffix}")


class PendingBackup:
    """A checkpoint taken (`Run.take_backup`) and not yet in place."""

    def __init__(self, run: Run, final: Path, tmp: Path, files: dict, state: str):
        self.run, self.final, self.tmp, self.files, self.state = run, final, tmp, files, state

    def finish(self) -> Path:
        """Write its `Snapshot` files, fsync every file, write state.json, rename the directory
        into place, then remove older checkpoints and what a killed process left."""
        return self.run._finish_backup(self)


class BackupWriter:
    """Writes a run's checkpoints in a thread of its own while training goes on, one at a
    time: `save` takes a checkpoint as of now (`Run.take_backup`) and finishes it in the
    thread; `wait` returns once it is in place.

    The thread's failure (a full disk, a read-only file system: the same `RunError` a
    checkpoint written in place raises) comes out of the next `save`, `wait` or `check` in the
    training thread. Each checkpoint is taken only once the one before is in place, since
    finishing one removes the temporary directories it finds.
    """

    def __init__(self, run: Run):
        self.run = run
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._taken = time.monotonic()  # when the last checkpoint was taken (at first: when training began)

    def save(self, epochs_done: int, history: list[dict], files: dict, steps_done: int = 0,
             extra: dict | None = None, then: Callable[[], Any] | None = None) -> None:
        """`Run.save_backup` with everything after taking the checkpoint done in the thread,
        then `then` (history.csv, written after its checkpoint is in place)."""
        self.wait()
        pending = self.run.take_backup(epochs_done, history, files, steps_done, extra)
        self._taken = time.monotonic()

        def finish():
            try:
                pending.finish()
                if then is not None:
                    then()
            except BaseException as exc:  # handed to the training thread by wait()
                self._error = exc

        self._thread = threading.Thread(target=finish, name="dlcli-checkpoint")
        self._thread.start()

    def wait(self, raise_error: bool = True) -> None:
        """Return once the checkpoint in flight is in place (or has failed, and raise why)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None and raise_error:
            raise error

    def seconds_since_save(self) -> float:
        """Seconds since the last checkpoint was taken, or since this writer was made."""
        return time.monotonic() - self._taken

    def check(self) -> None:
        """Raise the failure of a checkpoint that has finished, without waiting for one that has not."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()


class Names(list):
    """A list of names read from a run's file, which knows the file (for a clear error)."""

    def __init__(self, names: list, source: Path | None, what: str):
        super().__init__(names)
        self.source, self.what = source, what

    def check_count(self, count: int) -> "Names":
        """Refuse a list that does not name each of the model's `count` outputs."""
        if len(self) != count:
            where = self.source or "the list"
            raise UsageError(f"{where} is not a list of {count} {self.what} (it has {len(self)}; the model "
                             f"has {count} outputs)")
        return self


def _number(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")  # not starting with '-' (an option) or '.' (hidden)


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name or "") or len(name) > MAX_NAME:
        shown = name if len(name or "") <= 40 else name[:40] + "..."
        raise UsageError(f"invalid run name {shown!r}: use up to {MAX_NAME} letters, digits, '-', '_' and '.', "
                         "starting with a letter, a digit or '_'")
