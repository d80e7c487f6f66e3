"""Corpus readers: a directory of source files, JSONL, or existing WebDataset shards -> documents.

Every reader yields `Document(id, text, lang, path)` in a deterministic order (sorted file
names, file order inside JSONL and tar files), so document index i means the same
document on every run and every rank. A bad input never stops a run: binary files,
undecodable bytes, empty documents, malformed JSONL lines, oversized files, unreadable
files, dangling or looping symlinks, FIFOs and devices, names that are not UTF-8 and
strings that are not valid Unicode are skipped and counted in `ReadStats`, and
`grip prepare` prints the counts as one warning. docs/reliability.md lists every case.

What the reader promises the later stages:
* it never leaves the corpus directory: a symlink whose target (after every link in a
  chain) lies outside it is skipped and counted as `outside_root`, unless
  `follow_symlinks_outside`; symlinked directories inside it are not descended (their
  target is read under its own name);
* every string of a document (text, id, lang, path, string fields) encodes as UTF-8;
* one document costs at most about `max_file_bytes` (x `JSONL_LINE_FACTOR` for a JSONL
  line) of memory, decompressed, whatever the compression ratio of the file;
* ids are unique: a missing, null, empty or non-string id becomes `file:line` (`shard/key`
  for WebDataset), an integer id its decimal string, and a repeated id gets a suffix
  (`#2`, `#3`, ...), counted in `ReadStats.duplicate_ids`.

Held-out evaluation data must not leak into training: `grip_loop.heldout.humaneval_hashes()`
(re-exported here) returns the content hashes of the HumanEval problems, and documents whose
hash matches are skipped. Tar files are read with `grip_loop._tario` (bounded memory).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import stat
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from grip_loop import readers
from grip_loop._checks import check_number
from grip_loop._tario import (  # noqa: F401  (MAX_TAR_HEADER_BYTES: re-exported)
    _READ_ERRORS,
    MAX_TAR_HEADER_BYTES,
    _BoundedTarInfo,
    _decompressed,
    _TarHeaderTooLarge,
)
from grip_loop.heldout import content_hash, humaneval_hashes, humaneval_path  # noqa: F401  (re-exported)
from grip_loop.idset import SeenIds

#: Bumped when the reader changes what it yields for some input, so `grip prepare` redoes its
#: ingest stage instead of resuming from documents an older reader produced.
READER_VERSION = 3  # 3: Parquet and Arrow files are read (grip_loop.readers)

#: File extension -> language. Files with other extensions are ignored by the directory
#: reader (counted as `skipped_extension`), so build dirs full of .o/.pyc files cost nothing.
EXTENSION_LANG: dict[str, str] = {
    ".py": "python",
    ".pyi": "python",
    ".c": "c",
    ".h": "c",
    ".cc": "cpp",
    ".cpp": "cpp",
    ".hpp": "cpp",
    ".cu": "cuda",
    ".rs": "rust",
    ".go": "go",
    ".java": "java",
    ".kt": "kotlin",
    ".scala": "scala",
    ".js": "javascript",
    ".mjs": "javascript",
    ".ts": "typescript",
    ".tsx": "typescript",
    ".rb": "ruby",
    ".php": "php",
    ".cs": "csharp",
    ".swift": "swift",
    ".sh": "shell",
    ".lua": "lua",
    ".jl": "julia",
    ".r": "r",
    ".sql": "sql",
    ".md": "markdown",
    ".rst": "rst",
    ".txt": "text",
}


@dataclass(frozen=True)
class Document:
    id: str  # stable identifier: relative path, JSONL `id` (or file:line), or shard key
    text: str
    lang: str
    path: str  # where it came from (for inspection)
    fields: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    """String-valued metadata: every top-level string field of a JSONL record or a shard's
    `.json` (except `text`), and `lang` for source files. `grip prepare --cluster-by FIELD`
    reads its clusters from here."""

    def field_value(self, name: str) -> str | None:
        """The document's value of `name`, None when it has none (source files: `lang` only)."""
        return self.fields.get(name)


@dataclass
class ReadStats:
    """Counters of what was read and what was skipped (and why)."""

    read: int = 0
    skipped: Counter = field(default_factory=Counter)
    duplicate_ids: int = 0
    """Documents read whose id was already taken: they got a suffix (`#2`, `#3`, ...)."""

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def summary(self) -> str:
        parts = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
        dup = f"; {self.duplicate_ids} duplicate ids made unique" if self.duplicate_ids else ""
        return (
            f"read {self.read} documents; skipped {sum(self.skipped.values())}"
            + (f" ({parts})" if parts else "")
            + dup
        )

    def to_dict(self) -> dict:
        return {
            "read": self.read,
            "skipped": dict(sorted(self.skipped.items())),
            "duplicate_ids": self.duplicate_ids,
        }


#: A JSONL line may be this many times `max_file_bytes` (JSON escapes grow a text up to 6x;
#: the rest is room for metadata). A longer line is skipped, read in pieces and never held whole.
JSONL_LINE_FACTOR = 8


def _decode(raw: bytes) -> tuple[str | None, str | None]:
    """(text, None) or (None, skip reason). NUL bytes mark binaries (what git and grep use)."""
    if b"\x00" in raw[:8192]:
        return None, "binary"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "undecodable"
    if not text.strip():
        return None, "empty"
    return text, None


def _encodable(s: str) -> bool:
    """True when `s` is valid Unicode: no lone surrogate (from a JSON "\ud800" escape, or a
    file or member name that is not UTF-8, decoded by the os with surrogateescape)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(s: object) -> str:
    """`str(s)` with lone surrogates escaped (`\udcff`): safe to print on a strict UTF-8 stdout."""
    return str(s).encode("utf-8", "backslashreplace").decode("utf-8")


def _within(path: str, root: str) -> bool:
    return path == root or os.path.commonpath([path, root]) == root


def _id(value, default: str) -> str:
    """A document id: a non-blank string or an integer as given; anything else (null, missing,
    "", a float, a bool, a list) gets the default, which names the file and line or member."""
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return default


def _str_or(value, default: str) -> str:
    return value if isinstance(value, str) and value.strip() else default


@dataclass
class CorpusReader:
    """Reads `src`: a directory (source files, .jsonl and .tar shards, either compressed with gzip,
    bzip2 or xz: .jsonl.gz, .tar.gz, .tgz, ...), or one such file.

    `max_file_bytes` skips huge generated files (minified JS, data dumps) before reading
    them, and bounds what one document may cost in memory in every format (a JSONL line,
    a shard member, decompressed); `exclude` is a set of `content_hash` values to drop
    (HumanEval). Symlinks that lead out of the corpus directory are skipped and counted as
    `outside_root` unless `follow_symlinks_outside`.
    """

    src: str | os.PathLike
    max_file_bytes: int = 1 << 20
    exclude: frozenset[str] = frozenset()
    follow_symlinks_outside: bool = False
    text_column: str = "text"
    """Parquet / Arrow inputs: the column holding the document text (grip_loop.readers)."""
    scratch_dir: str | os.PathLike | None = None
    """Where the ids seen so far spill to a memory-mapped file (`grip_loop.idset`); None: in memory."""
    stats: ReadStats = field(default_factory=ReadStats)

    def __post_init__(self) -> None:
        self.src = Path(self.src)
        if not self.src.exists():
            raise ValueError(
                f"corpus: {printable(self.src)} does not exist; pass a directory, a .jsonl file or a .tar shard"
            )
        check_number("max_file_bytes", self.max_file_bytes, 0, open_lo=True)

    def __iter__(self) -> Iterator[Document]:
        seen = SeenIds(self.scratch_dir)  # ~8 bytes an id (grip_loop.idset)
        next_suffix: dict[str, int] = {}
        try:
            for doc in self._raw():
                if self.exclude and content_hash(doc.text) in self.exclude:
                    self.stats.skip("held_out")
                    continue
                if not seen.add(doc.id):  # the first keeps its id; later ones get "#2", "#3", ...
                    n = next_suffix.get(doc.id, 2)
                    while not seen.add(f"{doc.id}#{n}"):
                        n += 1
                    next_suffix[doc.id] = n + 1
                    doc = dataclasses.replace(doc, id=f"{doc.id}#{n}")
                    self.stats.duplicate_ids += 1
                self.stats.read += 1
                yield doc
        finally:
            seen.close()

    # -- which files --------------------------------------------------------------------

    def _raw(self) -> Iterator[Document]:
        root = os.path.realpath(self.src)  # the corpus given as a link: its root is the target
        if not os.path.isdir(root):
            try:
                regular = stat.S_ISREG(os.stat(root).st_mode)
            except OSError:
                regular = False
            if not regular:  # a FIFO or a device given as the corpus: never opened
                self.stats.skip("not_regular")
                return
            yield from self._file(root, self.src.name)
            return
        # A walk in sorted order (the order of sorted(rglob("*"))), with an explicit stack:
        # no recursion limit on deep trees. Each real directory is walked once.
        visited = {root}
        stack = [(root, "", iter(self._listdir(root)))]
        while stack:
            real_dir, rel_dir, entries = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                continue
            rel, path = rel_dir + entry.name, os.path.join(real_dir, entry.name)
            try:
                if entry.is_symlink():
                    target = self._link_target(path, root)
                    if target is None:
                        continue
                    if os.path.isdir(target):
                        # A link to a directory inside the root is not descended: its target is
                        # walked under its own name (and a link up would be a loop). One out of
                        # the root is, when following is allowed, once.
                        if (
                            self.follow_symlinks_outside
                            and target not in visited
                            and not _within(target, root)
                        ):
                            visited.add(target)
                            stack.append((target, rel + "/", iter(self._listdir(target))))
                        continue
                    if not stat.S_ISREG(os.stat(target).st_mode):
                        self.stats.skip("not_regular")
                        continue
                    yield from self._file(target, rel)
                elif entry.is_dir(follow_symlinks=False):
                    if path not in visited:
                        visited.add(path)
                        stack.append((path, rel + "/", iter(self._listdir(path))))
                elif entry.is_file(follow_symlinks=False):
                    yield from self._file(path, rel)
                else:  # FIFO, socket, device: opening one can block or have side effects
                    self.stats.skip("not_regular")
            except OSError:
                self.stats.skip("unreadable")

    def _shown(self, rel: str) -> str:
        return printable(self.src / rel if self.src.is_dir() else self.src)

    def _listdir(self, path: str) -> list[os.DirEntry]:
        try:
            with os.scandir(path) as it:
                return sorted(it, key=lambda e: e.name)
        except OSError:
            self.stats.skip("unreadable")
            return []

    def _link_target(self, path: str, root: str) -> str | None:
        """Where a symlink (or a chain of them) ends, or None (counted) when it must not be read."""
        target = os.path.realpath(path)
        try:
            os.stat(target)
        except OSError:  # dangling, or a loop (ELOOP)
            self.stats.skip("broken_link")
            return None
        if not self.follow_symlinks_outside and not _within(target, root):
            self.stats.skip("outside_root")
            return None
        return target

    def _file(self, real: str, rel: str) -> Iterator[Document]:
        """`real`: the resolved path to open; `rel`: the name under the root (ids and paths)."""
        name = rel.rpartition("/")[2].lower()
        if name.endswith((".jsonl", ".jsonl.gz", ".jsonl.bz2", ".jsonl.xz")):
            read = self._jsonl
        elif name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
            read = self._tar
        elif name.endswith(readers.TABLE_SUFFIXES):  # Parquet, HF datasets' Arrow files
            read = functools.partial(readers.read_table, self)
        elif os.path.splitext(name)[1] in EXTENSION_LANG:
            read = self._source
        else:
            self.stats.skip("extension")
            return
        if not _encodable(rel):  # a name that is not UTF-8: no id or path could hold it
            self.stats.skip("bad_name")
            return
        # O_NOFOLLOW: `real` is resolved, so a link here was swapped in after the check;
        # O_NONBLOCK: a FIFO swapped in does not block the open (and is refused below).
        flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(real, flags)
        except OSError:
            self.stats.skip("unreadable")
            return
        with open(fd, "rb") as fh:
            try:
                st = os.fstat(fd)
            except OSError:
                self.stats.skip("unreadable")
                return
            if not stat.S_ISREG(st.st_mode):
                self.stats.skip("not_regular")
                return
            yield from read(fh, rel, st.st_size)

    # -- formats ------------------------------------------------------------------------

    def _source(self, fh, rel: str, size: int) -> Iterator[Document]:
        if size > self.max_file_bytes:  # checked before reading: a 50 MB file is never read
            self.stats.skip("too_large")
            return
        try:
            raw = fh.read(self.max_file_bytes + 1)  # bounded even if the file grew since
        except OSError:
            self.stats.skip("unreadable")
            return
        if len(raw) > self.max_file_bytes:
            self.stats.skip("too_large")
            return
        text, why = _decode(raw)
        if why:
            self.stats.skip(why)
            return
        lang = EXTENSION_LANG[os.path.splitext(rel.lower())[1]]
        yield Document(id=rel, text=text, lang=lang, path=rel, fields={"lang": lang})

    def _jsonl(self, fh, rel: str, size: int) -> Iterator[Document]:
        limit = JSONL_LINE_FACTOR * self.max_file_bytes
        lineno = 0
        try:
            src = _decompressed(fh)
            while True:
                line = src.readline(limit + 1)  # never more than limit + 1 bytes in memory
                if not line:
                    break
                lineno += 1
                if len(line) > limit:  # the rest of the line is read in pieces and dropped
                    while not line.endswith(b"\n"):
                        line = src.readline(limit + 1)
                        if not line:
                            break
                    self.stats.skip("too_large")
                    continue
                if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark
                    line = line[3:]
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    text = rec["text"]
                except (ValueError, RecursionError, KeyError, TypeError, IndexError):
                    # ValueError: not JSON, not UTF-8, an int over the digit limit;
                    # RecursionError: nested too deep; the others: no "text" in a dict
                    self.stats.skip("bad_jsonl_line")
                    continue
                doc = self._document(text, rec, "id", f"{rel}:{lineno}", from_bytes=False)
                if doc is not None:
                    yield doc
        except _READ_ERRORS as exc:  # truncated or corrupt gzip, permission denied
            self.stats.skip("unreadable")
            print(f"warning: {self._shown(rel)}: stopped reading at line {lineno} ({printable(exc)})")

    def _tar(self, fh, rel: str, size: int) -> Iterator[Document]:
        """WebDataset shards: samples grouped by key; the text is `.txt` (or `.text`), meta `.json`.

        A tar file that cannot be read to its end keeps the samples read before the damage.
        """
        cur, parts = None, {}
        try:
            with tarfile.open(fileobj=_decompressed(fh), mode="r|", tarinfo=_BoundedTarInfo) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    base = member.name.rpartition("/")[2]
                    key, _, ext = base.partition(".")
                    if cur is not None and key != cur:
                        done, done_parts, cur, parts = cur, parts, None, {}
                        yield from self._sample(done, done_parts, rel)
                    cur = key
                    if ext in ("txt", "text", "json"):
                        if member.size > self.max_file_bytes:
                            parts[ext] = None  # too large: never read into memory
                        else:
                            parts[ext] = tar.extractfile(member).read(member.size)
                    tar.members = []
        except _TarHeaderTooLarge as exc:
            self.stats.skip("too_large")
            print(f"warning: {self._shown(rel)}: stopped reading ({exc})")
        except _READ_ERRORS as exc:
            self.stats.skip("unreadable")
            print(f"warning: {self._shown(rel)}: stopped reading ({printable(exc)})")
        if cur is not None:
            yield from self._sample(cur, parts, rel)

    def _sample(self, key: str, parts: dict[str, bytes | None], rel: str) -> Iterable[Document]:
        if not _encodable(key):  # a member name that is not UTF-8
            self.stats.skip("bad_name")
            return
        if any(v is None for v in parts.values()):
            self.stats.skip("too_large")
            return
        raw = parts.get("txt", parts.get("text"))
        if raw is None:
            self.stats.skip("no_text")
            return
        text, why = _decode(raw)
        if why:
            self.stats.skip(why)
            return
        try:
            meta = json.loads(parts["json"]) if "json" in parts else {}
        except (ValueError, RecursionError):
            meta = {}
        meta = meta if isinstance(meta, dict) else {}
        doc = self._document(text, meta, "doc_id", f"{rel}/{key}", from_bytes=True)
        if doc is not None:
            yield doc

    def _document(self, text, rec: dict, id_key: str, default: str, *, from_bytes: bool) -> Document | None:
        """A Document from a JSONL record or a shard's metadata, or None (counted).

        Every string that reaches a later stage (text, id, lang, path, the string fields and
        their names) is valid Unicode: a lone surrogate anywhere skips the document.
        """
        if not from_bytes:  # JSONL text: the checks _decode makes on bytes
            if not isinstance(text, str) or not text.strip():
                self.stats.skip("empty")
                return None
            try:
                n_bytes = len(text.encode("utf-8"))
            except UnicodeEncodeError:  # a lone surrogate ("\ud800" in the JSON)
                self.stats.skip("undecodable")
                return None
            if n_bytes > self.max_file_bytes:
                self.stats.skip("too_large")
                return None
            if "\x00" in text[:8192]:
                self.stats.skip("binary")
                return None
        fields = _string_fields(rec)
        if not all(_encodable(k) and _encodable(v) for k, v in fields.items()):
            self.stats.skip("bad_metadata")
            return None
        return Document(
            id=_id(rec.get(id_key), default),
            text=text,
            lang=_str_or(rec.get("lang"), "unknown"),
            path=_str_or(rec.get("path"), default),
            fields=fields,
        )


def _string_fields(rec) -> dict[str, str]:
    """Top-level string values of a record (the document's own text excepted)."""
    if not isinstance(rec, dict):
        return {}
    return {str(k): v for k, v in rec.items() if isinstance(v, str) and k not in ("text",)}


def corpus_fingerprint(docs: Iterable[Document]) -> str:
    """sha256 over (id, text) in reading order: changes iff the ordered corpus changes."""
    h = hashlib.sha256()
    for d in docs:
        h.update(d.id.encode("utf-8", "surrogatepass") + b"\x00")
        h.update(hashlib.sha256(d.text.encode("utf-8", "surrogatepass")).digest())
    return h.hexdigest()
