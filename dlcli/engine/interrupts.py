"""Stop training cleanly on SIGINT or SIGTERM: finish the current step, save, exit.

Batch schedulers send SIGTERM before they kill a job; people press Ctrl-C. Either way
the training loop sees `stop.requested` after the step it is in, writes a checkpoint
and raises `Interrupted`, whose message says how to resume.

Example:
    with StopOnSignal() as stop:
        for step in steps:
            train(step)
            if stop.requested:
                save()
                raise Interrupted(stop.signal_name, "...")
"""

from __future__ import annotations

import signal
import threading

from dlcli.errors import DlcliError

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


class Interrupted(DlcliError):
    def __init__(self, signal_name: str, message: str):
        super().__init__(message)
        self.exit_code = EXIT_CODES.get(signal_name, 130)


class Terminated(KeyboardInterrupt):
    """SIGTERM where no training loop handles it (start-up, the final evaluation): it unwinds
    like Ctrl-C, through every `finally`, and the CLI exits 143 with one line."""

    exit_code = 143


def _terminate(signum, frame):
    raise Terminated("SIGTERM")


def stop_by_exception() -> None:
    """For the whole CLI process: Ctrl-C raises KeyboardInterrupt and SIGTERM `Terminated`,
    so a signal outside `StopOnSignal` still ends in a one-line message, never a silent -15."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _terminate)


class StopOnSignal:
    def __init__(self, signals=(signal.SIGINT, signal.SIGTERM)):
        self.signals = signals
        self.signal_name: str | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame):
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means: stop now
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
