"""`manifest.json`: the index of a prepared corpus, written last by `grip prepare`.

The manifest is the only file training reads to learn what exists: per-cluster sizes,
geometry (sigma_k), static quality (Q_k), probe documents and the shard lists of each
selection order. It is written to `manifest.json.tmp` and renamed, so its presence means
every shard it lists was finished. `load_manifest` checks it before training starts and
raises `ManifestError` naming the file and the fix, instead of failing mid-run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from grip_loop.workdir import file_sha256

SCHEMA_VERSION = 2  # 2: shards carry a memory-mappable index `<shard>.idx.npy` (grip_loop.shards)
_EPS = 1e-9  # rounding slack on [0, 1] and [0, 10] scores
MANIFEST_NAME = "manifest.json"


class ManifestError(ValueError):
    """A prepared corpus is missing, stale or inconsistent. The message names the file and the fix."""


@dataclass
class ShardInfo:
    path: str  # relative to the prepared directory
    n_docs: int
    n_tokens: int
    # sha256 of the whole shard file, written by `grip prepare`; "" in manifests written
    # before checksums existed (then a change of the shard's bytes cannot be detected)
    sha256: str = ""

    def under(self, prefix: str | os.PathLike) -> ShardInfo:
        """The same shard with `prefix/` in front of its path."""
        return dataclasses.replace(self, path=str(Path(prefix) / self.path))


@dataclass
class ClusterInfo:
    id: int
    n_docs: int
    n_tokens: int
    mean_length: float
    sigma: float
    quality: float  # Q_k on [0, 1]: mean rubric score / 10
    quality_scores: dict[str, float] = field(default_factory=dict)  # per rubric dimension, 0-10
    probe_ids: list[str] = field(default_factory=list)
    probe_shards: list[ShardInfo] = field(default_factory=list)
    shards: dict[str, list[ShardInfo]] = field(default_factory=dict)  # order name -> shards
    examples: list[str] = field(default_factory=list)
    # A human-readable name: the --cluster-by value, or "<language>:<path prefix or top terms>"
    # for k-means / GEM clusters (grip_loop.naming). Empty in manifests written before names existed.
    name: str = ""
    # The probe's evaluation documents (a subset of probe_ids; the rest are its adaptation
    # documents), split once by `grip prepare`. Empty = a manifest without the split: only
    # `rap.eval_split: none` can probe it.
    eval_ids: list[str] = field(default_factory=list)
    # What the cluster card (`grip inspect --cluster K`) shows; empty in older manifests.
    # languages: share of each language among the members; top_terms: the most distinctive
    # identifiers of its most influential documents; influential: paths of its highest-GIS
    # documents (Geometric Influence Score, grip_loop.naming).
    languages: dict[str, float] = field(default_factory=dict)
    top_terms: list[str] = field(default_factory=list)
    influential: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """`name` when there is one, else "cluster <id>" (tables, charts, logs)."""
        return self.name or f"cluster {self.id}"


@dataclass
class Manifest:
    schema_version: int
    corpus_fingerprint: str
    tokenizer: dict  # path, vocab_size, eos_id, token_dtype, sha256
    encoder: dict  # name, dim, max_tokens, pooling
    k: int
    seed: int
    orders: list[str]
    clusters: list[ClusterInfo]
    config: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    # held-out evaluation shards (`heldout/<lang>-*.tar`, never trained on); absent in older manifests
    heldout: list[ShardInfo] = field(default_factory=list)

    @property
    def sizes(self) -> list[int]:
        return [c.n_docs for c in self.clusters]

    @property
    def names(self) -> list[str]:
        """Every cluster's label (its name, or "cluster <id>"), in id order."""
        return [c.label for c in self.clusters]

    @property
    def n_docs(self) -> int:
        return sum(self.sizes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "manifest") -> Manifest:
        try:
            clusters = [
                ClusterInfo(
                    **{
                        **c,
                        "probe_shards": [ShardInfo(**s) for s in c.get("probe_shards", [])],
                        "shards": {o: [ShardInfo(**s) for s in ss] for o, ss in c.get("shards", {}).items()},
                    }
                )
                for c in d["clusters"]
            ]
            heldout = [ShardInfo(**s) for s in d.get("heldout", [])]
            return cls(**{**d, "clusters": clusters, "heldout": heldout})
        except (KeyError, TypeError) as exc:
            raise ManifestError(
                f"{source}: malformed manifest ({type(exc).__name__}: {exc}); re-run `grip prepare`"
            ) from None

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `<directory>/manifest.json` atomically (temp file, fsync, rename)."""
        final = Path(directory) / MANIFEST_NAME
        tmp = final.with_name(MANIFEST_NAME + ".tmp")
        # what `json.dump(self.to_dict(), fh, indent=2)` writes, with each cluster turned into a
        # dict only as it is written: not a second copy of every cluster (K = 10^4: ~18 MB of JSON)
        d = asdict(dataclasses.replace(self, clusters=[], heldout=[]))
        d["clusters"], d["heldout"] = _AsDicts(self.clusters), _AsDicts(self.heldout)
        with open(tmp, "w") as fh:
            for chunk in json.JSONEncoder(indent=2).iterencode(d):
                fh.write(chunk)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        return final


class _AsDicts(list):
    """A list for `json`'s (pure-Python, indented) encoder whose items are `asdict` of the
    dataclasses given, made one at a time as the encoder reaches them."""

    def __init__(self, items: list) -> None:
        super().__init__()
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return (asdict(x) for x in self.items)


def load_manifest(directory: str | os.PathLike, *, check_files: bool = True) -> Manifest:
    """Read and validate `<directory>/manifest.json`.

    Checks the schema version, that cluster ids are 0..K-1, that each order's shard
    counts add up to the cluster's N_k, and (with `check_files`) that every listed shard
    exists and the tokenizer file is the one the shards were written with (sha256). Any failure raises ManifestError naming the file and saying to re-run prepare.
    """
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    fix = f"re-run `grip prepare --out {directory}`"
    if not path.is_file():
        partial = (
            " (a manifest.json.tmp exists: the run was interrupted)"
            if path.with_suffix(".json.tmp").exists()
            else ""
        )
        raise ManifestError(f"{path}: not found{partial}; {fix}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: unreadable JSON ({exc}); {fix}") from None
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version != SCHEMA_VERSION:
        raise ManifestError(
            f"{path}: schema version {version!r}, this grip-loop reads version {SCHEMA_VERSION}; {fix}"
        )
    _check_schema(raw, path, fix)
    m = Manifest.from_dict(raw, source=str(path))
    if m.k != len(m.clusters) or [c.id for c in m.clusters] != list(range(m.k)):
        raise ManifestError(f"{path}: k={m.k} but clusters are {[c.id for c in m.clusters]}; {fix}")
    for c in m.clusters:
        for order in m.orders:
            shards = c.shards.get(order)
            if shards is None:
                raise ManifestError(f"{path}: cluster {c.id} has no shards for order {order!r}; {fix}")
            n = sum(s.n_docs for s in shards)
            if n != c.n_docs:
                raise ManifestError(
                    f"{path}: cluster {c.id} order {order!r} lists {n} documents in its shards "
                    f"but n_docs={c.n_docs}; {fix}"
                )
        if check_files:
            for s in [s for ss in c.shards.values() for s in ss] + list(c.probe_shards):
                if not (directory / s.path).is_file():
                    raise ManifestError(f"{directory / s.path}: shard listed in {path} is missing; {fix}")
    if check_files:
        for s in m.heldout:
            if not (directory / s.path).is_file():
                raise ManifestError(
                    f"{directory / s.path}: held-out shard listed in {path} is missing; {fix}"
                )
        _check_tokenizer_file(m, directory, path, fix)
    return m


def _check_tokenizer_file(m: Manifest, directory: Path, path: Path, fix: str) -> None:
    """The tokenizer file the manifest names must be the one it was prepared with: a later,
    interrupted prepare run with other tokenizer settings rewrites tokenizer.json before it
    deletes the old manifest, and ids would then decode with the wrong vocabulary."""
    rel, sha = m.tokenizer.get("path"), m.tokenizer.get("sha256")
    if not rel or not sha:
        return  # a manifest without a tokenizer file (synthetic corpora)
    tok = directory / rel
    if not tok.is_file():
        raise ManifestError(f"{tok}: tokenizer listed in {path} is missing; {fix}")
    h = hashlib.sha256()
    with open(tok, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != sha:
        raise ManifestError(
            f"{tok}: sha256 {h.hexdigest()[:12]}... differs from the {sha[:12]}... recorded in {path} "
            f"(the tokenizer was rebuilt after these shards were written); {fix}"
        )


def check_tokenizer(manifest: Manifest, root: Path, expected: str) -> None:
    """ManifestError unless the prepared tokenizer is `expected` (a tokenizer.json path or its sha256)."""
    want = expected.lower() if _is_hex64(expected.lower()) else file_sha256(expected)
    have = manifest.tokenizer.get("sha256")
    if have != want:
        raise ManifestError(
            f"{root / MANIFEST_NAME}: prepared with tokenizer sha256 {have}, but the model expects "
            f"{want} ({expected}); re-run `grip prepare --out {root}` with `tokenizer_path: {expected}`, "
            "or train with the prepared tokenizer"
        )


def _check_schema(d: dict, path: Path, fix: str) -> None:
    """Types and ranges of every field, so a hand-edited or damaged manifest fails here with
    the field named, not later with a TypeError deep inside training."""

    def need(ok: bool, where: str, what: str) -> None:
        if not ok:
            raise ManifestError(f"{path}: {where} must be {what}; {fix}")

    def is_int(v, lo: int = 0) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= lo

    def is_num(v) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

    def str_list(v) -> bool:
        return isinstance(v, list) and all(isinstance(x, str) for x in v)

    def shard_list(v, where: str) -> None:
        need(isinstance(v, list), where, "a list of shards")
        for i, sh in enumerate(v):
            w = f"{where}[{i}]"
            need(isinstance(sh, dict), w, "an object")
            p = sh.get("path")
            need(
                isinstance(p, str) and p != "" and not Path(p).is_absolute() and ".." not in Path(p).parts,
                f"{w}.path",
                "a relative path inside the prepared directory",
            )
            need(is_int(sh.get("n_docs")), f"{w}.n_docs", "an integer >= 0")
            need(is_int(sh.get("n_tokens")), f"{w}.n_tokens", "an integer >= 0")
            sha = sh.get("sha256", "")
            need(
                isinstance(sha, str) and (sha == "" or _is_hex64(sha)),
                f"{w}.sha256",
                "64 hex digits (or absent)",
            )

    need(isinstance(d.get("corpus_fingerprint"), str), "corpus_fingerprint", "a string")
    tok = d.get("tokenizer")
    need(isinstance(tok, dict), "tokenizer", "an object")
    need(is_int(tok.get("vocab_size"), 1), "tokenizer.vocab_size", "an integer >= 1")
    need(is_int(tok.get("eos_id")), "tokenizer.eos_id", "an integer >= 0")
    need(tok.get("token_dtype") in ("uint16", "uint32"), "tokenizer.token_dtype", "'uint16' or 'uint32'")
    need(
        tok["eos_id"] < tok["vocab_size"],
        "tokenizer.eos_id",
        f"< tokenizer.vocab_size ({tok['eos_id']} >= {tok['vocab_size']})",
    )
    need(
        tok["token_dtype"] == "uint32" or tok["vocab_size"] <= 1 << 16,
        "tokenizer.vocab_size",
        f"at most 65536 with token_dtype uint16 (got {tok['vocab_size']})",
    )
    for key in ("path", "sha256"):
        need(tok.get(key) is None or isinstance(tok.get(key), str), f"tokenizer.{key}", "a string")
    need(isinstance(d.get("encoder"), dict), "encoder", "an object")
    need(is_int(d.get("k"), 1), "k", "an integer >= 1")
    need(is_int(d.get("seed"), -(1 << 63)), "seed", "an integer")
    need(str_list(d.get("orders")) and len(d["orders"]) > 0, "orders", "a non-empty list of names")
    for key in ("config", "stats"):
        need(isinstance(d.get(key, {}), dict), key, "an object")
    clusters = d.get("clusters")
    need(isinstance(clusters, list), "clusters", "a list")
    for i, c in enumerate(clusters):
        w = f"clusters[{i}]"
        need(isinstance(c, dict), w, "an object")
        for key in ("id", "n_docs", "n_tokens"):
            need(is_int(c.get(key)), f"{w}.{key}", "an integer >= 0")
        for key in ("mean_length", "sigma", "quality"):
            need(is_num(c.get(key)), f"{w}.{key}", "a finite number")
        # ranges: sigma_k is the RMS distance of unit vectors to their centroid (Eq. 3),
        # Q_k a mean rubric score / 10; a value outside would silently skew every budget
        need(c["mean_length"] >= 0, f"{w}.mean_length", f"a number >= 0 (got {c['mean_length']})")
        need(0 <= c["sigma"] <= 2, f"{w}.sigma", f"a number in [0, 2] (got {c['sigma']})")
        need(-_EPS <= c["quality"] <= 1 + _EPS, f"{w}.quality", f"a number in [0, 1] (got {c['quality']})")
        qs = c.get("quality_scores", {})
        need(isinstance(qs, dict) and all(is_num(v) for v in qs.values()), f"{w}.quality_scores", "numbers")
        for dim, v in qs.items():
            need(-_EPS <= v <= 10 + _EPS, f"{w}.quality_scores[{dim!r}]", f"a score in [0, 10] (got {v})")
        for key in ("probe_ids", "examples", "eval_ids", "top_terms", "influential"):
            need(str_list(c.get(key, [])), f"{w}.{key}", "a list of strings")
        need(isinstance(c.get("name", ""), str), f"{w}.name", "a string")
        langs = c.get("languages", {})
        need(
            isinstance(langs, dict) and all(is_num(v) and 0 <= v <= 1 + _EPS for v in langs.values()),
            f"{w}.languages",
            "an object of language -> share in [0, 1]",
        )
        need(
            set(c.get("eval_ids", [])) <= set(c.get("probe_ids", [])),
            f"{w}.eval_ids",
            "a subset of its probe_ids",
        )
        shard_list(c.get("probe_shards", []), f"{w}.probe_shards")
        shards = c.get("shards", {})
        need(isinstance(shards, dict), f"{w}.shards", "an object of order -> shards")
        for order, ss in shards.items():
            shard_list(ss, f"{w}.shards[{order!r}]")
    shard_list(d.get("heldout", []), "heldout")


def _is_hex64(s: str) -> bool:
    return len(s) == 64 and all(c in "0123456789abcdef" for c in s)


def check_shard_sha256(root: str | os.PathLike, shard: ShardInfo) -> None:
    """ManifestError naming the shard when its bytes are not the ones `grip prepare` wrote
    (the sha256 recorded in the manifest). A shard without a recorded sha256 passes."""
    if not shard.sha256:
        return
    root = Path(root)
    path = root / shard.path
    try:
        have = file_sha256(path)
    except OSError as exc:
        raise ManifestError(f"{path}: unreadable shard ({exc}); re-run `grip prepare --out {root}`") from exc
    if have != shard.sha256:
        raise ManifestError(
            f"{path}: content sha256 {have[:16]}... differs from the {shard.sha256[:16]}... recorded in "
            f"{root / MANIFEST_NAME} (the shard's bytes changed after `grip prepare` wrote it: disk or "
            f"copy damage, or an edit); re-run `grip prepare --out {root}` (it rewrites every shard)"
        )


_WARNED_NO_SHA: set[str] = set()


def warn_if_unchecksummed(m: Manifest, root: str | os.PathLike) -> bool:
    """Warn (once per prepared directory and process) when the manifest records no shard
    checksums (written before they existed). Returns True if any shard lacks one."""
    shards = [s for c in m.clusters for ss in c.shards.values() for s in ss]
    shards += [s for c in m.clusters for s in c.probe_shards] + list(m.heldout)
    missing = sum(1 for s in shards if not s.sha256)
    if not missing:
        return False
    key = str(Path(root).resolve())
    if key not in _WARNED_NO_SHA:
        _WARNED_NO_SHA.add(key)
        warnings.warn(
            f"{Path(root) / MANIFEST_NAME}: {missing} of {len(shards)} shards have no recorded sha256 "
            "(prepared by an older grip-loop), so a change of their bytes cannot be detected; re-run "
            f"`grip prepare --out {root}` to record them",
            UserWarning,
            stacklevel=3,
        )
    return True


def prepared_fingerprint(m: Manifest) -> str:
    """sha256 identifying a prepared corpus: its source fingerprint, tokenizer, clusters and
    every shard (paths, counts and content sha256). Moving the directory or re-running an
    interrupted `grip prepare` to the same result keeps it; preparing again with other
    settings or another corpus changes it (`config` and `stats` are not part of it)."""
    d = m.to_dict()
    ident = {
        "schema_version": d["schema_version"],
        "corpus_fingerprint": d["corpus_fingerprint"],
        "tokenizer": {k: v for k, v in d["tokenizer"].items() if k != "path"},
        "k": d["k"],
        "seed": d["seed"],
        "orders": d["orders"],
        "clusters": d["clusters"],
        "heldout": d["heldout"],
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def token_range_error(path, where: str, token: int, vocab: int, root) -> ManifestError:
    """The error for a token id a prepared shard must not hold (>= the tokenizer's vocabulary
    recorded in the manifest): the data is damaged, not the model's configuration."""
    root = Path(root)
    return ManifestError(
        f"{path}: {where} holds token id {token}, but the tokenizer recorded in {root / MANIFEST_NAME} "
        f"has {vocab} tokens (tokenizer.vocab_size): the shard or the manifest is damaged (this is "
        f"not model.vocab_size); re-run `grip prepare --out {root}`"
    )
