"""`SeenIds`: the set of document ids an ingest has handed out, in ~8 bytes an id.

`CorpusReader` gives every document a unique id (a repeated id gets `#2`, `#3`, ...), so it must
remember every id it has seen. A Python `set` of the id strings costs ~100 bytes an id (the
string and its slot): 1 GB at 10^7 documents, the largest memory of a 10^7-document ingest
(docs/benchmarks.md). `SeenIds` keeps a 64-bit BLAKE2b hash of each id instead: the most recent
ids in a small Python set (`buffer` of them), the rest in one sorted uint64 array, merged in
every `buffer` insertions. With `spill_dir`, the sorted array is a memory-mapped file there
(page cache the kernel can reclaim, not private memory), so the reader's private memory stays
flat in N; without it, 8 bytes an id in memory.

A hash stands for its id: two distinct ids with the same 64-bit hash (probability ~N^2 / 2^65,
about 3 x 10^-6 at 10^7 ids) make the second one look seen, so it gets a `#n` suffix it did not
need. Ids stay unique either way, which is what the reader guarantees.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from grip_loop.workdir import Scratch


def id_hash(s: str) -> int:
    """The 64-bit hash `SeenIds` keeps of an id (BLAKE2b, so stable across runs and processes)."""
    return int.from_bytes(
        hashlib.blake2b(s.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little"
    )


class SeenIds:
    """A set of strings with `add` (False when already present) and `in`; see the module docstring."""

    def __init__(self, spill_dir: str | os.PathLike | None = None, buffer: int = 1 << 16) -> None:
        if buffer < 1:
            raise ValueError(f"buffer: {buffer}, must be >= 1")
        self.buffer = buffer
        self._sorted = np.zeros(0, np.uint64)
        self._recent: set[int] = set()
        self._scratch = Scratch(spill_dir) if spill_dir is not None else None
        self._turn = 0  # which of the two spill files the next merge writes

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)

    def _has(self, h: int) -> bool:
        if h in self._recent:
            return True
        a = self._sorted
        i = int(a.searchsorted(np.uint64(h)))
        return i < len(a) and int(a[i]) == h

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

    def _merge(self) -> None:
        """Merge the recent hashes into the sorted array (one pass; no re-sort of the old part)."""
        new = np.fromiter(self._recent, np.uint64, len(self._recent))
        new.sort()
        old = self._sorted
        pos = old.searchsorted(new) + np.arange(len(new))  # where each new hash lands
        out = self._alloc(len(old) + len(new))
        rest = np.ones(len(out), bool)
        rest[pos] = False
        out[pos] = new
        out[rest] = old
        self._sorted = out
        self._recent.clear()
        del old
        self._drop_stale()

    def _spill_name(self, turn: int) -> str:
        return f"seen-ids.{os.getpid()}.{turn % 2}"  # two files, alternating

    def _alloc(self, n: int) -> np.ndarray:
        if self._scratch is None:
            return np.empty(n, np.uint64)
        self._turn += 1
        # reserved before it is mapped: a full disk is a DiskSpaceError, not SIGBUS
        return self._scratch.empty(self._spill_name(self._turn - 1), n, np.uint64)

    def _drop_stale(self) -> None:
        # the other file of the two: its map went with the old array
        if self._scratch is not None:
            self._scratch.remove(self._spill_name(self._turn))

    def close(self) -> None:
        """Free the array and remove the spill files (their folder too)."""
        self._sorted = np.zeros(0, np.uint64)
        self._recent.clear()
        if self._scratch is not None:
            self._scratch.close()
