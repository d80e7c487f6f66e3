"""`SeenIds`: the set of document ids an ingest has handed out, in ~8 bytes an id.

`CorpusReader` gives every document a unique id (a repeated id gets `#2`, `#3`, ...), so it must
remember every id it has seen. A Python `set` of the id strings costs ~100 bytes an id (the
string and its slot): 1 GB at 10^7 documents, the largest memory of a 10^7-document ingest
(docs/benchmarks.md). `SeenIds` keeps a 64-bit BLAKE2b hash of each id instead: the most recent
ids in a small Python set (`buffer` of them), the rest in one sorted uint64 array, merged in
every `buffer` insertions.

With `spill_dir`, the sorted array is a file there, never memory-mapped: a merge reads the old
file and writes the new one `block` hashes at a time (positioned reads and writes), and a lookup
finds its 4 KB page in an in-memory fence (every 512th hash: 16 bytes a thousand ids) and reads
it. The pages stay in the page cache, not in the process's RSS: a map would keep every page a
lookup or a merge touched resident (whole 2 MB folios on this kernel, docs/benchmarks.md 7g:
160 MB at 10^7 ids, 1.6 GB at 10^8). Without it, 8 bytes an id in memory.

A hash stands for its id: two distinct ids with the same 64-bit hash (probability ~N^2 / 2^65,
about 3 x 10^-6 at 10^7 ids) make the second one look seen, so it gets a `#n` suffix it did not
need. Ids stay unique either way, which is what the reader guarantees.
"""

from __future__ import annotations

import array
import bisect
import errno
import hashlib
import os

import numpy as np

from grip_loop.workdir import Scratch, reserve


def id_hash(s: str) -> int:
    """The 64-bit hash `SeenIds` keeps of an id (BLAKE2b, so stable across runs and processes)."""
    return int.from_bytes(
        hashlib.blake2b(s.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little"
    )


class SeenIds:
    """A set of strings with `add` (False when already present) and `in`; see the module docstring."""

    def __init__(
        self, spill_dir: str | os.PathLike | None = None, buffer: int = 1 << 16, *, block: int = 1 << 18
    ) -> None:
        if buffer < 1:
            raise ValueError(f"buffer: {buffer}, must be >= 1")
        if block < 1:
            raise ValueError(f"block: {block}, must be >= 1")
        self.buffer, self.block = buffer, block
        self._sorted = np.zeros(0, np.uint64)  # in memory (no spill_dir)
        self._recent: set[int] = set()
        self._scratch = Scratch(spill_dir) if spill_dir is not None else None
        self._turn = 0  # which of the two spill files the next merge writes
        self._n = 0  # hashes in the spill file
        self._fd: int | None = None  # the spill file (read and written with pread / pwrite)
        self._fence = array.array("Q")  # the spill file's hashes number 0, STEP, 2 STEP, ...

    def __len__(self) -> int:
        return len(self._sorted) + self._n + len(self._recent)

    def _has(self, h: int) -> bool:
        if h in self._recent:
            return True
        if self._fd is None:
            a = self._sorted
            i = int(a.searchsorted(np.uint64(h)))
            return i < len(a) and int(a[i]) == h
        # pure-Python bisects on C arrays (a numpy call per id costs more than the search)
        j = bisect.bisect_right(self._fence, h) - 1
        if j < 0:
            return False
        lo = j * STEP
        page = memoryview(self._pread(lo, min(lo + STEP, self._n))).cast("Q")  # native order, as written
        i = bisect.bisect_left(page, h)
        return i < len(page) and page[i] == h

    def __contains__(self, s: str) -> bool:
        return self._has(id_hash(s))

    def add(self, s: str) -> bool:
        """Add `s`; False (and nothing changes) when it was already in the set."""
        h = id_hash(s)
        if self._has(h):
            return False
        self._recent.add(h)
        if len(self._recent) >= self.buffer:
            self._merge()
        return True

    def sorted_hashes(self) -> np.ndarray:
        """Every merged hash, sorted (the recent ones not included): for tests and inspection."""
        return self._read(0, self._n).copy() if self._fd is not None else self._sorted.copy()

    def _merge(self) -> None:
        """Merge the recent hashes into the sorted array (one pass; no re-sort of the old part)."""
        new = np.fromiter(self._recent, np.uint64, len(self._recent))
        new.sort()
        if self._scratch is None:
            self._sorted = _merge_sorted(self._sorted, new)
        else:
            self._merge_file(new)
        self._recent.clear()

    def _merge_file(self, new: np.ndarray) -> None:
        """Write old + new, sorted, to the other spill file, `block` old hashes at a time."""
        n_out = self._n + len(new)
        path = self._scratch.path(self._spill_name(self._turn))
        reserve(path, n_out * 8, "the ids seen so far")  # a full disk: DiskSpaceError, here
        fd = os.open(path, os.O_RDWR)
        try:
            fence, lo, j, at = [], 0, 0, 0
            while True:
                hi = min(lo + self.block, self._n)
                old = self._read(lo, hi)
                k = len(new) if hi == self._n else int(new.searchsorted(old[-1], side="right"))
                out = _merge_sorted(old, new[j:k])
                fence.append(out[(-at) % STEP :: STEP].copy())  # a view would keep every block alive
                _pwrite_all(fd, out, at * 8, path)
                at, lo, j = at + len(out), hi, k
                if hi == self._n:
                    break
        except BaseException:
            os.close(fd)
            raise
        if self._fd is not None:
            os.close(self._fd)
        (self._scratch.folder / self._spill_name(self._turn + 1)).unlink(missing_ok=True)  # the old file
        self._fd, self._n, self._fence = fd, n_out, array.array("Q", np.concatenate(fence).tobytes())
        self._turn += 1

    def _read(self, lo: int, hi: int) -> np.ndarray:
        """Hashes lo..hi-1 of the spill file."""
        if hi <= lo:
            return np.zeros(0, np.uint64)
        return np.frombuffer(self._pread(lo, hi), np.uint64)

    def _pread(self, lo: int, hi: int) -> bytes:
        """The bytes of hashes lo..hi-1 of the spill file; a short read is an error, not a miss."""
        raw = os.pread(self._fd, (hi - lo) * 8, lo * 8)
        if len(raw) != (hi - lo) * 8:
            raise OSError(errno.EIO, f"{self._scratch.folder}: the ids seen so far were cut short")
        return raw

    def _spill_name(self, turn: int) -> str:
        return f"seen-ids.{os.getpid()}.{turn % 2}.bin"  # two files, alternating

    def close(self) -> None:
        """Free the array and remove the spill files (their folder too)."""
        self._sorted = np.zeros(0, np.uint64)
        self._recent.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd, self._n, self._fence = None, 0, array.array("Q")
        if self._scratch is not None:
            self._scratch.close()


STEP = 512  # hashes a fence entry stands for: one 4 KB page of the spill file


def _merge_sorted(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Two sorted uint64 arrays with no hash in both, merged (one pass over `old`)."""
    pos = old.searchsorted(new) + np.arange(len(new))  # where each new hash lands
    out = np.empty(len(old) + len(new), np.uint64)
    rest = np.ones(len(out), bool)
    rest[pos] = False
    out[pos] = new
    out[rest] = old
    return out


def _pwrite_all(fd: int, a: np.ndarray, offset: int, path) -> None:
    view = memoryview(np.ascontiguousarray(a)).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, f"{path}: short write")
        view, offset = view[n:], offset + n
