"""`grip prepare`: corpus -> tokenizer, embeddings, clusters, probe, quality, ordered shards, manifest.

Stages (each resumable; outputs under `<out>/work/` are written to a temp name, fsynced and
renamed, and carry a key of the config that produced them, so a re-run skips finished stages
and redoes a stage whose inputs changed; a resume checks each stage file against its record
(size, checksum, shape) and redoes a damaged stage with a printed note; one run at a time holds
`<out>/.lock`, see `grip_loop.workdir`):

1. ingest    read the corpus (`grip_loop.corpus`), drop held-out HumanEval copies -> document parts
             work/docs/part-*.{txt,meta.jsonl,idx.npy} (`grip_loop.docstore`; nothing kept in memory)
2. tokenize  load or train the byte-level BPE (on a bounded seeded sample), token ids and l(x)
             -> tokenizer/, work/tokens/part-*.{ids,offsets}.npy (per part: resumable, data-parallel)
3. embed     mean-pooled, L2-normalised encoder embeddings (or `encoder.kind: hashed`)
             -> work/embeddings.npy (memmap, resumable per block, data-parallel under torchrun)
4. cluster   spherical k-means or GEM (`cluster.method`) on a sample, assign all (streamed)
                                                                      -> centroids.npy, work/labels.npy;
             each document's Geometric Influence Score, cluster names  -> stats/gis.npy
5. geometry  sigma_k (Eq. 3), Neyman probe (Eq. 4, with a per-cluster floor), kNN density (Eq. 9;
             approximate above `knn_approx_above` members, recall logged),
             P_select (Eq. 10) and the Efraimidis–Spirakis order of each requested order
6. judge     four rubric scores of every probe document -> Q_k on [0, 1]
7. write     shards/<order>/cluster-KKKKK/shard-*.tar in order, probe/cluster-KKKKK-*.tar, and
             manifest.json last (the old manifest is removed before any shard is rewritten)

Randomness: one seed. Cluster k's orders share the same uniform draws (common random
numbers: "grip", "diversity" and "random" differ only by their weights, which is what an
ablation should compare); the probe draws from its own stream, uniformly inside the cluster,
so Q_k and RAP see a representative sample, not the density-biased head of the order. The
probe's documents alternate along that draw between *adaptation* documents (they stay in the
training shards) and *evaluation* documents (`ClusterInfo.eval_ids`: written only to the probe
shard, never trained on, unless `probe_eval_in_training`), so the probe measures how learnable a
cluster is on text the model has not memorised. N_k counts training documents.

Clusters: spherical k-means (`k`), GEM (`cluster.method: gem`: a balanced vMF mixture distilled
to a linear student, `grip_loop.cluster.fit_gem`), or one per distinct value of a document field
(`cluster_by`: `grip prepare --cluster-by lang`), named either way (`ClusterInfo.name`, from the
most influential documents by GIS; see `grip_loop.naming`).

Held-out slice: `heldout_fraction` of each language's documents (a seeded draw per language,
so every language with enough files is represented) is removed before clustering and never
reaches a training or probe shard. Those documents are written to `heldout/<lang>-*.tar`
(same shard format; meta carries `lang` and the nearest centroid as `cluster`) and listed in
the manifest's `heldout`, for `grip eval`. Cost: the clusters are fitted on 98% of the corpus.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from grip_loop import distributed, docstore, workdir
from grip_loop.budget import apportion
from grip_loop.embed import EncoderConfig, embed_corpus
from grip_loop.judge import JudgeConfig, JudgeInput, cluster_quality
from grip_loop.manifest import SCHEMA_VERSION, ClusterInfo, Manifest, ShardInfo
from grip_loop.naming import describe_clusters, influence_scores
from grip_loop.selection import kernel_density, knn, selection_order, selection_weights

ORDERS = ("grip", "diversity", "random")
CLUSTER_METHODS = ("kmeans", "gem")


@dataclass
class ClusterConfig:
    """How the `k` clusters are found (ignored with `cluster_by`)."""

    method: str = "kmeans"
    """`kmeans`: spherical k-means (faiss; `kmeans_niter`, `kmeans_sample`). `gem`: a balanced
    mixture of von Mises-Fisher components fitted by MM on a sample, distilled to a linear
    student that labels every document (`grip_loop.cluster.fit_gem`; docs/design.md)."""
    balance: float = 1.0
    """gem: weight of the entropy bonus on the mixing weights (0 = plain vMF EM)."""
    niter: int = 100
    """gem: at most this many MM iterations (fewer when the objective stops improving)."""
    sample: int = 50_000
    """gem: fit the teacher on at most this many documents (a seeded sample)."""
    student_heldout: float = 0.1
    """gem: fraction of the sample kept out of the student's training, to measure how often
    student and teacher agree (`manifest.stats.clustering.student_agreement`)."""

    def __post_init__(self) -> None:
        if self.method not in CLUSTER_METHODS:
            raise ValueError(f"cluster.method: one of {CLUSTER_METHODS}, got {self.method!r}")
        b = self.balance
        if isinstance(b, bool) or not isinstance(b, int | float) or not math.isfinite(b) or b < 0:
            raise ValueError(f"cluster.balance: must be a finite number >= 0, got {b!r}")
        for name in ("niter", "sample"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"cluster.{name}: must be an integer >= 1, got {v!r}")
        h = self.student_heldout
        if isinstance(h, bool) or not isinstance(h, int | float) or not 0 <= h < 1:
            raise ValueError(f"cluster.student_heldout: must lie in [0, 1), got {h!r}")


@dataclass
class PrepareConfig:
    corpus: str = ""
    """Source: a directory of source files / .jsonl[.gz] / .tar shards / .parquet / HF datasets
    saved to disk (.arrow), or one such file."""
    out: str = ""
    """Output directory (the prepared corpus)."""
    k: int = 64
    """Number of clusters K (k-means). Ignored with `cluster_by`."""
    cluster_by: str | None = None
    """Make one cluster per distinct value of this document field instead of k-means (JSONL
    and shard metadata: any string field, e.g. `lang` or `source`; source directories: `lang`).
    Clusters are in sorted order of the value and named by it; documents without the field are
    counted and skipped."""
    seed: int = 0
    max_file_bytes: int = 1 << 20
    """Skip files (and JSONL texts, shard members) larger than this: generated code and data
    dumps. Also bounds the memory one document costs in compressed input (docs/reliability.md)."""
    follow_symlinks_outside: bool = False
    """Follow symlinks (to files and directories) that lead out of the corpus directory. Default:
    no, they are skipped and counted as `outside_root`, so a link in a downloaded corpus to
    ~/.ssh or /proc/self/environ never lands in the shards."""
    text_column: str = "text"
    """Parquet / Arrow (HF `datasets` saved to disk) inputs: the column holding the document
    text (`content` for The Stack); every other string column becomes a document field."""
    exclude_humaneval: bool = True
    """Drop documents whose content hash matches a HumanEval problem (held out for evaluation)."""
    tokenizer_path: str | None = None
    """HF tokenizer.json to use; None = train a byte-level BPE on the corpus."""
    vocab_size: int = 16384
    """Vocabulary of the trained tokenizer."""
    tokenizer_train_docs: int = 200_000
    """Train the tokenizer on at most this many documents (a seeded sample)."""
    ingest_part_docs: int = 100_000
    """Documents per part of the document and token stores (work/docs/, work/tokens/): the
    unit of the tokenize stage, of its resume and of its split over torchrun ranks."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Clustering method and its settings (`cluster.method: kmeans | gem`)."""
    kmeans_niter: int = 25
    kmeans_sample: int = 200_000
    """Fit centroids on at most this many documents, then assign all."""
    probe_fraction: float = 0.005
    """B_probe as a fraction of the corpus (paper: ~0.5%)."""
    probe_min_per_cluster: int = 64
    """Floor of n_k^probe (capped at N_k): every cluster gets a Q_k and enough documents for a
    stable probe (half adaptation, half evaluation: 32 + 32 by default, docs/rap.md)."""
    knn_k: int = 10
    """Neighbours in the Eq. 9 density."""
    knn_approx_above: int | None = 50_000
    """Clusters with more training documents than this use an approximate kNN (faiss IVF) for
    Eq. 9, tuned per cluster to `knn_target_recall` on a seeded sample of 256 queries (logged in
    `manifest.stats.knn`); smaller clusters use the exact search. None: always exact."""
    knn_target_recall: float = 0.95
    """recall@knn_k of the approximate kNN against the exact one (measured on a sample)."""
    beta: float = 0.3
    """Length exponent of Eq. 10 for the "grip" order."""
    orders: list[str] = field(default_factory=lambda: ["grip"])
    """Orders to write, from ORDERS."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    shard_max_docs: int = 10_000
    pathology_sample: int = 20_000
    """Documents sampled for the length-vs-kNN-distance plot of `grip inspect`."""
    n_examples: int = 3
    heldout_fraction: float = 0.02
    """Fraction of each language's documents held out for evaluation (not clustered, not trained on)."""
    probe_eval_in_training: bool = False
    """Keep the probe's evaluation documents in the training shards too. Default: no, so the
    probe measures documents the model never trained on (memorised documents look learnable;
    docs/rap.md). They are at most probe_min_per_cluster / 2 per cluster (32): negligible at
    scale, a visible share of a corpus of a few thousand files."""
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.encoder, dict):
            self.encoder = _build(EncoderConfig, self.encoder, "encoder")
        if isinstance(self.judge, dict):
            self.judge = _build(JudgeConfig, self.judge, "judge")
        if isinstance(self.cluster, dict):
            self.cluster = _build(ClusterConfig, self.cluster, "cluster")
        if self.k < 1:
            raise ValueError(f"k: must be >= 1, got {self.k}")
        if not isinstance(self.follow_symlinks_outside, bool):
            raise ValueError(
                f"follow_symlinks_outside: must be true or false, got {self.follow_symlinks_outside!r}"
            )
        if not isinstance(self.text_column, str) or not self.text_column:
            raise ValueError(f"text_column: expected a column name, got {self.text_column!r}")
        if self.cluster_by is not None and (not isinstance(self.cluster_by, str) or not self.cluster_by):
            raise ValueError(f"cluster_by: expected a field name or null, got {self.cluster_by!r}")
        if not 0 < self.probe_fraction <= 1:
            raise ValueError(f"probe_fraction: must lie in (0, 1], got {self.probe_fraction}")
        if self.probe_min_per_cluster < 1:
            raise ValueError(f"probe_min_per_cluster: must be >= 1, got {self.probe_min_per_cluster}")
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction: must lie in [0, 1), got {self.heldout_fraction}")
        if self.knn_k < 1:
            raise ValueError(f"knn_k: must be >= 1, got {self.knn_k}")
        if self.knn_approx_above is not None and (
            isinstance(self.knn_approx_above, bool)
            or not isinstance(self.knn_approx_above, int)
            or self.knn_approx_above < 1
        ):
            raise ValueError(f"knn_approx_above: an integer >= 1 or null, got {self.knn_approx_above!r}")
        if not 0 < self.knn_target_recall <= 1:
            raise ValueError(f"knn_target_recall: must lie in (0, 1], got {self.knn_target_recall}")
        for name in ("probe_fraction", "beta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ValueError(f"{name}: must be a finite number, got {v!r}")
        if self.beta < 0:
            raise ValueError(f"beta: must be >= 0, got {self.beta}")
        bad = [o for o in self.orders if o not in ORDERS]
        if bad or not self.orders or len(set(self.orders)) != len(self.orders):
            raise ValueError(f"orders: a non-empty list of distinct names from {ORDERS}, got {self.orders}")
        for name in (
            "kmeans_niter",
            "kmeans_sample",
            "shard_max_docs",
            "tokenizer_train_docs",
            "ingest_part_docs",
            "max_file_bytes",
            "vocab_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, d: dict) -> PrepareConfig:
        return _build(cls, d, "config")

    def to_dict(self) -> dict:
        return asdict(self)


def _build(cls, d: dict, where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(names)}")
    return cls(**d)


def load_config(path: str | os.PathLike, **overrides) -> PrepareConfig:
    """A PrepareConfig from YAML, with non-None `overrides` (CLI flags) on top."""
    import yaml

    raw = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a YAML mapping of PrepareConfig fields")
    for k, v in overrides.items():  # a dict (e.g. cluster={"method": "gem"}) merges into the section
        if isinstance(v, dict) and isinstance(raw.get(k), dict):
            raw[k] = {**raw[k], **{a: b for a, b in v.items() if b is not None}}
        elif isinstance(v, dict):
            v = {a: b for a, b in v.items() if b is not None}
            if v:
                raw[k] = v
        elif v is not None:
            raw[k] = v
    try:
        return PrepareConfig.from_dict(raw)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


# ---------------------------------------------------------------------------------------
# small helpers


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


_atomic_json, _atomic_npy, _atomic_npz = workdir.atomic_json, workdir.atomic_npy, workdir.atomic_npz


class _Damaged(Exception):
    """A stage file that cannot be trusted; the stage is redone."""


def _note(path: Path, problem: str, stage: str) -> None:
    print(f"note: {path}: {problem}; redoing the {stage} stage")


def _finished(meta: Path, key: str, stage: str) -> dict | None:
    """The stage's record if it finished with this key, else None (the stage runs). A record
    that exists but cannot be read (empty, cut short: a crash or a full disk) is reported."""
    info, problem = workdir.read_json(meta)
    if problem == "missing":
        return None
    if problem:
        _note(meta, problem, stage)
        return None
    return info if info.get("key") == key else None


_file_sha256 = workdir.file_sha256


def _seed(seed: int, *parts: int) -> int:
    return int(np.random.SeedSequence([seed, *parts]).generate_state(1)[0])


# stages of this run that were taken from OUT/work as they were (reported as "cached", not timed)
_CACHED: set[str] = set()


def _cached(stage: str, record: Path) -> None:
    _CACHED.add(stage)
    print(f"{stage}: cached ({record})")


class _Timer:
    def __init__(self) -> None:
        self.stages: dict[str, dict] = {}

    def record(self, name: str, t0: float, n: int, skipped: bool = False) -> None:
        skipped = skipped or name in _CACHED
        s = time.perf_counter() - t0
        self.stages[name] = {
            "seconds": round(s, 3),
            "docs": n,
            "docs_per_s": round(n / s, 1) if s > 0 else None,
        }
        if skipped:
            self.stages[name]["resumed"] = True


# ---------------------------------------------------------------------------------------
# stages


def _ingest(cfg: PrepareConfig, work: Path) -> dict:
    """Stream the corpus into document parts (`grip_loop.docstore`); returns the stage record."""
    from tqdm import tqdm

    from grip_loop.corpus import READER_VERSION, CorpusReader, humaneval_hashes, printable

    meta = work / "ingest.json"
    docs_dir = work / "docs"
    key = _key(
        "ingest",
        str(Path(cfg.corpus).resolve()),
        cfg.max_file_bytes,
        cfg.exclude_humaneval,
        cfg.cluster_by,
        cfg.follow_symlinks_outside,
        cfg.text_column,
        READER_VERSION,  # a fixed reader redoes an ingest that an older one may have got wrong
        docstore.STORE_VERSION,
        cfg.ingest_part_docs,
    )
    info = _finished(meta, key, "ingest")
    if info is not None:
        parts = info.get("parts")
        problem = (
            docstore.parts_problem(docs_dir, parts)
            if isinstance(parts, list) and parts
            else "no parts recorded (written by an older grip_loop)"
        )
        if problem is None:
            _cached("ingest", meta)
            return info
        _note(docs_dir, problem, "ingest")
    meta.unlink(missing_ok=True)  # the record goes first: it vouches for the parts
    shutil.rmtree(docs_dir, ignore_errors=True)
    (work / "docs.jsonl").unlink(missing_ok=True)  # the single file of grip_loop < 0.2
    reader = CorpusReader(
        cfg.corpus,
        max_file_bytes=cfg.max_file_bytes,
        exclude=frozenset(humaneval_hashes()) if cfg.exclude_humaneval else frozenset(),
        follow_symlinks_outside=cfg.follow_symlinks_outside,
        text_column=cfg.text_column,
    )
    h = hashlib.sha256()
    n = missing = 0
    fields_seen: Counter = Counter()
    strata: dict[str, int] = {}
    writer = docstore.DocPartWriter(docs_dir, part_docs=cfg.ingest_part_docs)
    try:
        for d in tqdm(reader, desc="read", unit="doc", disable=not cfg.progress):
            rec = {"id": d.id, "lang": d.lang, "path": d.path}
            if cfg.cluster_by:
                value = d.field_value(cfg.cluster_by)
                fields_seen.update(d.fields)
                if value is None or not value.strip():
                    missing += 1  # never merged into some cluster: counted and skipped
                    continue
                rec["group"] = value
            stratum = rec["group"] if cfg.cluster_by else d.lang
            writer.add(d.text, rec, strata.setdefault(stratum, len(strata)))
            h.update(d.id.encode("utf-8", "surrogatepass") + b"\x00")
            h.update(hashlib.sha256(d.text.encode("utf-8", "surrogatepass")).digest())
            n += 1
        parts = writer.close()
    except BaseException:
        writer.abort()
        raise
    if reader.stats.skipped or reader.stats.duplicate_ids:
        print(f"warning: {printable(cfg.corpus)}: {reader.stats.summary()}")
    if cfg.cluster_by and missing:
        print(
            f"warning: {printable(cfg.corpus)}: {missing} of {n + missing} documents have no {cfg.cluster_by!r} "
            "field (--cluster-by); they were skipped"
        )
    if n == 0:
        shutil.rmtree(docs_dir, ignore_errors=True)
        if cfg.cluster_by and missing:
            have = ", ".join(sorted(fields_seen)) or "none"
            raise ValueError(
                f"corpus: no document in {cfg.corpus} has the field {cfg.cluster_by!r} (--cluster-by); "
                f"string fields present: {have}. Pick one of them, or drop --cluster-by for k-means"
            )
        raise ValueError(f"corpus: no readable documents in {cfg.corpus} ({reader.stats.summary()})")
    stats = reader.stats.to_dict()
    if cfg.cluster_by:
        stats["missing_field"] = {cfg.cluster_by: missing}
    info = {"key": key, "n_docs": n, "fingerprint": h.hexdigest(), "read_stats": stats}
    info["parts"] = parts  # checked (sizes, sha256) before a resume trusts work/docs/
    info["strata"] = list(strata)  # the values of the stratum codes in the parts' index
    _atomic_json(meta, info)
    return info


# faiss's k-means warns (raw, on stderr) below this many training points per centroid
FAISS_MIN_POINTS_PER_CENTROID = 39


def small_corpus_notes(cfg: PrepareConfig, n_docs: int) -> list[str]:
    """One line per setting too large for a corpus of `n_docs` documents, with the fix: K
    clusters need ~39 documents each (faiss's minimum; below it clusters of one document with
    sigma 0 appear). Printed before the expensive stages."""
    notes = []
    per = FAISS_MIN_POINTS_PER_CENTROID
    if not cfg.cluster_by and n_docs < cfg.k * per:
        fit = max(1, n_docs // per)
        notes.append(
            f"warning: k={cfg.k} clusters for {n_docs} documents is ~{n_docs / cfg.k:.1f} per cluster "
            f"(k-means needs ~{per}; smaller ones are often single documents with sigma 0): "
            f"re-run with --k {fit} (or a --config with a smaller k, e.g. configs/prepare/quickstart.yaml)"
        )
    return notes


class _without_faiss_size_warning:
    """Drops faiss's "please provide at least N training points" line from the C++ stderr of the
    block (small_corpus_notes said it first, with the fix); every other line passes through."""

    def __enter__(self):
        import sys
        import tempfile

        sys.stderr.flush()
        self._saved = os.dup(2)  # faiss writes to the C stderr, fd 2, whatever sys.stderr is
        self._tmp = tempfile.TemporaryFile()
        os.dup2(self._tmp.fileno(), 2)
        return self

    def __exit__(self, *exc):
        import sys

        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._tmp.seek(0)
        lines = self._tmp.read().splitlines(keepends=True)
        self._tmp.close()
        kept = b"".join(ln for ln in lines if b"please provide at least" not in ln)
        if kept:
            os.write(2, kept)
        return False


def _tokenize(
    cfg: PrepareConfig, out: Path, work: Path, store: docstore.DocStore, fp: str, rank: int, world: int
) -> dict:
    """Train (or load) the tokenizer on rank 0, then encode the document parts, part p on rank
    p mod world; each part is skipped when its record, key and checksums check out. Returns the
    tokenizer's record (`work/tokens.json`)."""
    from grip_loop import tokenizer as tk
    from grip_loop.shards import token_dtype_for

    meta = work / "tokens.json"
    tok_file = out / "tokenizer" / "tokenizer.json"
    if rank == 0:
        src_sha = tk.file_sha256(cfg.tokenizer_path) if cfg.tokenizer_path else None
        key = _key(
            "tokenize", fp, cfg.tokenizer_path, src_sha, cfg.vocab_size, cfg.tokenizer_train_docs, cfg.seed
        )
        info = _finished(meta, key, "tokenize")
        if info is not None:
            try:
                ok = tk.file_sha256(tok_file) == info.get("sha256")
            except OSError:
                ok = False
            if ok:
                _cached("tokenize", meta)
            else:
                _note(
                    tok_file,
                    "missing, or its sha256 differs from the one recorded when it was written",
                    "tokenize",
                )
                info = None
        if info is None:
            meta.unlink(missing_ok=True)
            (out / "tokenizer").mkdir(parents=True, exist_ok=True)
            if cfg.tokenizer_path:
                tok = tk.load_tokenizer(cfg.tokenizer_path)
            else:  # a seeded sample of bounded size, read document by document
                n = len(store)
                if n > cfg.tokenizer_train_docs:
                    pick = np.sort(
                        np.random.default_rng(cfg.seed).choice(n, cfg.tokenizer_train_docs, replace=False)
                    )
                else:
                    pick = range(n)
                tok = tk.train_tokenizer(
                    [store.text(int(i)) for i in pick], vocab_size=cfg.vocab_size, progress=cfg.progress
                )
            with workdir.atomic_file(tok_file) as fh:  # tok.save()'s errors are not OSErrors
                fh.write(tok.to_str(pretty=True).encode("utf-8"))
            vocab = tok.get_vocab_size()
            if not cfg.tokenizer_path and vocab < cfg.vocab_size:
                print(
                    f"note: the BPE learned {vocab} tokens of the vocab_size={cfg.vocab_size} asked for (a "
                    f"small corpus has fewer merges); manifest.json records {vocab} and `grip train` sizes "
                    "the model from it"
                )
            info = {
                "key": key,
                "path": "tokenizer/tokenizer.json",
                "vocab_size": vocab,
                "eos_id": tk.eos_id(tok),
                "sha256": tk.file_sha256(tok_file),
                "source": cfg.tokenizer_path or "trained",
            }
            _atomic_json(meta, info)
    distributed.barrier()
    info = json.loads(meta.read_text())
    tok_dir = work / "tokens"
    tok_dir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype_for(info["vocab_size"])
    tok = None
    for p in range(rank, len(store.names), world):
        name = store.names[p]
        part_key = _key("tokens", info["key"], info["sha256"], store.names[p], len(store.idx(p)))
        rec_path = tok_dir / f"{name}.json"
        files = {s: tok_dir / f"{name}.{s}" for s in ("ids.npy", "offsets.npy")}
        rec = _finished(rec_path, part_key, "tokenize")
        if rec is not None:
            sums = rec.get("sha256") if isinstance(rec.get("sha256"), dict) else {}
            bad = next((f for s, f in files.items() if not _sha_matches(f, sums.get(s))), None)
            if bad is None:
                continue
            _note(
                bad,
                "missing, or does not match the checksum recorded when it was written",
                f"tokenize ({name})",
            )
        rec_path.unlink(missing_ok=True)
        tok = tok or tk.load_tokenizer(tok_file)
        ids = tk.encode(tok, store.part_texts(p))
        offsets = np.concatenate([[0], np.cumsum([len(x) for x in ids])]).astype(np.int64)
        flat = np.concatenate(ids).astype(dtype) if ids else np.zeros(0, dtype)
        _atomic_npy(files["ids.npy"], flat)
        _atomic_npy(files["offsets.npy"], offsets)
        _atomic_json(rec_path, {"key": part_key, "sha256": {s: _file_sha256(f) for s, f in files.items()}})
    distributed.barrier()
    return info


def _sha_matches(path: Path, want) -> bool:
    try:
        return _file_sha256(path) == want
    except OSError:
        return False


def heldout_split(langs: list[str], fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of the held-out documents: round(fraction * n_lang) of each language,
    a seeded uniform draw inside the language; a language always keeps >= 1 training document."""
    langs_arr = np.asarray(langs, dtype=object)
    picked = []
    for lang in sorted(set(langs)):
        idx = np.flatnonzero(langs_arr == lang)
        n = min(int(np.floor(fraction * len(idx) + 0.5)), len(idx) - 1)
        if n > 0:
            rng = np.random.default_rng(
                _seed(seed, 7, int.from_bytes(lang.encode()[:8].ljust(8, b"\0"), "little"))
            )
            picked.append(rng.choice(idx, size=n, replace=False))
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def heldout_prefixes(langs: list[str]) -> dict[str, str]:
    """A file-name prefix per language, in the given order: its letters and digits ("_" for the
    rest), at most 40 characters, and distinct ("c++" and "c--" are "c__" and "c___2"): two
    languages never write to one shard file, and a long language name fits in a file name."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for lang in langs:
        base = "".join(ch if ch.isalnum() else "_" for ch in lang)[:40] or "_"
        prefix, n = base, 2
        while prefix in used:
            prefix, n = f"{base}_{n}", n + 1
        used.add(prefix)
        out[lang] = prefix
    return out


def clusters_from_field(values, emb: np.ndarray, train: np.ndarray, block: int = 65536):
    """`--cluster-by`: (centroids, labels, names). One cluster per distinct value, in sorted
    order; a centroid is the L2-normalised mean embedding of its training documents (held-out
    documents keep their own value's label). `emb` may be a memmap: it is read in blocks."""
    names = sorted(set(values))
    lookup = {v: i for i, v in enumerate(names)}
    labels = np.array([lookup[v] for v in values], dtype=np.int64)
    centroids = np.zeros((len(names), emb.shape[1]), np.float32)
    for lo in range(0, len(labels), block):
        t = np.asarray(train[lo : lo + block], bool)
        np.add.at(centroids, labels[lo : lo + block][t], np.asarray(emb[lo : lo + block], np.float32)[t])
    norm = np.linalg.norm(centroids, axis=1, keepdims=True)
    centroids = np.where(norm > 0, centroids / np.maximum(norm, 1e-12), 0.0).astype(np.float32)
    return centroids, labels, names


def sigma_streamed(emb, labels: np.ndarray, train: np.ndarray, centroids: np.ndarray, block: int = 65536):
    """Eq. 3 over the training documents (`budget.geometric_consistency`), reading a
    (memory-mapped) embedding matrix in blocks: never more than `block` rows in memory."""
    k = len(centroids)
    mu = np.asarray(centroids, np.float32)
    sums, counts = np.zeros(k), np.zeros(k, np.int64)
    for lo in range(0, len(labels), block):
        t = np.asarray(train[lo : lo + block], bool)
        lab = labels[lo : lo + block][t]
        e = np.asarray(emb[lo : lo + block], np.float32)[t]
        if len(e) and np.max(np.abs(np.linalg.norm(e, axis=1) - 1.0)) > 1e-3:
            raise ValueError("emb: rows must be L2-normalised (divide each row by its norm)")
        d2 = np.sum((e - mu[lab]) ** 2, axis=1, dtype=np.float64)
        sums += np.bincount(lab, weights=d2, minlength=k)
        counts += np.bincount(lab, minlength=k)
    sigma = np.sqrt(np.divide(sums, counts, out=np.zeros(k), where=counts > 0))
    sigma[counts < 2] = 0.0  # one document says nothing about a cluster's spread
    return sigma


def _cluster(
    cfg: PrepareConfig, out: Path, work: Path, emb: np.ndarray, emb_key: str, train: np.ndarray
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(centroids, labels, stats): centroids fitted on the training documents only; labels of
    every document (held-out ones get their nearest centroid, or the GEM student's label, for
    reporting); stats for `manifest.stats.clustering`."""
    from grip_loop.cluster import assign, fit_gem, normalised_entropy, spherical_kmeans

    meta = work / "labels.json"
    parts = ["cluster", emb_key, cfg.k, cfg.seed, cfg.kmeans_niter, cfg.kmeans_sample]
    if cfg.cluster.method != "kmeans":  # k-means keeps its old key: its finished stages resume
        parts.append(asdict(cfg.cluster))
    key = _key(*parts, np.flatnonzero(~train).tolist())
    files = {"centroids": out / "centroids.npy", "labels": work / "labels.npy"}
    info = _finished(meta, key, "cluster")
    if info is not None:
        sums = info.get("sha256") if isinstance(info.get("sha256"), dict) else {}
        for name, path in files.items():
            try:
                ok = _file_sha256(path) == sums.get(name)
            except OSError:
                ok = False
            if not ok:  # cut short, overwritten (--cluster-by rewrites centroids.npy), or missing
                _note(path, "does not match the checksum recorded when it was written", "cluster")
                break
        else:
            _cached("cluster", meta)
            labels = np.load(files["labels"])
            stats = info.get("stats") or {
                "method": "kmeans",
                "size_entropy": normalised_entropy(np.bincount(labels[train], minlength=cfg.k)),
            }
            return np.load(files["centroids"]), labels, stats
    if cfg.cluster.method == "gem":
        c = cfg.cluster
        if cfg.progress:
            print(f"cluster: GEM, K={cfg.k}, balance {c.balance}, on up to {c.sample} documents")
        r = fit_gem(
            np.asarray(emb)[train],
            cfg.k,
            seed=cfg.seed,
            balance=c.balance,
            niter=c.niter,
            sample_size=c.sample,
            heldout=c.student_heldout,
        )
        centroids = r.centroids
        labels = r.student.predict(emb) if r.student is not None else np.zeros(len(emb), np.int64)
        stats = r.stats()
    else:
        # the sample spherical_kmeans would draw from the training rows, read from the memmap
        # alone (the same rows, so the same centroids, without a copy of every training row)
        rows = np.flatnonzero(train)
        if len(rows) > cfg.kmeans_sample:
            pick = np.random.default_rng(cfg.seed).choice(
                len(rows), max(cfg.kmeans_sample, cfg.k), replace=False
            )
            rows = rows[np.sort(pick)]
        centroids, _ = spherical_kmeans(
            np.asarray(emb[rows]), cfg.k, seed=cfg.seed, niter=cfg.kmeans_niter, sample_size=None
        )
        labels = assign(emb, centroids)
        stats = {"method": "kmeans"}
    stats["size_entropy"] = round(normalised_entropy(np.bincount(labels[train], minlength=cfg.k)), 6)
    _atomic_npy(files["centroids"], centroids)
    _atomic_npy(files["labels"], labels)
    record = {"key": key, "sha256": {name: _file_sha256(path) for name, path in files.items()}}
    _atomic_json(meta, record | {"stats": stats})
    return centroids, labels, stats


def split_probe(probe_ids: list[str]) -> tuple[list[str], list[str]]:
    """(adaptation, evaluation) documents of a cluster's probe: alternating along the probe's
    random draw order, so every prefix of the draw is split evenly (the adaptation half gets
    the odd one out)."""
    return list(probe_ids[0::2]), list(probe_ids[1::2])


def probe_sizes(sizes: np.ndarray, sigma: np.ndarray, fraction: float, floor: int) -> np.ndarray:
    """Eq. 4 with a floor: n_k proportional to N_k sigma_k, at least min(floor, N_k), at most N_k.

    B_probe = round(fraction * N), raised to the sum of the floors when that is larger.
    With floor 1 this is `budget.probe_allocation`.
    """
    sizes = np.asarray(sizes, np.int64)
    lower = np.minimum(floor, sizes)
    b = int(min(sizes.sum(), max(round(fraction * sizes.sum()), lower.sum())))
    mass = sizes * np.asarray(sigma, np.float64)
    if mass.sum() == 0:
        mass = sizes.astype(np.float64)
    return apportion(mass, b, lower=lower.astype(np.float64), upper=sizes.astype(np.float64))


def cluster_orders(
    emb_k: np.ndarray,
    lengths_k: np.ndarray,
    orders: list[str],
    *,
    beta: float,
    knn_k: int,
    seed: int,
    approx_above: int | None = None,
    target_recall: float = 0.95,
    info: dict | None = None,
) -> dict[str, np.ndarray]:
    """Positions -> member indices of one cluster for each order (see the module docstring).
    `approx_above`, `target_recall`, `info`: the kNN of Eq. 9 (`selection.kernel_density`)."""
    if len(emb_k) == 0:
        return {o: np.zeros(0, np.int64) for o in orders}
    rho = (
        kernel_density(
            emb_k, k=knn_k, approx_above=approx_above, target_recall=target_recall, seed=seed, info=info
        )
        if any(o != "random" for o in orders)
        else None
    )
    weights = {
        "grip": lambda: selection_weights(rho, lengths_k, beta=beta),
        "diversity": lambda: selection_weights(rho, lengths_k, beta=0.0),
        "random": lambda: np.ones(len(emb_k)),
    }
    return {o: selection_order(weights[o](), seed=seed) for o in orders}


def _knn_stats(cfg: PrepareConfig, infos: list[dict | None]) -> dict:
    """manifest.stats.knn: which clusters used the approximate kNN and the recall measured."""
    approx = [i for i in infos if i]
    out = {
        "approx_above": cfg.knn_approx_above,
        "target_recall": cfg.knn_target_recall,
        "exact_clusters": len(infos) - len(approx),
        "approx_clusters": len(approx),
    }
    if approx:
        out["min_recall"] = min(i["recall"] for i in approx)
        out["approx"] = approx
    return out


def _check_shard_space(out, text_bytes, lengths, itemsize, members, probes, held, n_orders) -> None:
    """Fail before the first shard when the disk cannot hold them all. The estimate is a lower
    bound (token bytes + UTF-8 text + three 512-byte tar headers per document and copy), so
    a run it refuses could not have finished."""
    per_doc = lengths * itemsize + 3 * 512 + text_bytes
    need = n_orders * sum(int(per_doc[m].sum()) for m in members)
    need += sum(int(per_doc[p].sum()) for p in probes) + int(per_doc[held].sum())
    workdir.require_space(out, need, "the shards (a lower bound)")


def _pathology(cfg: PrepareConfig, out: Path, emb: np.ndarray, lengths: np.ndarray) -> str:
    n = len(emb)
    pick = np.sort(np.random.default_rng(cfg.seed).choice(n, min(n, cfg.pathology_sample), replace=False))
    d2, _ = knn(np.asarray(emb[pick]), cfg.knn_k)
    dist = np.sqrt(d2).mean(axis=1) if d2.shape[1] else np.zeros(len(pick))
    (out / "stats").mkdir(exist_ok=True)
    _atomic_npz(out / "stats" / "length_knn.npz", index=pick, length=lengths[pick], knn_distance=dist)
    return "stats/length_knn.npz"


# ---------------------------------------------------------------------------------------


def prepare(cfg: PrepareConfig, *, restart: bool = False) -> Manifest | None:
    """Run every stage; returns the manifest on rank 0 (None on other torchrun ranks).

    One run per output folder: rank 0 (the only process of a plain run) holds an exclusive
    lock on `OUT/.lock` from start to end, and a second run on the same folder fails at once
    with `OutputLocked`, on every one of its ranks. `restart` discards `OUT/work` (every
    finished stage) once the lock is held.
    """
    if not cfg.corpus or not cfg.out:
        raise ValueError("corpus and out: both are required")
    rank, world = distributed.init()
    out = Path(cfg.out)
    lock = workdir.OutputLock(out)
    try:
        refused = None
        if rank == 0:
            try:
                lock.acquire()
            except workdir.OutputLocked as exc:
                refused = str(exc)
        refused = distributed.broadcast(refused)  # the other ranks fail too, rather than wait
        if refused:
            raise workdir.OutputLocked(refused)
        if restart and rank == 0:
            shutil.rmtree(out / "work", ignore_errors=True)
        return _run(cfg, out, rank, world)
    finally:
        lock.release()
        distributed.shutdown()


def _run(cfg: PrepareConfig, out: Path, rank: int, world: int) -> Manifest | None:
    timer = _Timer()
    _CACHED.clear()
    work = out / "work"
    if rank == 0:
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        ingest = _ingest(cfg, work)
        timer.record("ingest", t0, ingest["n_docs"])
    distributed.barrier()
    ingest = json.loads((work / "ingest.json").read_text())
    if not cfg.cluster_by and cfg.k > ingest["n_docs"]:  # checked before the expensive stages, on every rank
        raise ValueError(
            f"k: {cfg.k} clusters but {cfg.corpus} has only {ingest['n_docs']} usable documents; "
            f"lower k to at most {ingest['n_docs']}"
        )
    if rank == 0:
        for line in small_corpus_notes(cfg, ingest["n_docs"]):
            print(line)
    store = docstore.DocStore(work / "docs", ingest["parts"])
    tokens = docstore.TokenStore(work / "tokens", store.names, store.starts)
    try:  # the stores' descriptors and maps are closed however the run ends
        return _stages(cfg, out, work, rank, world, ingest, store, tokens, timer)
    finally:
        store.close()
        tokens.close()


def _stages(cfg, out, work, rank, world, ingest, store, tokens, timer) -> Manifest | None:
    from tqdm import tqdm

    from grip_loop.shards import ShardWriter, token_dtype_for

    fp = ingest["fingerprint"]
    t0 = time.perf_counter()
    tok_info = _tokenize(cfg, out, work, store, fp, rank, world)
    timer.record("tokenize", t0, len(store))

    t0 = time.perf_counter()
    emb_key = _key("embed", fp, asdict(cfg.encoder) | {"device": None})
    emb = embed_corpus(store.texts, cfg.encoder, work, emb_key, progress=cfg.progress)
    timer.record("embed", t0, len(store))
    if rank != 0:
        return None
    return _finish(
        cfg,
        out,
        work,
        store,
        emb,
        emb_key,
        ingest,
        tok_info,
        tokens,
        timer,
        ShardWriter,
        token_dtype_for,
        tqdm,
    )


def _finish(
    cfg, out, work, store, emb, emb_key, ingest, tok_info, tokens, timer, ShardWriter, token_dtype_for, tqdm
):
    n = len(store)
    dim = emb.shape[1]
    lengths = tokens.lengths()
    # the language (or --cluster-by value) of every document: one shared string object each
    strata = np.asarray(ingest["strata"], dtype=object)[store.column(4)]

    t0 = time.perf_counter()
    # held-out slice: stratified by the cluster field with --cluster-by (every cluster is
    # represented in the evaluation), by language otherwise
    held = heldout_split(strata, cfg.heldout_fraction, cfg.seed)
    train = np.ones(n, bool)
    train[held] = False
    if cfg.cluster_by:
        centroids, labels, names = clusters_from_field(strata, emb, train)
        _atomic_npy(out / "centroids.npy", centroids)
        n_clusters = len(names)
        cluster_stats = {"method": "field", "field": cfg.cluster_by}
    else:
        if cfg.k > int(train.sum()):
            raise ValueError(
                f"k: {cfg.k} clusters but the corpus has only {int(train.sum())} training documents; lower k"
            )
        with _without_faiss_size_warning():  # small_corpus_notes said it in one line, with the fix
            centroids, labels, cluster_stats = _cluster(cfg, out, work, emb, emb_key, train)
        n_clusters = cfg.k
    # Geometric Influence Scores of the training documents, and from them each cluster's
    # influential documents, terms, languages and (k-means / GEM) name (grip_loop.naming)
    gis = influence_scores(emb, np.where(train, labels, -1), n_clusters)
    described = describe_clusters(
        np.where(train, labels, -1),
        n_clusters,
        store.field("lang"),  # read on demand: only the sampled documents of each cluster
        store.field("path"),
        store.texts,
        seed=cfg.seed,
        gis=gis,
    )
    if not cfg.cluster_by:
        names = [c["name"] for c in described]
    (out / "stats").mkdir(exist_ok=True)
    _atomic_npy(out / "stats" / "gis.npy", gis.astype(np.float32))
    timer.record("cluster", t0, n)

    t0 = time.perf_counter()
    sizes = np.bincount(labels[train], minlength=n_clusters)
    sigma = sigma_streamed(emb, labels, train, centroids)
    n_probe = probe_sizes(sizes, sigma, cfg.probe_fraction, cfg.probe_min_per_cluster)
    order_by_label = np.argsort(np.where(train, labels, n_clusters), kind="stable")
    bounds = np.searchsorted(np.where(train, labels, n_clusters)[order_by_label], np.arange(n_clusters + 1))
    members = [order_by_label[bounds[k] : bounds[k + 1]] for k in range(n_clusters)]
    del order_by_label
    orders, probes, knn_info = [], [], []
    for k in tqdm(range(n_clusters), desc="density+order", unit="cluster", disable=not cfg.progress):
        m = members[k]
        # a uniform draw, kept in draw order: any prefix is a uniform sample, and the probe's
        # adaptation / evaluation roles alternate along it (split_probe)
        pick = selection_order(np.ones(len(m)), seed=_seed(cfg.seed, k, 1))[: n_probe[k]]
        probes.append(m[pick])
        if not cfg.probe_eval_in_training:  # the probe measures documents training never sees
            held_out = np.asarray(split_probe(m[pick].tolist())[1], np.int64)
            m = members[k] = m[~np.isin(m, held_out)]
            train[held_out] = False
        info: dict = {}
        orders.append(
            cluster_orders(
                np.asarray(emb[m]),
                lengths[m],
                cfg.orders,
                beta=cfg.beta,
                knn_k=cfg.knn_k,
                seed=_seed(cfg.seed, k, 0),
                approx_above=cfg.knn_approx_above,
                target_recall=cfg.knn_target_recall,
                info=info,
            )
        )
        knn_info.append({"cluster": k, **info} if info.get("approx") else None)
    sizes = np.array([len(m) for m in members], dtype=np.int64)
    pathology = _pathology(cfg, out, emb, lengths)
    timer.record("geometry", t0, n)

    t0 = time.perf_counter()
    judge = cfg.judge.build(cache_dir=work)
    flat = []
    for p in probes:
        for i in p:
            meta = store.meta(int(i))
            flat.append(JudgeInput(meta["id"], store.text(int(i)), meta["lang"]))
    scores = judge.score(flat)
    per_cluster, s = [], 0
    for p in probes:
        per_cluster.append(scores[s : s + len(p)])
        s += len(p)
    quality, dims = cluster_quality(per_cluster)
    timer.record("judge", t0, len(flat))

    # Write: the old manifest goes first, so a crash below never leaves one that looks complete.
    t0 = time.perf_counter()
    (out / "manifest.json").unlink(missing_ok=True)
    for d in ("shards", "probe", "heldout"):
        shutil.rmtree(out / d, ignore_errors=True)
    dtype = token_dtype_for(tok_info["vocab_size"])
    _check_shard_space(
        out, store.column(1), lengths, np.dtype(dtype).itemsize, members, probes, held, len(cfg.orders)
    )

    def write(writer, i: int, k: int, pos: int) -> None:
        doc = store.meta(i)
        meta = {
            "doc_id": doc["id"],
            "length": int(lengths[i]),
            "lang": doc["lang"],
            "path": doc["path"],
            "cluster": int(k),
            "position": int(pos),
        }
        writer.write(f"{i:09d}", tokens.tokens(i), store.text(i), meta)

    clusters = []
    bar = tqdm(
        total=int(train.sum()) * len(cfg.orders), desc="write shards", unit="doc", disable=not cfg.progress
    )
    for k in range(n_clusters):
        m = members[k]
        shard_lists = {}
        for name in cfg.orders:
            rel = Path("shards") / name / f"cluster-{k:05d}"
            with ShardWriter(out / rel, token_dtype=dtype, max_docs=cfg.shard_max_docs) as w:
                for pos, j in enumerate(orders[k][name]):
                    write(w, int(m[j]), k, pos)
                infos = w.close()
            shard_lists[name] = [s.under(rel) for s in infos]
            bar.update(len(m))
        with ShardWriter(out / "probe", token_dtype=dtype, prefix=f"cluster-{k:05d}", max_docs=1 << 30) as w:
            for pos, i in enumerate(probes[k]):
                write(w, int(i), k, pos)
            probe_infos = [s.under("probe") for s in w.close()]
        first = orders[k][cfg.orders[0]][: cfg.n_examples]
        probe_ids = [store.meta(int(i))["id"] for i in probes[k]]
        clusters.append(
            ClusterInfo(
                id=k,
                name=names[k],
                n_docs=int(sizes[k]),
                n_tokens=int(lengths[m].sum()),
                mean_length=float(lengths[m].mean()) if len(m) else 0.0,
                sigma=float(sigma[k]),
                quality=float(quality[k]),
                quality_scores=dims[k],
                probe_ids=probe_ids,
                eval_ids=split_probe(probe_ids)[1],
                probe_shards=probe_infos,
                shards=shard_lists,
                examples=[store.meta(int(m[j]))["path"] for j in first],
                languages=described[k]["languages"],
                top_terms=described[k]["top_terms"],
                influential=[store.meta(int(i))["path"] for i in described[k]["influential"]],
            )
        )
    heldout_infos: list[ShardInfo] = []
    held_langs: dict[str, int] = {}
    held_lang = [store.meta(int(i))["lang"] for i in held]
    prefixes = heldout_prefixes(sorted(set(held_lang)))
    for lang, prefix in prefixes.items():
        mine = [int(i) for i, li in zip(held, held_lang, strict=True) if li == lang]
        held_langs[lang] = len(mine)
        with ShardWriter(out / "heldout", token_dtype=dtype, prefix=prefix, max_docs=cfg.shard_max_docs) as w:
            for pos, i in enumerate(mine):
                write(w, i, int(labels[i]), pos)
            heldout_infos += [s.under("heldout") for s in w.close()]
    bar.close()
    timer.record("write", t0, int(train.sum()) * len(cfg.orders) + len(held))
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        corpus_fingerprint=ingest["fingerprint"],
        tokenizer={
            **{k: tok_info[k] for k in ("path", "vocab_size", "eos_id", "sha256")},
            "token_dtype": dtype,
        },
        encoder={
            "name": cfg.encoder.describe(),
            "kind": cfg.encoder.kind,
            "dim": int(dim),
            "max_tokens": cfg.encoder.max_tokens,
            "max_chunks": cfg.encoder.max_chunks,
            "pooling": "mean",
        },
        k=n_clusters,
        seed=cfg.seed,
        orders=list(cfg.orders),
        clusters=clusters,
        config=cfg.to_dict(),
        heldout=heldout_infos,
        stats={
            "n_docs": int(train.sum()),
            "n_tokens": int(lengths[train].sum()),
            "mean_length": float(lengths[train].mean()),
            "heldout_docs": len(held),
            "heldout_langs": held_langs,
            "read": ingest["read_stats"],
            "probe_docs": int(n_probe.sum()),
            "probe_eval_docs": sum(len(c.eval_ids) for c in clusters),
            "probe_eval_in_training": cfg.probe_eval_in_training,
            "judge": getattr(judge, "stats", {"kind": cfg.judge.kind}),
            "length_knn": pathology,
            "knn": _knn_stats(cfg, knn_info),
            "centroids": "centroids.npy",
            "clustering": cluster_stats,
            "gis": "stats/gis.npy",
            "timings": timer.stages,
        },
    )
    manifest.save(out)
    return manifest
