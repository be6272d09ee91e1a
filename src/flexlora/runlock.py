"""One writer per run folder: an exclusive advisory lock (``fcntl.flock``) held for the life of
a run, on ``RUN_DIR/.flexlora.lock``.

The lock belongs to the open file, so it disappears with the process that holds it: a run
killed with SIGKILL leaves no stale lock, only the (harmless) file. The holder writes its PID,
host and command line into the file, so a second process can say who holds it. The lock is
taken before anything in the folder is written or removed; `--overwrite` then clears the
folder's contents but keeps the lock file (deleting a held lock file would let a third process
lock a new file of the same name).
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
from pathlib import Path

from flexlora.config import ConfigError

LOCK_NAME = ".flexlora.lock"


class RunLock:
    """Exclusive lock on a run folder; ConfigError (one line: folder and holder) if taken."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._file = None

    def acquire(self, create: bool = True) -> RunLock:
        """Take the lock (creating the folder unless create=False: then a missing folder is a
        ConfigError); ConfigError naming the holder if another process has it."""
        if create:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        elif not self.run_dir.is_dir():
            raise ConfigError(f"run folder {self.run_dir} does not exist")
        f = open(self.path, "a+")  # never truncates: the holder's line stays readable
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read()
            f.close()
            raise self._in_use(holder) from None
        f.seek(0)
        f.truncate()
        prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
        if prog in ("cli.py", "__main__.py"):  # python -m flexlora.cli
            prog = "flexlora"
        command = " ".join([prog, *sys.argv[1:]])
        if len(command) > 160:
            command = command[:157] + "..."
        f.write(f"pid {os.getpid()} on {socket.gethostname()} ({command})\n")
        f.flush()
        self._file = f
        return self

    def check_free(self) -> None:
        """ConfigError naming the holder if another process holds the lock; changes nothing
        (no file is created, the lock file is not written)."""
        try:
            f = open(self.path)
        except FileNotFoundError:
            return
        with f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise self._in_use(f.read()) from None
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _in_use(self, holder: str) -> ConfigError:
        holder = holder.strip().replace("\n", " ") or "another process"
        return ConfigError(f"run folder {self.run_dir} is in use by {holder}; wait for it to end (or stop it) and try again")

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file releases the lock
            self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
