"""dlcli: the "Introduction to Deep Learning" assignments as one command-line toolkit, and
a library with the same five operations.

    >>> import dlcli
    >>> run = dlcli.train("mnist", dataset="npz:digits.npz", epochs=2)
    >>> dlcli.evaluate("mnist", run=run)["test_accuracy"]
    >>> rows = list(dlcli.predict("mnist", ["digit.png"], run=run))
    >>> dlcli.export("mnist", run=run), dlcli.visualize("mnist-confusion", run=run)

Importing dlcli loads no TensorFlow: the operations (`dlcli.api`) load it when they work.
"""

__version__ = "0.1.0"

_API = ("train", "evaluate", "predict", "export", "visualize", "train_config", "open_run")
_TYPES = {"Run": "dlcli.runs.run", "Reporter": "dlcli.engine.progress", "UsageError": "dlcli.errors",
          "RunError": "dlcli.errors", "DlcliError": "dlcli.errors"}
__all__ = [*_API, *_TYPES, "__version__"]


def __getattr__(name: str):
    """The API on first use, so `import dlcli` stays light."""
    import importlib

    if name in _API:
        return getattr(importlib.import_module("dlcli.api"), name)
    if name in _TYPES:
        return getattr(importlib.import_module(_TYPES[name]), name)
    raise AttributeError(f"module 'dlcli' has no attribute {name!r}")


def _quiet_interrupt_at_start_up() -> None:
    """Ctrl-C or SIGTERM while the `dlcli` command starts up (its imports take a moment) ends
    with one line and exit 130 / 143, not a traceback; `cli.main` then installs the handlers
    of the running command. Nothing changes where dlcli is imported as a library."""
    import os
    import signal
    import sys

    if not sys.argv or os.path.basename(sys.argv[0]) not in ("dlcli", "-m"):
        return

    def stop(signum, frame):
        os.write(2, b"interrupted while starting; nothing was done\n")
        os._exit(128 + signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)


_quiet_interrupt_at_start_up()
