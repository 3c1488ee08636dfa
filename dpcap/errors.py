"""Errors a user can act on.

`DpcapError` and its subclasses are the only exceptions the command line turns into a one-line
``error: …`` message; anything else is a bug and keeps its traceback.
"""

# Exit code of a run stopped at a step boundary by SIGTERM/SIGUSR1 before its last step: resumable
# (slurm templates requeue it), neither done (0) nor a user error (2) nor out of budget (3).
EXIT_STOPPED = 4


class DpcapError(Exception):
    """Something the user can fix: a bad config key, a missing shard, bad input (exit code 2)."""

    exit_code = 2


class ConfigError(DpcapError):
    """An unknown config key, a wrong type or an out-of-range value."""


class DataError(DpcapError):
    """Missing or unreadable data: no shards, a missing shard file, an empty source folder."""


class PrivacyError(DpcapError):
    """A model or setting the privacy engine cannot handle (e.g. an uncovered parameter)."""


class StorageError(DpcapError):
    """The run folder cannot be written: its disk is full, or another trainer holds it (exit code 2)."""


class BudgetExceededError(DpcapError):
    """The next step would cross the run's epsilon budget (exit code 3: never requeue)."""

    exit_code = 3
