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
import hashlib
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
    token_range_error,
)
from grip_loop.workdir import DiskSpaceError, atomic_npy, disk_full

TOKEN_DTYPES = ("uint16", "uint32")
#: A shard rolls over at this many bytes (tokens, text, metadata and tar headers) if its
#: document count has not made it roll over first.
MAX_SHARD_BYTES = 256 << 20


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


_BLOCK, _RECORD = tarfile.BLOCKSIZE, tarfile.RECORDSIZE
_ZEROS = bytes(_RECORD)
# the fields of a USTAR header after name (100), mode, uid, gid (8 each); then size, mtime
# (12 each), the checksum (8), the type flag; then what follows the type flag: the link name
# (100), the magic, uname and gname (32 each), devmajor and devminor (8 each: NULs for a
# regular file, as tarfile writes them in CPython 3.10.13-3.13.0), the prefix (155), padding to 512
_MODE_UID_GID = b"0000444\x00" + b"0000000\x00" * 2
_MTIME = b"00000000000\x00"
_TAIL = tarfile.REGTYPE + bytes(100) + tarfile.POSIX_MAGIC + bytes(32 + 32 + 8 + 8 + 155 + 12)
_TAIL_SUM = sum(_TAIL) + 8 * 32  # the checksum counts its own field as 8 spaces


def _header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header that `tarfile` writes for `TarInfo(name)` with this size, mode
    0o444 and its defaults (mtime 0, uid/gid 0, no user names): built directly, ~30x faster
    than `tarfile.TarInfo.tobuf`; tarfile itself builds the rare names this does not cover."""
    raw = name.encode("ascii", "surrogateescape") if name.isascii() else None
    if raw is None or len(raw) > 100 or size >= 8**11:  # long names, non-ASCII, >= 8 GiB
        info = tarfile.TarInfo(name)
        info.size, info.mode = size, 0o444
        return info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")
    head = raw.ljust(100, b"\x00") + _MODE_UID_GID + b"%011o\x00" % size + _MTIME
    chksum = sum(head) + _TAIL_SUM
    return head + b"%06o\x00 " % chksum + _TAIL


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
    `first`: the number NNNNNN of the first shard (a writer that continues another's stream).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        token_dtype: str = "uint16",
        prefix: str = "shard",
        max_docs: int = 10_000,
        max_bytes: int = MAX_SHARD_BYTES,
        first: int = 0,
    ) -> None:
        if token_dtype not in TOKEN_DTYPES:
            raise ValueError(f"token_dtype: must be one of {TOKEN_DTYPES}, got {token_dtype!r}")
        if max_docs < 1 or max_bytes < 1:
            raise ValueError("max_docs and max_bytes must be >= 1")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(token_dtype).newbyteorder("<")
        self.prefix, self.max_docs, self.max_bytes, self.first = prefix, max_docs, max_bytes, first
        self.finished: list[ShardInfo] = []
        self._fh = None
        self._tmp: Path | None = None
        self._sha = hashlib.sha256()
        self._offset = self._docs = self._tokens = self._bytes = 0
        self._rows: list[tuple[int, int]] = []

    def _open(self) -> None:
        name = f"{self.prefix}-{self.first + len(self.finished):06d}.tar"
        self._tmp = self.directory / (name + ".tmp")
        self._fh = open(self._tmp, "wb")  # noqa: SIM115 (closed in _finish / abort)
        self._sha = hashlib.sha256()
        self._offset = self._docs = self._tokens = self._bytes = 0
        self._rows = []

    @contextlib.contextmanager
    def _disk_full_is_clear(self):
        try:
            yield
        except OSError as exc:
            if exc.errno == errno.ENOSPC and not isinstance(exc, DiskSpaceError):
                raise disk_full(self._tmp.with_suffix("")) from exc
            raise

    def _put(self, data: bytes) -> None:
        self._fh.write(data)
        self._sha.update(data)
        self._offset += len(data)

    def _finish(self) -> None:
        if self._fh is None:
            return
        with self._disk_full_is_clear():
            # the end of the archive, as tarfile writes it: two zero blocks, then zeros up to
            # a whole record of 20 blocks
            self._put(_ZEROS[: 2 * _BLOCK])
            if self._offset % _RECORD:
                self._put(_ZEROS[: _RECORD - self._offset % _RECORD])
            self._fh.flush()
            os.fsync(self._fh.fileno())  # on disk before the manifest that lists it
            self._fh.close()
        final = self._tmp.with_suffix("")  # drop ".tmp"
        atomic_npy(index_path(final), np.asarray(self._rows, np.int64).reshape(-1, 2))
        os.replace(self._tmp, final)
        sha = self._sha.hexdigest()  # of every byte written, as it was written
        self.finished.append(ShardInfo(path=final.name, n_docs=self._docs, n_tokens=self._tokens, sha256=sha))
        self._fh = self._tmp = None

    def write(self, key: str, tokens: np.ndarray, text: str | bytes, meta: dict | bytes) -> None:
        """Add one document. `text`: a str, or its UTF-8 bytes; `meta`: a dict, or its JSON
        (`json.dumps(meta, sort_keys=True)`) as bytes."""
        tokens = np.asarray(tokens)
        if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"tokens: ids out of range for {self.dtype.name}")
        self.write_encoded(
            key,
            tokens.astype(self.dtype, copy=False).tobytes(),
            text.encode("utf-8") if isinstance(text, str) else text,
            json.dumps(meta, sort_keys=True).encode("utf-8") if isinstance(meta, dict) else meta,
        )

    def write_encoded(self, key: str, ids: bytes, txt: bytes, js: bytes) -> None:
        """`write` for a document already encoded: its token ids as little-endian bytes of the
        writer's dtype, its UTF-8 text and its metadata JSON (the write stage's hot path)."""
        if not key or "." in key or "/" in key:
            raise ValueError(f"key: must be non-empty without '.' or '/', got {key!r}")
        if len(ids) % self.dtype.itemsize:
            raise ValueError(f"ids: {len(ids)} bytes is not a whole number of {self.dtype.name} tokens")
        if self._fh is None:
            self._open()
        # the document's three members as tarfile appends them (header, data, zeros up to a
        # whole block), in one write
        pieces = []
        for ext, payload in (("ids", ids), ("txt", txt), ("json", js)):
            pieces += (_header(f"{key}.{ext}", len(payload)), payload, _ZEROS[: -len(payload) % _BLOCK])
        self._rows.append((self._offset + _BLOCK, len(ids)))  # the .ids data follows its header
        with self._disk_full_is_clear():
            self._put(b"".join(pieces))
        self._docs += 1
        self._tokens += len(ids) // self.dtype.itemsize
        self._bytes += len(ids) + len(txt) + len(js) + 3 * 512
        if self._docs >= self.max_docs or self._bytes >= self.max_bytes:
            self._finish()

    def close(self) -> list[ShardInfo]:
        self._finish()
        return list(self.finished)

    def abort(self) -> None:
        """Drop the shard being written (its temp file) without publishing it."""
        if self._fh is not None:
            with contextlib.suppress(OSError):  # closing flushes the buffer: a full disk again
                self._fh.close()
            self._tmp.unlink(missing_ok=True)
            self._fh = self._tmp = None

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
