"""`dlcli serve TASK [TASK ...]`: trained models kept warm behind an HTTP server (TF Serving's REST format)."""

from __future__ import annotations

from typing import List

import typer
from typing_extensions import Annotated

from dlcli.cli.app import app
from dlcli.cli.options import DEFAULT_RUNS_DIR, RunsDirOpt, complete_task
from dlcli.cli.output import ERR, handle_errors
from dlcli.errors import UsageError
from dlcli.tasks import TASK_NAMES


@app.command("serve")
@handle_errors
def serve_command(
    task_names: Annotated[
        List[str],
        typer.Argument(help="Tasks to serve: " + ", ".join(TASK_NAMES) + ".", show_default=False, metavar="TASK...",
                       autocompletion=complete_task),
    ],
    run_name: Annotated[
        str, typer.Option("--run", help="Run to serve, of each task (default: each task's newest finished run).",
                          show_default=False)] = None,
    runs_dir: RunsDirOpt = DEFAULT_RUNS_DIR,
    host: Annotated[str, typer.Option("--host", help="Address to listen on; another than 127.0.0.1 lets other "
                                      "machines in (no authentication).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port (0: any free one, printed).")] = 8500,
    engine: Annotated[str, typer.Option("--engine", help="auto: the run's current export where predict would "
                                        "use it, else Keras; keras; lite.")] = "auto",
    max_body: Annotated[int, typer.Option("--max-body", help="Largest request body in bytes (413 beyond).")] = 32 * 1024 * 1024,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds a client may stay silent, and a "
                                           "prediction may take (504 beyond).")] = 30.0,
    batch_wait_ms: Annotated[float, typer.Option("--batch-wait-ms", help="How long a batch waits for more "
                                                 "requests to join it, at most.")] = 2.0,
    max_connections: Annotated[int, typer.Option("--max-connections", help="Clients connected at once (503 beyond).")] = 64,
) -> None:
    """Serve trained models over HTTP until SIGTERM or Ctrl-C: `POST /v1/models/TASK:predict`.

    The body is TF Serving's: {"instances": [{"b64": "<base64 of an image file>"}, ...]}, and
    the answer {"predictions": [...]}, each the row `dlcli predict --json` gives for one input.
    Each run is loaded once and kept warm; requests that arrive together share one model call.
    `GET /v1/models/TASK` says which run and engine serve it; `GET /v2/health/ready` is 200 once
    every model is loaded.
    """
    from dlcli.inference.serve import serve

    unknown = [t for t in task_names if t not in TASK_NAMES]
    if unknown:
        raise UsageError(f"unknown task {unknown[0]!r}; tasks: {', '.join(TASK_NAMES)}")
    serve(task_names, run=run_name, runs_dir=runs_dir, host=host, port=port, engine=engine, max_body=max_body,
          timeout=timeout, batch_wait=batch_wait_ms / 1000, max_connections=max_connections,
          say=lambda line: ERR.print(line, highlight=False, soft_wrap=True, markup=False))
