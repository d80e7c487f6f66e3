"""The output folder of `grip prepare` under faults: one run at a time, stage files written
atomically and checked before a resume trusts them, disk space checked and reserved before
large files are written.

* `OutputLock`: an exclusive `fcntl.flock` on `OUT/.lock`, held for the whole run. The kernel
  drops it when the process ends, however it ends (SIGKILL included), so a crashed run never
  leaves a stale lock behind. The holder writes its pid, host and start time into the file;
  a second run reads them for its error message (`OutputLocked`).
* `atomic_path` / `atomic_file`: write `NAME.tmp`, fsync it, rename it over NAME, fsync the
  folder. A reader sees the old file or the new one, never a part of one. A failed write
  removes the temporary file, and a full disk is reported as `DiskSpaceError`, which names the
  folder, the file and the bytes free.
* `read_json`, `npy_problem`: why a stage file cannot be trusted (empty, cut short, not
  JSON, another shape), or None when it can.
* `release_memory`: give the allocator's freed memory back to the system between stages.
* `require_space`, `reserve`: compare the bytes a file needs with `shutil.disk_usage`, then
  allocate its blocks (`os.posix_fallocate`) before it is memory-mapped. Storing into a page of
  a memory map whose block the filesystem cannot allocate is a SIGBUS, which kills the
  process without a message; a reserved file cannot run out of space.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import math
import os
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

try:
    import fcntl
except ImportError:  # not POSIX: no file locks (OutputLock warns)
    fcntl = None

LOCK_NAME = ".lock"


class OutputLocked(RuntimeError):
    """Another process holds the output folder's lock."""


class DiskSpaceError(OSError):
    """Not enough free space for a file; the message names the folder and the bytes."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


_LIBC = None


def release_memory() -> bool:
    """Hand the C allocator's free memory back to the system (glibc's `malloc_trim(0)`), after a
    stage or a unit of work that allocated a lot and freed it. Without it glibc keeps the freed
    pages of every thread's arena (the BPE's threads, numpy's temporaries, a part's Python
    strings) and the process's private memory only grows from stage to stage: +75 MB after
    encoding two parts of 10^5 documents, +9 MB with it (docs/benchmarks.md 7f). Returns whether
    anything was asked of the allocator (False where it is not glibc: a no-op)."""
    global _LIBC
    if _LIBC is None:
        _LIBC = False
        if sys.platform.startswith("linux"):
            import ctypes

            try:
                libc = ctypes.CDLL(None)
                _LIBC = libc if hasattr(libc, "malloc_trim") else False
            except OSError:
                pass
    if _LIBC is False:
        return False
    _LIBC.malloc_trim(0)
    return True


def human_bytes(n: float) -> str:
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "TiB":
            break
    return f"{n:.1f} {unit}"


def _bytes(n: int) -> str:
    return f"{human_bytes(n)} ({n} bytes)"


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


# ---------------------------------------------------------------------------------------
# atomic writes


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)


def disk_full(path: Path) -> DiskSpaceError:
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    have = f"{_bytes(free)} free" if free is not None else "free space unknown"
    return DiskSpaceError(
        f"{path.parent}: no space left on device while writing {path.name} ({have}); free some "
        "space (or pass another --out) and re-run: finished stages are kept"
    )


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path next to `path`; the caller writes it, then it is fsynced and
    renamed over `path`. On any error the temporary file is removed and `path` is untouched."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        full = isinstance(exc, OSError) and exc.errno == errno.ENOSPC and not isinstance(exc, DiskSpaceError)
        error = disk_full(path) if full else None  # the free space before the partial file goes
        with contextlib.suppress(OSError):
            tmp.unlink()
        if error is not None:
            raise error from exc
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", **open_kw) -> Iterator:
    """`open(path, mode)` written atomically (see `atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, mode, **open_kw) as fh:
        yield fh


def atomic_json(path: str | os.PathLike, obj) -> None:
    with atomic_file(path, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(obj, indent=1, sort_keys=True))


class _WriteOnly:
    """A file seen through `write` alone: numpy then writes in chunks with `write` (a full disk
    is an OSError with errno ENOSPC) instead of `ndarray.tofile` (an OSError without errno)."""

    def __init__(self, fh) -> None:
        self.write = fh.write


def atomic_npy(path: str | os.PathLike, arr: np.ndarray) -> None:
    with atomic_file(path) as fh:
        np.save(_WriteOnly(fh), arr)


def atomic_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    with atomic_file(path) as fh:
        np.savez(fh, **arrays)


def file_sha256(path: str | os.PathLike) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------
# checks before a resume trusts a file


def read_json(path: str | os.PathLike) -> tuple[dict | None, str | None]:
    """(the JSON object in `path`, None), or (None, why it cannot be read as one)."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return None, "missing"
    except OSError as exc:
        return None, f"unreadable ({exc.strerror})"
    if not raw.strip():
        return None, "empty"
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None, "not valid JSON (cut short or overwritten)"
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, found {type(obj).__name__}"
    return obj, None


def npy_problem(path: str | os.PathLike, shape: tuple | None = None, dtype=None) -> str | None:
    """Why the `.npy` file cannot be trusted, or None. Checks the header (format, dtype, shape;
    None in `shape` matches any length) and that the size on disk is what the header implies,
    so an empty or cut-short file (disk full, crash) is caught without reading the data."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    if size == 0:
        return "empty"
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                got_shape, _, got_dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                got_shape, _, got_dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                return f"unsupported .npy version {version}"
            offset = fh.tell()
    except (OSError, ValueError, EOFError, SyntaxError) as exc:
        return f"not a .npy file ({exc})"
    if got_dtype.hasobject:
        return "holds Python objects"
    if dtype is not None and got_dtype != np.dtype(dtype):
        return f"dtype {got_dtype}, expected {np.dtype(dtype)}"
    if shape is not None and (
        len(got_shape) != len(shape)
        or any(w is not None and g != w for g, w in zip(got_shape, shape, strict=True))
    ):
        return f"shape {got_shape}, expected {tuple('any' if w is None else w for w in shape)}"
    want = offset + math.prod(got_shape) * got_dtype.itemsize
    if size != want:
        return f"{size} bytes where its header implies {want} (cut short or overwritten)"
    return None


# ---------------------------------------------------------------------------------------
# free space


def _allocated(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512
    except (FileNotFoundError, AttributeError):
        return 0


def require_space(folder: str | os.PathLike, nbytes: int, what: str) -> None:
    """Raise `DiskSpaceError` unless `folder`'s filesystem has `nbytes` free."""
    folder = Path(folder)
    free = shutil.disk_usage(folder).free
    if nbytes > free:
        raise DiskSpaceError(
            f"{folder}: not enough disk space for {what}: needs {_bytes(nbytes)}, "
            f"{_bytes(free)} free. Free some space (or pass another --out) and re-run: finished "
            "stages are kept"
        )


def reserve(path: str | os.PathLike, nbytes: int, what: str) -> None:
    """Make sure every block of `path` (created if missing) up to `nbytes` is allocated, so
    that writing through a memory map cannot fail: check the free space first, then
    `posix_fallocate`. Where the filesystem cannot preallocate, the free-space check is all."""
    path = Path(path)
    require_space(path.parent, max(0, nbytes - _allocated(path)), what)
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, max(1, nbytes))
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            free = shutil.disk_usage(path.parent).free
            raise DiskSpaceError(
                f"{path.parent}: not enough disk space for {what}: needs {_bytes(nbytes)}, "
                f"{_bytes(free)} free. Free some space (or pass another --out) and re-run"
            ) from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        os.close(fd)


class Scratch:
    """Working arrays of one process as memory-mapped files in `folder` (see the module
    docstring). `empty` maps a new file (its blocks reserved: a full disk is a `DiskSpaceError`,
    not a SIGBUS); `path` names a new scratch file to write sequentially; `close` removes the
    folder, and its parent once empty (a map still open keeps its pages until it is dropped)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)

    def path(self, name: str) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / name
        path.unlink(missing_ok=True)  # a new file: a map of an older one stays valid
        return path

    def empty(self, name: str, shape, dtype) -> np.ndarray:
        shape = tuple(int(s) for s in np.atleast_1d(shape))
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        if nbytes == 0:  # an empty file cannot be mapped
            return np.empty(shape, dtype)
        path = self.path(f"{name}.bin")
        reserve(path, nbytes, f"the scratch array {name}")
        return np.memmap(path, dtype=dtype, mode="r+", shape=shape)

    def remove(self, name: str) -> None:
        """Remove the file of `empty(name, ...)`, if any (a map still open keeps its pages)."""
        (self.folder / f"{name}.bin").unlink(missing_ok=True)

    def full(self, name: str, shape, value, dtype) -> np.ndarray:
        a = self.empty(name, shape, dtype)
        a[...] = value
        return a

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        with contextlib.suppress(OSError):  # the parent too once every process removed its folder
            self.folder.parent.rmdir()
