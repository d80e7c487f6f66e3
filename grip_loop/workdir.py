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
* `bounded_maps`, `trim_maps`: keep the resident pages of the process's shared file maps (the
  stage files and scratch arrays it reads and writes through `np.memmap`) within a budget.
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
import weakref
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


#: Resident bytes of shared file maps a process may gather (above what it held after its last
#: drop) before `trim_maps` drops them.
MAP_BUDGET = 64 << 20

#: MADV_DONTNEED on Linux (every architecture).
_MADV_DONTNEED = 4


class MappedPages:
    """Bound the pages of shared file maps resident in this process. `check()` reads
    `/proc/self/statm` (a few microseconds) and, once the process's resident shared pages have
    grown by more than `budget` bytes since the last drop, calls `madvise(MADV_DONTNEED)` on every
    shared mapping of a regular file (`/proc/self/maps`: a path, an inode, an `s` in the
    permissions; devices and `/dev/shm` are left alone).

    Why: a stage that streams a memory-mapped file (the (N, d) embeddings, 2.56 GB at 10^7
    documents) leaves every page it touched mapped, so the process's RSS, and its ru_maxrss,
    grows by the whole file although its private memory stays flat (docs/benchmarks.md 7g).
    Schedulers and OOM watchers that read RSS count those pages. Dropping them loses nothing: for
    a shared file map the page stays in the page cache (a dirty one keeps its dirty bit and is
    written back as usual; the mapping's data is the file's), and the next access maps it again
    (a minor fault). Private maps (shared libraries, copy-on-write maps) are never touched.

    Called from the thread that maps and unmaps (the stage's loop), never from a watcher thread:
    between reading `/proc/self/maps` and `madvise`, an address the same thread unmapped could
    be reused by an anonymous allocation, which MADV_DONTNEED would zero. A no-op off Linux or
    where libc has no `madvise`. `drops` counts the drops made."""

    def __init__(self, budget: int = MAP_BUDGET) -> None:
        self.budget, self.drops = int(budget), 0
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._madvise = None
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                madvise = ctypes.CDLL(None, use_errno=True).madvise
                madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                madvise.restype = ctypes.c_int
                self._madvise = madvise
            except (OSError, AttributeError):
                pass
        self.floor = self.shared() or 0

    def shared(self) -> int | None:
        """Resident shared pages of this process in bytes (file-backed and shmem: statm's third
        field), or None where there is no /proc."""
        try:
            fd = os.open("/proc/self/statm", os.O_RDONLY)
        except OSError:
            return None
        try:
            return int(os.read(fd, 256).split()[2]) * self._page
        except (OSError, IndexError, ValueError):
            return None
        finally:
            os.close(fd)

    def check(self) -> bool:
        """Drop the shared file maps' pages if they grew past the budget; returns whether it did."""
        if self._madvise is None:
            return False
        now = self.shared()
        if now is None:
            return False
        if now - self.floor <= self.budget:
            self.floor = min(self.floor, now)
            return False
        self.drop()
        self.floor = self.shared() or 0
        return True

    def drop(self) -> int:
        """`madvise(MADV_DONTNEED)` every shared mapping of a regular file now; returns how many
        mappings were advised (0 off Linux)."""
        if self._madvise is None:
            return 0
        try:
            with open("/proc/self/maps", "rb") as f:
                lines = f.read().splitlines()
        except OSError:
            return 0
        n = 0
        for line in lines:
            parts = line.split(None, 5)
            if len(parts) < 6 or parts[1][3:4] != b"s" or parts[4] == b"0":
                continue
            path = parts[5]
            if not path.startswith(b"/") or path.startswith(b"/dev/"):
                continue
            lo, hi = (int(x, 16) for x in parts[0].split(b"-"))
            if self._madvise(lo, hi - lo, _MADV_DONTNEED) == 0:  # EINVAL (a locked map): left as is
                n += 1
        self.drops += 1
        return n


_MAPS: tuple[MappedPages, int] | None = None  # (the bound, the thread it belongs to)


@contextlib.contextmanager
def bounded_maps(budget: int = MAP_BUDGET) -> Iterator[MappedPages]:
    """While inside, `trim_maps()` calls from this thread keep the resident pages of the
    process's shared file maps within `budget` bytes of their floor (`MappedPages`)."""
    import threading

    global _MAPS
    before, _MAPS = _MAPS, (MappedPages(budget), threading.get_ident())
    try:
        yield _MAPS[0]
    finally:
        _MAPS = before


def trim_maps() -> None:
    """`MappedPages.check()` of the enclosing `bounded_maps`, from its own thread only; a no-op
    outside one. Cheap enough to call once per block or per cluster of a streaming loop."""
    if _MAPS is not None:
        import threading

        if threading.get_ident() == _MAPS[1]:
            _MAPS[0].check()


def take_rows(a, rows, *, chunk: int = 4096) -> np.ndarray:
    """`np.asarray(a[rows])` for an integer index `rows`, without mapping `a`'s pages when `a`
    is a memory map of a file (`np.load(..., mmap_mode=...)`, `np.memmap`): its rows are read with
    positioned reads (`os.preadv`), which leave them in the page cache, not in the process's RSS.

    Why: a row read through a map maps the whole page-cache folio around it (up to 2 MB on
    this kernel: 100 scattered rows of a 256 MB map mapped ~90 MB, docs/benchmarks.md 7g), so
    a scattered gather (the k-means sample, a cluster's members) maps most of the file. Other
    arrays are indexed as usual, `chunk` rows at a time with `trim_maps()` between chunks.
    Out-of-range rows raise IndexError, as numpy does."""
    rows = np.asarray(rows, np.int64).reshape(-1)
    n = len(a)
    if len(rows) and (rows.min() < -n or rows.max() >= n):
        bad = rows[(rows < -n) | (rows >= n)][0]
        raise IndexError(f"index {bad} is out of bounds for axis 0 with size {n}")
    rows = np.where(rows < 0, rows + n, rows)
    first = np.asarray(a[:0])
    out = np.empty((len(rows), *first.shape[1:]), first.dtype)
    if not len(rows):
        return out
    where = _file_rows(a)
    fd = _open_mapped(where[0], where[3]) if where is not None and where[2] else None
    if fd is None:  # not a map of a file (or rows of 0 bytes), or its file was replaced: index it
        for lo in range(0, len(rows), chunk):
            out[lo : lo + chunk] = a[rows[lo : lo + chunk]]
            trim_maps()
        return out
    path, base, row_bytes, _ = where
    flat = out.reshape(len(rows), -1).view(np.uint8)  # (rows, row bytes)
    # The rows in file order, cut into runs: a run goes on while the next row starts at most
    # _GAP bytes after the end of the one before, and stays within a _WINDOW-byte stretch of the
    # file. One read a run: dense rows cost a read a megabyte, sparse ones a read a row, and no
    # read carries more than _GAP wasted bytes a row.
    order = np.argsort(rows, kind="stable")
    srt = rows[order]
    gap = (np.diff(srt) - 1) * row_bytes
    ends = np.flatnonzero((gap > _GAP) | (np.diff(srt * row_bytes // _WINDOW) != 0)) + 1
    bounds = np.concatenate([[0], ends, [len(srt)]]).tolist()
    mv, srt_l, order_l = memoryview(flat.reshape(-1)), srt.tolist(), order.tolist()
    try:
        for i, j in zip(bounds[:-1], bounds[1:], strict=True):
            r0, r1 = srt_l[i], srt_l[j - 1]
            nb = (r1 - r0 + 1) * row_bytes
            if j - i == 1:  # straight into its place
                at = order_l[i] * row_bytes
                dest = mv[at : at + nb]
            else:
                span = np.empty((r1 - r0 + 1, row_bytes), np.uint8)
                dest = memoryview(span.reshape(-1))
            if os.preadv(fd, [dest], base + r0 * row_bytes) != nb:
                raise OSError(errno.EIO, f"{path}: short read of rows {r0}..{r1}")
            if j - i > 1:
                flat[order[i:j]] = span[srt[i:j] - r0]
    finally:
        os.close(fd)
    return out


#: `take_rows` reads rows closer than _GAP bytes apart in one read, of at most _WINDOW bytes.
_WINDOW, _GAP = 1 << 20, 32 << 10


def _open_mapped(path: str, ident: tuple[int, int]) -> int | None:
    """A descriptor of `path` if it is still the file with (st_dev, st_ino) `ident`, else None
    (a scratch file of the same name may have replaced the mapped one)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != ident:
        os.close(fd)
        return None
    return fd


def _file_rows(a) -> tuple[str, int, int, tuple[int, int]] | None:
    """(file, byte offset of row 0, bytes a row, (st_dev, st_ino) of the mapped file) when `a` is
    a C-contiguous `np.memmap` whose row 0 is the map's first row (the array `np.load` mapped, or
    a slice of it from row 0), so that row r lies at offset + r x row bytes in the file; None
    otherwise (and off Linux, without `os.preadv`, or when the mapped file is not known)."""
    import mmap as _mmap

    if not isinstance(a, np.memmap) or not hasattr(os, "preadv") or a.ndim == 0:
        return None
    mm, path = getattr(a, "_mmap", None), getattr(a, "filename", None)
    if mm is None or path is None or not a.flags.c_contiguous or a.dtype.hasobject:
        return None
    try:
        mm_start = np.frombuffer(mm, np.uint8, count=1).ctypes.data
    except (ValueError, TypeError, BufferError):
        return None
    skip = a.offset % _mmap.ALLOCATIONGRANULARITY  # np.memmap maps from an aligned start
    if a.ctypes.data != mm_start + skip:
        return None
    ident = _mapped_file(mm, mm_start)
    if ident is None:
        return None
    return str(path), int(a.offset), int(a.itemsize * math.prod(a.shape[1:])), ident


_MAPPED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # mmap -> (st_dev, st_ino) | None


def _mapped_file(mm, start: int) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file the map at `start` maps, from `/proc/self/maps` (once per
    map): `take_rows` reads the file at the array's `filename` only while it is that file (a
    scratch file of the same name may have replaced it since it was mapped)."""
    try:
        return _MAPPED[mm]
    except KeyError:
        pass
    ident = None
    try:
        with open("/proc/self/maps", "rb") as f:
            for line in f:
                parts = line.split(None, 5)
                lo, hi = (int(x, 16) for x in parts[0].split(b"-"))
                if lo <= start < hi:
                    major, minor = (int(x, 16) for x in parts[3].split(b":"))
                    if int(parts[4]):
                        ident = (os.makedev(major, minor), int(parts[4]))
                    break
    except (OSError, ValueError, IndexError):
        ident = None
    _MAPPED[mm] = ident
    return ident


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
    """sha256 of a file, streamed (about 1-2 GB/s): the one hash of every file the project
    records (work units, shards, the tokenizer)."""
    import hashlib

    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


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
