"""One trainer per run folder: an exclusive lock on ``RUN_DIR/.lock``, held for the run's life.

`flock` locks belong to the open file: the OS releases them when the process exits, however it
dies (kill -9 included), so a stale lock never blocks a resume. The file records the holder's host
and pid so that a refused second trainer can say who holds the folder. (flock is advisory and, on
some network file systems, local to one node; slurm runs one job per run folder anyway.)
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path

from dpcap.errors import StorageError

LOCK_FILE = ".lock"


class RunLock:
    """``with RunLock(run_dir):`` or `acquire`/`release`; StorageError (exit 2) if another process holds it."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise StorageError(
                f"{self.path.parent} is in use by another trainer ({holder}); one trainer per run folder"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode())
        self._fd = fd
        return self

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file releases the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"host {holder['host']}, pid {holder['pid']}"
    except (ValueError, KeyError, OSError):
        return "holder unknown"
