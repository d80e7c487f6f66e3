"""The settings of `grip prepare`: `PrepareConfig` (every field documented where it is
declared), `ClusterConfig` (`cluster:`), and `load_config` (YAML with CLI flags on top)."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from grip_loop.embed import EncoderConfig
from grip_loop.judge import JudgeConfig

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
