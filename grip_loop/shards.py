"""Per-cluster WebDataset shards: the on-disk form of a prepared corpus.

One sample per document, grouped by its `__key__` (the document's index in the corpus,
zero-padded, so keys sort and never collide):

    <key>.ids    token ids, raw little-endian bytes of the manifest's `token_dtype`
                 (uint16 when the vocabulary fits, else uint32: 2 or 4 bytes a token,
                 against ~8 for .npy int64 or ~4 per digit in JSON)
    <key>.txt    the document text, UTF-8 (kept for inspection, judges and debugging)
    <key>.json   metadata: doc_id, length, lang, path, cluster, position

These are plain tar files that `webdataset` (and `tar`) read as they are. Shards are
written to `<name>.tar.tmp` and renamed when complete, so an interrupted writer never
leaves a file that looks like a finished shard.

Reading side: `iter_shard` streams a shard, `shard_index` lists each document's byte range,
`ClusterReader` reads one document of a cluster's shards at random (one `os.pread`, for
`GripIterableDataset`), and `verify_prepared` checks every shard a manifest lists before
training (levels "auto", "quick", "full", "none").

Index: next to each shard `<name>.tar` the writer puts `<name>.idx.npy` (written atomically
before the shard is renamed into place), an int64 (n_docs, 2) array of the byte offset and
byte size of every document's `.ids` member. The sampler memory-maps it (`load_index`), so
every DataLoader worker of a rank shares one copy through the page cache instead of scanning
the tar headers into its own memory (16 bytes a document per worker).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import tarfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from grip_loop.manifest import (
    Manifest,
    ManifestError,
    ShardInfo,
    check_shard_sha256,
    file_sha256,
    token_range_error,
)
from grip_loop.workdir import DiskSpaceError, atomic_npy, disk_full

TOKEN_DTYPES = ("uint16", "uint32")


def token_dtype_for(vocab_size: int) -> str:
    """The narrowest dtype that holds every token id of a `vocab_size` vocabulary."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size: must be > 0, got {vocab_size}")
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


@dataclass
class Doc:
    """One document read back from a shard."""

    key: str
    tokens: np.ndarray
    text: str
    meta: dict = field(default_factory=dict)


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> int:
    """Append one member; returns the byte offset of its data in the archive."""
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mode = 0o444
    tar.addfile(info, io.BytesIO(payload))
    return tar.offset - -(-len(payload) // 512) * 512  # the data ends padded to 512-byte blocks


def index_path(shard: str | os.PathLike) -> Path:
    """`<name>.idx.npy` of the shard `<name>.tar`."""
    shard = Path(shard)
    return shard.with_name(shard.name.removesuffix(".tar") + ".idx.npy")


def load_index(shard: str | os.PathLike, n_docs: int) -> np.ndarray | None:
    """The memory-mapped (n_docs, 2) index of `shard`, None when it has none (a shard written by
    an older grip_loop or another tool: the caller scans the headers). ManifestError when the
    index does not fit the shard (another shard's, cut short)."""
    path = index_path(shard)
    if not path.exists():
        return None
    fix = "re-run `grip prepare` to rebuild it"
    try:
        idx = np.load(path, mmap_mode="r")
        size = os.path.getsize(shard)
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path}: unreadable shard index ({exc}); {fix}") from None
    if idx.dtype != np.int64 or idx.ndim != 2 or idx.shape[1] != 2:
        raise ManifestError(f"{path}: index of {idx.shape} {idx.dtype}, expected (n, 2) int64; {fix}")
    if len(idx) != n_docs:
        raise ManifestError(
            f"{shard}: holds {len(idx)} documents but the manifest says {n_docs} (its index {path.name}); {fix}"
        )
    if n_docs and (int(idx[:, 0].min()) < 0 or int((idx[:, 0] + idx[:, 1]).max()) > size):
        raise ManifestError(f"{path}: points past the end of {Path(shard).name}; {fix}")
    return idx


class ShardWriter:
    """Writes documents into `<directory>/<prefix>-NNNNNN.tar`, rolling over by count or size.

    Use as a context manager; `close()` returns one `ShardInfo` per finished shard, with
    `path` relative to `directory` (callers re-base it onto the prepared output root).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        token_dtype: str = "uint16",
        prefix: str = "shard",
        max_docs: int = 10_000,
        max_bytes: int = 256 << 20,
    ) -> None:
        if token_dtype not in TOKEN_DTYPES:
            raise ValueError(f"token_dtype: must be one of {TOKEN_DTYPES}, got {token_dtype!r}")
        if max_docs < 1 or max_bytes < 1:
            raise ValueError("max_docs and max_bytes must be >= 1")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(token_dtype).newbyteorder("<")
        self.prefix, self.max_docs, self.max_bytes = prefix, max_docs, max_bytes
        self.finished: list[ShardInfo] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._docs = self._tokens = self._bytes = 0
        self._rows: list[tuple[int, int]] = []

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.finished):06d}.tar"
        self._tmp = self.directory / (name + ".tmp")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self._docs = self._tokens = self._bytes = 0
        self._rows = []

    @contextlib.contextmanager
    def _disk_full_is_clear(self):
        try:
            yield
        except OSError as exc:
            if exc.errno == errno.ENOSPC and not isinstance(exc, DiskSpaceError):
                raise disk_full(self._tmp.with_suffix("")) from exc
            raise

    def _finish(self) -> None:
        if self._tar is None:
            return
        with self._disk_full_is_clear():
            self._tar.close()
            fd = os.open(self._tmp, os.O_RDONLY)
            try:
                os.fsync(fd)  # on disk before the manifest that lists it
            finally:
                os.close(fd)
        final = self._tmp.with_suffix("")  # drop ".tmp"
        sha = file_sha256(self._tmp)  # read back from the page cache: what the reader will see
        atomic_npy(index_path(final), np.asarray(self._rows, np.int64).reshape(-1, 2))
        os.replace(self._tmp, final)
        self.finished.append(ShardInfo(path=final.name, n_docs=self._docs, n_tokens=self._tokens, sha256=sha))
        self._tar = self._tmp = None

    def write(self, key: str, tokens: np.ndarray, text: str, meta: dict) -> None:
        if not key or "." in key or "/" in key:
            raise ValueError(f"key: must be non-empty without '.' or '/', got {key!r}")
        tokens = np.asarray(tokens)
        if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"tokens: ids out of range for {self.dtype.name}")
        if self._tar is None:
            self._open()
        ids = tokens.astype(self.dtype, copy=False).tobytes()
        txt = text.encode("utf-8")
        js = json.dumps(meta, sort_keys=True).encode("utf-8")
        with self._disk_full_is_clear():
            self._rows.append((_add(self._tar, f"{key}.ids", ids), len(ids)))
            _add(self._tar, f"{key}.txt", txt)
            _add(self._tar, f"{key}.json", js)
        self._docs += 1
        self._tokens += int(tokens.size)
        self._bytes += len(ids) + len(txt) + len(js) + 3 * 512
        if self._docs >= self.max_docs or self._bytes >= self.max_bytes:
            self._finish()

    def close(self) -> list[ShardInfo]:
        self._finish()
        return list(self.finished)

    def abort(self) -> None:
        """Drop the shard being written (its temp file) without publishing it."""
        if self._tar is not None:
            with contextlib.suppress(OSError):  # closing writes the end blocks: a full disk again
                self._tar.close()
            self._tmp.unlink(missing_ok=True)
            self._tar = self._tmp = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def iter_shard(path: str | os.PathLike, token_dtype: str, *, with_text: bool = True) -> Iterator[Doc]:
    """Stream the documents of one shard in stored order.

    Reads the tar sequentially (mode "r|", no seeking), as WebDataset does. A truncated or
    corrupt shard raises ManifestError naming the file. `with_text=False` skips decoding
    the text (the training hot path only needs token ids).
    """
    path = Path(path)
    dtype = np.dtype(token_dtype).newbyteorder("<")
    try:
        with open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
            cur: str | None = None
            parts: dict[str, bytes] = {}
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.rpartition("/")[2].partition(".")
                if cur is not None and key != cur:
                    yield _doc(cur, parts, dtype, with_text, path)
                    parts = {}
                cur = key
                if ext == "txt" and not with_text:
                    tar.members = []  # streaming mode: keep no member list
                    continue
                parts[ext] = tar.extractfile(member).read()
                tar.members = []
            if cur is not None:
                yield _doc(cur, parts, dtype, with_text, path)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ManifestError(
            f"{path}: unreadable shard ({type(exc).__name__}: {exc}); re-run `grip prepare` to rebuild it"
        ) from exc


def _doc(key: str, parts: dict[str, bytes], dtype: np.dtype, with_text: bool, path: Path) -> Doc:
    if "ids" not in parts or "json" not in parts:
        raise ManifestError(f"{path}: sample {key!r} lacks .ids or .json; re-run `grip prepare`")
    tokens = np.frombuffer(parts["ids"], dtype=dtype)
    text = parts["txt"].decode("utf-8") if with_text and "txt" in parts else ""
    return Doc(key=key, tokens=tokens, text=text, meta=json.loads(parts["json"]))


# ---------------------------------------------------------------- index and verification


def shard_index(path: str | os.PathLike) -> np.ndarray:
    """(n_docs, 2) int64: byte offset and byte size of each document's `.ids` member, in order."""
    rows = []
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if m.isfile() and m.name.endswith(".ids"):
                    rows.append((m.offset_data, m.size))
                tar.members = []
    except (tarfile.TarError, OSError) as exc:
        raise ManifestError(f"{path}: unreadable shard ({exc}); re-run `grip prepare`") from exc
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


class ClusterReader:
    """Random access to the documents of one cluster's stream (one selection order)."""

    def __init__(
        self,
        root: Path,
        shards,
        token_dtype: str,
        max_open: int = 16,
        verify_sha256=(),
        vocab_size: int | None = None,
    ) -> None:
        self.root = root
        self.vocab_size = vocab_size  # token ids must be < this (None: unchecked)
        self.shards: list[ShardInfo] = list(shards)
        self.verify_sha256 = set(verify_sha256)  # shards whose sha256 is checked at first read
        self.paths = [root / s.path for s in shards]
        self.counts = np.array([s.n_docs for s in shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])
        self.dtype = np.dtype(token_dtype).newbyteorder("<")
        self._index: dict[int, np.ndarray] = {}
        self._fds: OrderedDict[int, int] = OrderedDict()
        self.max_open = max_open
        self._last = (0, 0, -1)  # (first, end, shard) of the last shard read: positions are mostly sequential

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _fd(self, i: int) -> int:
        fd = self._fds.pop(i, None)
        if fd is None:
            if len(self._fds) >= self.max_open:
                os.close(self._fds.popitem(last=False)[1])
            fd = os.open(self.paths[i], os.O_RDONLY)
        self._fds[i] = fd
        return fd

    def _shard_of(self, position: int) -> tuple[int, int]:
        first, end, i = self._last
        if not first <= position < end:
            i = int(np.searchsorted(self.starts, position, side="right") - 1)
            if i not in self._index:
                if i in self.verify_sha256:
                    check_shard_sha256(self.root, self.shards[i])
                idx = load_index(self.paths[i], int(self.counts[i]))  # memory-mapped, shared
                if idx is None:  # no index file: scan the headers into this process's memory
                    idx = shard_index(self.paths[i])
                if len(idx) != self.counts[i]:
                    raise ManifestError(
                        f"{self.paths[i]}: holds {len(idx)} documents but the manifest says "
                        f"{self.counts[i]}; re-run `grip prepare`"
                    )
                # a plain ndarray view of the map (still shared): np.memmap indexes through
                # Python-level __getitem__ / __array_finalize__ on every read
                self._index[i] = idx.view(np.ndarray)
            first, end = int(self.starts[i]), int(self.starts[i + 1])
            self._last = (first, end, i)
        return i, position - first

    def tokens(self, position: int, check: bool = True) -> np.ndarray:
        """The token ids of document `position` (one positioned read, no EOS). `check`: raise
        naming the shard and document when an id is >= `vocab_size` (a caller that checks
        whole blocks passes False, and calls again with True to name the culprit)."""
        i, j = self._shard_of(position)
        off, size = self._index[i][j].tolist()
        buf = os.pread(self._fd(i), size, off)
        if len(buf) != size:
            raise ManifestError(f"{self.paths[i]}: truncated; re-run `grip prepare`")
        toks = np.frombuffer(buf, dtype=self.dtype)
        if check and self.vocab_size is not None and toks.size and int(toks.max()) >= self.vocab_size:
            raise token_range_error(
                self.paths[i], f"document {j} of the shard", int(toks.max()), self.vocab_size, self.root
            )
        return toks

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __getstate__(self):  # open files do not cross process boundaries
        return {**self.__dict__, "_fds": OrderedDict()}


VERIFY_LEVELS = ("auto", "quick", "full", "none")
#: "auto" verification is "full" (every header scanned, every shard's sha256 computed) up to
#: this many documents and this many shard bytes (all orders + probe): ~1 s per 10^5
#: documents and ~1 s per GB on a local disk. Above either, "quick": the O(1)-per-shard tail
#: check at start, and each shard's count and sha256 checked when it is first read.
FULL_VERIFY_MAX_DOCS = 200_000
FULL_VERIFY_MAX_BYTES = 1 << 30


def _tar_tail_ok(path: Path) -> str | None:
    """None if `path` ends like a complete tar (size a multiple of 512 and two zero blocks
    at the end, what every tar writer appends), else why not."""
    size = path.stat().st_size
    if size < 1024 or size % 512:
        return f"size {size} is not a whole number of 512-byte tar blocks"
    with open(path, "rb") as fh:
        fh.seek(size - 1024)
        if fh.read(1024).strip(b"\x00"):
            return "no end-of-archive marker"
    return None


def _total_bytes(root: Path, shards) -> int:
    total = 0
    for s in shards:
        with contextlib.suppress(OSError):
            total += (root / s.path).stat().st_size
    return total


def verify_prepared(manifest: Manifest, root: Path, level: str = "auto") -> str:
    """Check the shards a manifest lists before training starts (see GripIterableDataset).

    Returns the level applied ("full", "quick" or "none"). Raises ManifestError naming the
    first bad shard and the fix. Probe shards (small, read whole at setup) have their sha256
    checked at every level but "none"."""
    shards = [s for c in manifest.clusters for ss in c.shards.values() for s in ss]
    probe = [s for c in manifest.clusters for s in c.probe_shards]
    shards += probe
    if level == "none" or not shards:
        return "none" if level == "none" else "full"
    if level == "auto":
        small = (
            sum(s.n_docs for s in shards) <= FULL_VERIFY_MAX_DOCS
            and _total_bytes(root, shards) <= FULL_VERIFY_MAX_BYTES
        )
        level = "full" if small else "quick"
    fix = f"re-run `grip prepare --out {root}` (it rewrites every shard)"
    for s in shards:
        path = root / s.path
        try:
            why = _tar_tail_ok(path)
        except OSError as exc:
            why = f"unreadable ({exc})"
        if why is None and level == "full":
            n = len(shard_index(path))
            if n != s.n_docs:
                why = f"holds {n} documents but {root / 'manifest.json'} says {s.n_docs}"
        if why is not None:
            raise ManifestError(f"{path}: truncated or corrupt shard: {why}; {fix}")
    for s in shards if level == "full" else probe:
        check_shard_sha256(root, s)
    return level
