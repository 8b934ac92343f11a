"""The two ways a command can fail, each with its exit code.

Everything the user can fix (a bad option, a missing file, a corrupt image) is a
`UsageError` (exit 2); a failure while doing the work (a full disk, no network,
a NaN loss) is a `RunError` (exit 1). The CLI prints either as one line. A task module
that breaks the task contract (dlcli/contract.py) is a `TaskError` (exit 1).
"""


class DlcliError(Exception):
    exit_code = 1


class UsageError(DlcliError):
    """Bad usage or bad input: the user can fix it and run again."""

    exit_code = 2


class RunError(DlcliError):
    """The command was right but the work failed."""

    exit_code = 1


class TaskError(DlcliError):
    """A task module breaks the task contract (dlcli/contract.py): a bug in the task."""

    exit_code = 1
