"""The `dlcli` command line: a thin Typer layer over the library API (`dlcli.api`).

One module per command (`train`, `evaluate`, `predict`, `export`, `serve`, `visualize`, `tasks`), the
options they share in `options`, what they print in `output`, task options in `parsing`,
and the app itself in `app`. Importing it loads no TensorFlow.
"""

from dlcli.cli.app import app, main
from dlcli.cli.options import SET_EXAMPLE
from dlcli.cli import tasks, train, evaluate, predict, export, serve, visualize  # noqa: E402,F401  (each adds its command, in this order)

__all__ = ["app", "main", "SET_EXAMPLE"]
