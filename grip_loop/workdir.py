"""The output folder of `grip prepare` under faults.

* `OutputLock`: an exclusive `fcntl.flock` on `OUT/.lock`, held for the whole run. The kernel
  drops it when the process ends, however it ends (SIGKILL included), so a crashed run never
  leaves a stale lock behind. The holder writes its pid, host and start time into the file;
  a second run reads them for its error message (`OutputLocked`).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
import sys
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no file locks (OutputLock warns)
    fcntl = None

LOCK_NAME = ".lock"


class OutputLocked(RuntimeError):
    """Another process holds the output folder's lock."""


# ---------------------------------------------------------------------------------------
# the lock


def _holder_text(raw: bytes) -> str:
    try:
        h = json.loads(raw.decode("utf-8"))
        return f"pid {h['pid']} on host {h['host']}, running since {h['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


class OutputLock:
    """An exclusive lock on `folder` for the length of a run (see the module docstring).

    `acquire` never waits: if another process holds the lock it raises `OutputLocked` at once.
    On a filesystem without locks (some network mounts) it warns and goes on unlocked.
    """

    def __init__(self, folder: str | os.PathLike, what: str = "grip prepare") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            if fcntl is None:
                raise OSError(errno.ENOSYS, "no fcntl.flock on this platform")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_text(os.pread(fd, 4096, 0))
            os.close(fd)
            raise OutputLocked(
                f"{self.folder}: another {self.what} is already writing to this folder "
                f"(lock {self.path} held by {holder}). Wait for it to finish, or pass another --out"
            ) from None
        except OSError as exc:
            os.close(fd)
            print(
                f"warning: {self.path}: cannot lock ({exc.strerror}); this filesystem has no file locks, "
                f"so nothing stops a second {self.what} on {self.folder}: run only one at a time",
                file=sys.stderr,
            )
            return self
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "argv": sys.argv,
        }
        with contextlib.suppress(OSError):  # the record is a courtesy: the flock is the lock
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
