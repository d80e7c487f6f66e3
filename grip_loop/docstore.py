"""Sharded, on-disk document and token stores of `grip prepare` (`OUT/work/docs/`, `OUT/work/tokens/`).

No stage holds the corpus in memory: ingest streams documents into *parts* of at most
`part_docs` documents (or `part_bytes` of text), and later stages read single documents back
by their global index (positioned reads), or a part at a time.

A document part `work/docs/part-PPPPP` is three files, each written under a temporary name,
fsynced and renamed (`grip_loop.workdir`):

    part-PPPPP.txt         the texts, UTF-8, concatenated
    part-PPPPP.meta.jsonl  one JSON object a document: id, lang, path (and group with --cluster-by)
    part-PPPPP.idx.npy     int64 (n, 5): text offset, text bytes, meta offset, meta bytes, stratum

`stratum` is a small integer code of the document's language (or its `--cluster-by` value): the
held-out split and `--cluster-by` need that one string of every document, and the codes cost
8 bytes a document where the strings would cost ~60. The codes' values are listed in
`ingest.json` (`strata`).

A token part `work/tokens/part-PPPPP` (the unit of the tokenize stage, one per document part):

    part-PPPPP.ids.npy      every document's token ids, concatenated (uint16 or uint32)
    part-PPPPP.offsets.npy  int64 (n + 1,): document j is ids[offsets[j]:offsets[j + 1]]
    part-PPPPP.json         its record: the stage key and the sha256 of both files (written last)
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from grip_loop import workdir

#: Bumped when the layout of the stores changes (it is part of the ingest stage's key).
STORE_VERSION = 1
IDX_COLUMNS = 5


def part_name(p: int) -> str:
    return f"part-{p:05d}"


class _HashedFile:
    """A temporary file written sequentially, hashed as it goes (no second read)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self.fh = open(self.tmp, "wb")  # noqa: SIM115 (closed in finish / abort)
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        off = self.size
        with self._full_disk_is_clear():
            self.fh.write(data)
        self.sha.update(data)
        self.size += len(data)
        return off

    def finish(self) -> dict:
        with self._full_disk_is_clear():
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()
        os.replace(self.tmp, self.path)
        return {"bytes": self.size, "sha256": self.sha.hexdigest()}

    @contextlib.contextmanager
    def _full_disk_is_clear(self):
        try:
            yield
        except OSError as exc:
            if exc.errno == errno.ENOSPC and not isinstance(exc, workdir.DiskSpaceError):
                raise workdir.disk_full(self.path) from exc
            raise

    def abort(self) -> None:
        with contextlib.suppress(OSError):  # closing flushes: a full disk again
            self.fh.close()
        self.tmp.unlink(missing_ok=True)


class DocPartWriter:
    """Writes documents into `folder/part-PPPPP.*`, a new part every `part_docs` documents or
    `part_bytes` of text. `close()` returns the record of every part (`ingest.json`)."""

    def __init__(self, folder: str | os.PathLike, *, part_docs: int = 100_000, part_bytes: int = 256 << 20):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.part_docs, self.part_bytes = part_docs, part_bytes
        self.parts: list[dict] = []
        self._open = None

    def add(self, text: str, meta: dict, stratum: int) -> None:
        if self._open is None:
            name = part_name(len(self.parts))
            self._open = (
                name,
                _HashedFile(self.folder / f"{name}.txt"),
                _HashedFile(self.folder / f"{name}.meta.jsonl"),
                [],
            )
        _, txt, meta_f, rows = self._open
        t = text.encode("utf-8")
        m = (json.dumps(meta, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
        rows.append((txt.write(t), len(t), meta_f.write(m), len(m), stratum))
        if len(rows) >= self.part_docs or txt.size >= self.part_bytes:
            self._finish()

    def _finish(self) -> None:
        if self._open is None:
            return
        name, txt, meta_f, rows = self._open
        idx_path = self.folder / f"{name}.idx.npy"
        workdir.atomic_npy(idx_path, np.asarray(rows, np.int64).reshape(-1, IDX_COLUMNS))
        files = {"txt": txt.finish(), "meta.jsonl": meta_f.finish()}
        files["idx.npy"] = {"bytes": idx_path.stat().st_size, "sha256": workdir.file_sha256(idx_path)}
        self.parts.append({"name": name, "n_docs": len(rows), "files": files})
        self._open = None

    def close(self) -> list[dict]:
        self._finish()
        return list(self.parts)

    def abort(self) -> None:
        if self._open is not None:
            for f in self._open[1:3]:
                f.abort()
            self._open = None


def parts_problem(folder: Path, parts: list[dict]) -> str | None:
    """Why the parts on disk are not the ones recorded (missing, cut short, overwritten), or None."""
    for part in parts:
        for suffix, want in part.get("files", {}).items():
            path = folder / f"{part['name']}.{suffix}"
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                return f"{path.name}: missing"
            if size != want.get("bytes"):
                return (
                    f"{path.name}: {size} bytes, {want.get('bytes')} were written (cut short or overwritten)"
                )
            if workdir.file_sha256(path) != want.get("sha256"):
                return f"{path.name}: its sha256 differs from the one recorded when it was written"
    return None


class DocStore:
    """Read access to the documents of `work/docs/` by global index (0..N-1, reading order).

    Holds the parts' index arrays memory-mapped (clean page-cache pages) and one descriptor per
    part; a text or a metadata record is one positioned read. Pickles without its descriptors."""

    def __init__(self, folder: str | os.PathLike, parts: list[dict]) -> None:
        self.folder = Path(folder)
        self.names = [p["name"] for p in parts]
        counts = np.array([p["n_docs"] for p in parts], np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self._idx: dict[int, np.ndarray] = {}
        self._fds: dict[tuple[int, str], int] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self):
        return {**self.__dict__, "_idx": {}, "_fds": {}}

    def idx(self, p: int) -> np.ndarray:
        a = self._idx.get(p)
        if a is None:
            a = self._idx[p] = np.load(self.folder / f"{self.names[p]}.idx.npy", mmap_mode="r")
        return a

    def _loc(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} of {len(self)}")
        p = int(np.searchsorted(self.starts, i, side="right") - 1)
        return p, int(i - self.starts[p])

    def _read(self, p: int, suffix: str, off: int, size: int) -> bytes:
        fd = self._fds.get((p, suffix))
        if fd is None:
            fd = self._fds[(p, suffix)] = os.open(self.folder / f"{self.names[p]}.{suffix}", os.O_RDONLY)
        buf = os.pread(fd, size, off)
        if len(buf) != size:
            raise OSError(f"{self.folder / self.names[p]}.{suffix}: cut short; re-run grip prepare")
        return buf

    def _row(self, p: int, j: int) -> np.ndarray:
        """Row j of part p's index, by a positioned read: one document's lookup through the map
        would keep the page-cache folio around it mapped (up to 2 MB, docs/benchmarks.md 7g),
        and a stage that looks up documents all over the parts (the naming, the judge, the
        manifest's probe ids) would map every index file."""
        a = self.idx(p)
        width = a.shape[1] * a.itemsize
        raw = self._read(p, "idx.npy", int(a.offset) + j * width, width)
        return np.frombuffer(raw, a.dtype)

    def text(self, i: int) -> str:
        p, j = self._loc(i)
        off, size = (int(x) for x in self._row(p, j)[0:2])
        return self._read(p, "txt", off, size).decode("utf-8")

    def meta(self, i: int) -> dict:
        p, j = self._loc(i)
        off, size = (int(x) for x in self._row(p, j)[2:4])
        return json.loads(self._read(p, "meta.jsonl", off, size))

    def encoded(self, ids) -> Iterator[tuple[bytes, dict]]:
        """(UTF-8 text, metadata) of each document of `ids`, in order: `text(i).encode()` and
        `meta(i)` without a lookup of the part and its index per document (the write stage)."""
        ids = np.asarray(ids, np.int64)
        if len(ids) and not (0 <= int(ids.min()) and int(ids.max()) < len(self)):
            raise IndexError(f"documents {int(ids.min())}..{int(ids.max())} of {len(self)}")
        parts = np.searchsorted(self.starts, ids, side="right") - 1
        rows = np.empty((len(ids), 4), np.int64)  # the index rows of these documents, part by part
        for p in np.unique(parts).tolist():
            sel = parts == p
            rows[sel] = workdir.take_rows(self.idx(p), ids[sel] - self.starts[p])[:, :4]  # read, not mapped
        for p, (to, tn, mo, mn) in zip(parts.tolist(), rows.tolist(), strict=True):
            yield self._read(p, "txt", to, tn), json.loads(self._read(p, "meta.jsonl", mo, mn))

    def part_text_batches(self, p: int, batch: int = 1024) -> Iterator[list[str]]:
        """The texts of part p, in order, `batch` documents at a time (one read a batch): what is
        held is one batch's texts, not the part's."""
        idx = self.idx(p)
        for lo in range(0, len(idx), batch):
            rows = idx[lo : lo + batch, 0:2].tolist()
            start = rows[0][0]
            raw = self._read(p, "txt", start, rows[-1][0] + rows[-1][1] - start)
            yield [raw[o - start : o - start + n].decode("utf-8") for o, n in rows]
            workdir.trim_maps()

    def column(self, c: int, out: np.ndarray | None = None) -> np.ndarray:
        """One column of every part's index, concatenated: (N,) int64 (1: text bytes, 4: stratum).
        `out`: an (N,) array to fill part by part (a memory map, say), returned."""
        if out is None:
            out = np.empty(len(self), np.int64)
        for p in range(len(self.names)):
            out[self.starts[p] : self.starts[p + 1]] = self.idx(p)[:, c]
            workdir.trim_maps()
        return out

    @property
    def texts(self) -> Sequence[str]:
        return _View(self, self.text)

    @property
    def metas(self) -> Sequence[dict]:
        return _View(self, self.meta)

    def field(self, name: str) -> Sequence[str]:
        return _View(self, lambda i: self.meta(i)[name])

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._idx.clear()


class _View(Sequence):
    """A lazy sequence over a store: `view[i]` and `view[lo:hi]` read on demand."""

    def __init__(self, store, get) -> None:
        self.store, self.get = store, get

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.get(j) for j in range(*i.indices(len(self)))]
        return self.get(int(i))


class TokenStore:
    """Token ids of every document from `work/tokens/part-PPPPP.*` (memory-mapped ids and offsets)."""

    def __init__(self, folder: str | os.PathLike, names: list[str], starts: np.ndarray) -> None:
        self.folder = Path(folder)
        self.names = list(names)
        self.starts = np.asarray(starts, np.int64)
        self._ids: dict[int, np.ndarray] = {}
        self._off: dict[int, np.ndarray] = {}
        self._fds: dict[int, tuple[int, int, np.dtype]] = {}  # part -> (descriptor, data offset, dtype)

    def __getstate__(self):
        return {**self.__dict__, "_ids": {}, "_off": {}, "_fds": {}}

    def _ids_file(self, p: int) -> tuple[int, int, np.dtype]:
        """(descriptor, data offset, dtype) of part p's ids, opened once and kept until close()."""
        f = self._fds.get(p)
        if f is None:
            m = self._part(p)[0]
            fd = os.open(m.filename, os.O_RDONLY)
            f = self._fds[p] = (fd, int(m.offset), m.dtype)
        return f

    def _part(self, p: int) -> tuple[np.ndarray, np.ndarray]:
        if p not in self._ids:
            self._ids[p] = np.load(self.folder / f"{self.names[p]}.ids.npy", mmap_mode="r")
            self._off[p] = np.load(self.folder / f"{self.names[p]}.offsets.npy", mmap_mode="r")
        return self._ids[p], self._off[p]

    def tokens(self, i: int) -> np.ndarray:
        p = int(np.searchsorted(self.starts, i, side="right") - 1)
        ids, off = self._part(p)
        j = i - int(self.starts[p])
        return np.array(ids[off[j] : off[j + 1]])

    def encoded(self, ids, dtype) -> Iterator[bytes]:
        """The token ids of each document of `ids`, in order, as little-endian bytes of `dtype`
        (what a shard stores). Read with positioned reads (`os.pread`), not through the maps: a
        shard's documents are scattered over the parts, and a read through a map keeps the
        whole page-cache folio around each one mapped (docs/benchmarks.md 7g)."""
        ids = np.asarray(ids, np.int64)
        want = np.dtype(dtype).newbyteorder("<")
        parts = np.searchsorted(self.starts, ids, side="right") - 1
        lo, hi = np.empty(len(ids), np.int64), np.empty(len(ids), np.int64)
        for p in np.unique(parts).tolist():
            sel = parts == p
            off = self._part(p)[1]
            j = ids[sel] - self.starts[p]
            both = workdir.take_rows(off, np.stack([j, j + 1], axis=1).reshape(-1)).reshape(-1, 2)
            lo[sel], hi[sel] = both[:, 0], both[:, 1]
        for p, a, b in zip(parts.tolist(), lo.tolist(), hi.tolist(), strict=True):
            fd, base, have = self._ids_file(p)
            size = have.itemsize
            raw = os.pread(fd, (b - a) * size, base + a * size) if b > a else b""
            if len(raw) != (b - a) * size:
                raise OSError(errno.EIO, f"{self.folder / self.names[p]}.ids.npy: short read")
            if have == want:
                yield raw
                continue
            chunk = np.frombuffer(raw, have)
            if chunk.size and int(chunk.max()) > np.iinfo(want).max:
                raise ValueError(f"tokens: ids out of range for {want.name} (document {ids[0]}...)")
            yield chunk.astype(want).tobytes()

    def close(self) -> None:
        for fd, _, _ in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._ids.clear()
        self._off.clear()

    def lengths(self, out: np.ndarray | None = None) -> np.ndarray:
        """(N,) int64 token count of every document. `out`: an (N,) array to fill part by part
        (a memory map, say), returned."""
        if out is None:
            out = np.empty(int(self.starts[-1]), np.int64)
        for p in range(len(self.names)):
            out[self.starts[p] : self.starts[p + 1]] = np.diff(self._part(p)[1])
            workdir.trim_maps()
        return out


def open_work(work: str | os.PathLike) -> tuple[DocStore, TokenStore]:
    """The document and token stores of a prepared folder's `work/` (after its tokenize stage)."""
    work = Path(work)
    ingest = json.loads((work / "ingest.json").read_text())
    docs = DocStore(work / "docs", ingest["parts"])
    return docs, TokenStore(work / "tokens", docs.names, docs.starts)


def read_docs(work: str | os.PathLike) -> list[dict]:
    """Every document of `work/docs/` as {id, lang, path, [group,] text}, in order. For tests and
    inspection of small corpora: it holds them all in memory."""
    docs, _ = open_work(work)
    return [{**docs.meta(i), "text": docs.text(i)} for i in range(len(docs))]
