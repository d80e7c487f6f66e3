"""Synthetic prepared corpora for the benchmarks, and their conversions into the peers' formats.

The corpus is what `grip prepare` writes (per-cluster WebDataset shards of uint16 token ids +
`manifest.json`), at a realistic size: documents of a few hundred to a few thousand random
tokens (EOS = 0 never occurs inside a document, so a consumer counts documents by counting EOS).
Text is empty: the training path never reads it, and every tool then reads the same bytes.
Builds are cached under `.bench-data/` keyed by their parameters.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from grip_loop.manifest import SCHEMA_VERSION, ClusterInfo, Manifest
from grip_loop.shards import ShardWriter

EOS = 0
VOCAB = 32_000


def build_corpus(
    root: Path,
    k: int,
    docs_per_cluster: int,
    *,
    min_len: int = 200,
    max_len: int = 2000,
    shard_docs: int = 500,
    seed: int = 0,
) -> Path:
    """Write (once) a prepared corpus of k clusters x docs_per_cluster documents; returns root."""
    root = Path(root)
    key = dict(k=k, docs=docs_per_cluster, min_len=min_len, max_len=max_len, shard_docs=shard_docs, seed=seed)
    key["schema"] = SCHEMA_VERSION  # a corpus written by an older layout is rebuilt
    stamp = root / "bench-corpus.json"
    if stamp.exists() and json.loads(stamp.read_text()) == key and (root / "manifest.json").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    clusters = []
    for c in range(k):
        lengths = rng.integers(min_len, max_len + 1, size=docs_per_cluster)
        rel = f"shards/grip/cluster-{c:05d}"
        with ShardWriter(root / rel, max_docs=shard_docs) as w:
            for p, n in enumerate(lengths):
                w.write(f"{c:03d}{p:07d}", rng.integers(1, VOCAB, size=n, dtype=np.uint16), "", {"c": c})
        shards = [s.under(rel) for s in w.finished]
        n_tok = int(lengths.sum())
        clusters.append(
            ClusterInfo(
                id=c,
                n_docs=docs_per_cluster,
                n_tokens=n_tok,
                mean_length=n_tok / docs_per_cluster,
                sigma=0.5,
                quality=0.6,
                shards={"grip": shards},
            )
        )
    Manifest(
        schema_version=SCHEMA_VERSION,
        corpus_fingerprint="benchmark",
        tokenizer={"vocab_size": VOCAB, "eos_id": EOS, "token_dtype": "uint16"},
        encoder={"name": "none"},
        k=k,
        seed=seed,
        orders=["grip"],
        clusters=clusters,
    ).save(root)
    stamp.write_text(json.dumps(key))
    return root


def cluster_shards(root: Path) -> list[list[str]]:
    """Absolute shard paths of each cluster (the `grip` order)."""
    from grip_loop.manifest import load_manifest

    m = load_manifest(root)
    return [[str(root / s.path) for s in c.shards["grip"]] for c in m.clusters]


def iter_cluster_docs(paths: list[str]):
    """Token arrays of one cluster's shards, in stored order (conversion input)."""
    from grip_loop.shards import iter_shard

    for p in paths:
        for doc in iter_shard(p, "uint16", with_text=False):
            yield doc.tokens


def _convert_per_cluster(root: Path, out: Path, write) -> list[Path]:
    """One output directory per cluster under `out`; `write(directory, shard paths)` fills the
    ones without an `index.json` yet (a finished conversion is reused)."""
    dirs = []
    for c, paths in enumerate(cluster_shards(root)):
        d = out / f"cluster-{c:05d}"
        dirs.append(d)
        if (d / "index.json").exists():
            continue
        shutil.rmtree(d, ignore_errors=True)
        write(d, paths)
    return dirs


def to_mds(root: Path, out: Path) -> list[Path]:
    """mosaicml-streaming MDS, one directory per cluster (one Stream each)."""
    from streaming import MDSWriter

    def write(d: Path, paths: list[str]) -> None:
        with MDSWriter(out=str(d), columns={"ids": "ndarray:uint16"}, size_limit="64mb") as w:
            for toks in iter_cluster_docs(paths):
                w.write({"ids": np.ascontiguousarray(toks)})

    return _convert_per_cluster(root, out, write)


def _read_for_litdata(path: str):
    """litdata `optimize` input function: the documents of one shard."""
    for toks in iter_cluster_docs([path]):
        yield {"ids": np.array(toks)}


def to_litdata(root: Path, out: Path) -> list[Path]:
    """litdata `optimize` output, one directory per cluster (one StreamingDataset each)."""
    from litdata import optimize

    def write(d: Path, paths: list[str]) -> None:
        optimize(
            fn=_read_for_litdata,
            inputs=paths,
            output_dir=str(d),
            chunk_bytes="64MB",
            num_workers=1,
            mode="overwrite",
            verbose=False,
        )

    return _convert_per_cluster(root, out, write)
