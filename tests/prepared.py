"""A synthetic prepared corpus (shards + manifest) whose tokens say where they came from.

Document p of cluster k holds tokens [MARK + k, POS + p, filler...] so a test can decode,
from packed blocks, exactly which documents were read. EOS is 0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from grip_loop.manifest import SCHEMA_VERSION, ClusterInfo, Manifest
from grip_loop.shards import ShardWriter, iter_shard

EOS, MARK, POS = 0, 1, 1000


def make_prepared(
    root: Path,
    sizes,
    *,
    seed: int = 0,
    orders=("grip",),
    max_docs: int = 7,
    max_len: int = 20,
    easy=(),
    n_probe: int = 3,
):
    """Clusters listed in `easy` repeat one fixed 8-token pattern as filler (learnable);
    the others draw uniform random filler (hard). The first `n_probe` documents of each
    cluster also go to its probe shard; every other one of them (positions 1, 3, ...) is an
    evaluation document of the probe, as `grip prepare` splits them."""
    rng = np.random.default_rng(seed)
    pattern = np.arange(100, 108)
    root = Path(root)
    clusters = []
    for k, nk in enumerate(sizes):
        lengths = rng.integers(0, max_len, size=nk)
        shards = {}
        for order in orders:
            out = root / "shards" / order / f"cluster-{k:05d}"
            with ShardWriter(out, max_docs=max_docs) as w:
                for p in range(nk):
                    filler = (
                        np.resize(pattern, lengths[p])
                        if k in easy
                        else rng.integers(100, 900, size=lengths[p])
                    )
                    toks = np.concatenate([[MARK + k, POS + p], filler])
                    w.write(f"{k:03d}{p:06d}", toks, f"doc {k}/{p}", {"cluster": k, "position": p})
            shards[order] = [s.under(f"shards/{order}/cluster-{k:05d}") for s in w.finished]
        probe = []
        if nk:
            docs = [d for s in shards[orders[0]] for d in iter_shard(root / s.path, "uint16")][:n_probe]
            with ShardWriter(root / "probe", prefix=f"cluster-{k:05d}", max_docs=1 << 30) as w:
                for doc in docs:
                    w.write(doc.key, doc.tokens, doc.text, {**doc.meta, "doc_id": doc.key})
            probe = [s.under("probe") for s in w.finished]
        n_tok = int(sum(s.n_tokens for s in shards[orders[0]]))
        clusters.append(
            ClusterInfo(
                id=k,
                n_docs=int(nk),
                n_tokens=n_tok,
                mean_length=n_tok / max(nk, 1),
                sigma=0.5,
                quality=0.6,
                shards=shards,
                probe_shards=probe,
                probe_ids=[f"{k:03d}{p:06d}" for p in range(min(n_probe, nk))],
                eval_ids=[f"{k:03d}{p:06d}" for p in range(1, min(n_probe, nk), 2)],
                name=f"synthetic-{k}",
            )
        )
    m = Manifest(
        schema_version=SCHEMA_VERSION,
        corpus_fingerprint="synthetic",
        tokenizer={"vocab_size": 2048, "eos_id": EOS, "token_dtype": "uint16"},
        encoder={"name": "none"},
        k=len(sizes),
        seed=seed,
        orders=list(orders),
        clusters=clusters,
    )
    m.save(root)
    return m


def decode_docs(blocks):
    """(cluster, position) of every document start in a sequence of blocks (one partition)."""
    stream = np.concatenate([b["input_ids"].numpy() for b in blocks])
    docs = []
    # documents start at index 0 and after each EOS
    starts = [0] + (np.flatnonzero(stream == EOS) + 1).tolist()
    for s in starts:
        if s + 1 < len(stream) and stream[s] >= MARK and stream[s] < POS:
            docs.append((int(stream[s] - MARK), int(stream[s + 1] - POS)))
    return docs
