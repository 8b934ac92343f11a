"""What people see while a command works: rich bars on a terminal, plain lines elsewhere.

A `Reporter` is the one object tasks talk to. On a terminal it shows an epoch bar and a
batch bar with live loss and metrics, elapsed and remaining time; without a terminal (a
batch job, a pipe) it prints one line per epoch; with `--quiet` it prints nothing but
errors. With `--json` all of it goes to stderr, so stdout stays one JSON document.

Example:
    reporter = Reporter(Console(stderr=True))
    reporter.start(epochs=3)
    for epoch in range(3):
        reporter.start_epoch(epoch, steps=100)
        ...
        reporter.end_epoch(epoch, {"loss": 0.1})
    reporter.finish()
"""

from __future__ import annotations

import math
from typing import Mapping

from rich.console import Console
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Column
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from dlcli.engine.streams import printable


def format_logs(logs: Mapping[str, float]) -> str:
    parts = []
    for key, value in logs.items():
        if isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
        else:
            parts.append(f"{key} {value}")
    return "  ".join(parts)


class Reporter:
    def __init__(self, console: Console, quiet: bool = False, live: bool | None = None):
        self.console = console
        self.quiet = quiet
        self.live = (console.is_terminal if live is None else live) and not quiet
        self._progress: Progress | None = None
        self._status: Live | None = None
        self._epoch_task = None
        self._batch_task = None
        self._epochs = 0

    def info(self, message: str) -> None:
        if not self.quiet:
            self.console.print(printable(message, newlines=True), highlight=False)

    def warn(self, message: str) -> None:
        self.console.print(f"[yellow]warning:[/] {printable(message, newlines=True)}", highlight=False)

    def status(self, message: str) -> None:
        """A spinner with what is happening (loading data, building the model) until the bars start."""
        if not self.live:
            return
        if self._status is None:
            self._status = Live(Spinner("dots", text=message), console=self.console, transient=True,
                                refresh_per_second=12.5)
            self._status.start(refresh=True)  # at once, not a refresh later
        else:
            self._status.update(Spinner("dots", text=message), refresh=True)

    def _stop_status(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    # -- training progress --------------------------------------------------------

    def start(self, epochs: int, initial_epoch: int = 0) -> None:
        self._epochs = epochs
        self._stop_status()
        if not self.live:
            return
        # Fixed-width columns never shrink; only the metrics at the end are cut (with an
        # ellipsis) to the terminal's width. Each epoch's full metrics, validation included,
        # are printed as a line above the bars when the epoch ends.
        fixed = Column(no_wrap=True)
        narrow = self.console.width < 110
        self._progress = Progress(
            TextColumn("{task.description}", table_column=Column(no_wrap=True, min_width=9)),
            BarColumn(bar_width=12 if narrow else 24, table_column=fixed),
            MofNCompleteColumn(table_column=fixed),
            TimeElapsedColumn(table_column=fixed),
            TextColumn("<", table_column=fixed),
            TimeRemainingColumn(table_column=fixed),
            TextColumn("{task.fields[logs]}", table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
            console=self.console,
            transient=False,
            expand=True,
        )
        self._progress.start()
        self._epoch_task = self._progress.add_task(
            "epochs", total=epochs, completed=initial_epoch, logs=""
        )

    def start_epoch(self, epoch: int, steps: int | None) -> None:
        if not self._progress:
            return
        if self._batch_task is not None:
            self._progress.remove_task(self._batch_task)
        self._batch_task = self._progress.add_task(
            f"epoch {epoch + 1}", total=steps, logs=""
        )

    def batch(self, step: int, logs: Mapping[str, float] | None = None) -> None:
        if self._progress and self._batch_task is not None:
            self._progress.update(
                self._batch_task, completed=step + 1, logs=format_logs(logs or {})
            )

    def end_epoch(self, epoch: int, logs: Mapping[str, float]) -> None:
        if self.quiet:
            return
        line = f"epoch {epoch + 1}/{self._epochs}  {format_logs(logs)}"
        if self._progress:
            self._progress.update(self._epoch_task, completed=epoch + 1)
            self._progress.console.print(line, highlight=False, soft_wrap=True)  # above the bars
        else:
            self.console.print(line, highlight=False, soft_wrap=True)

    def finish(self) -> None:
        self._stop_status()
        if self._progress:
            self._progress.stop()
            self._progress = None
            self._batch_task = None

    # -- results ------------------------------------------------------------------

    def table(self, title: str, values: Mapping[str, object]) -> None:
        if self.quiet:
            return
        table = Table(title=title, show_header=True, header_style="bold")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key, value in values.items():
            if isinstance(value, float) and math.isfinite(value):
                shown = f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
            else:
                shown = str(value)
            table.add_row(key, shown)
        self.console.print(table)
