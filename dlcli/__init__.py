"""dlcli: the "Introduction to Deep Learning" assignments as one command-line toolkit."""

__version__ = "0.1.0"


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
