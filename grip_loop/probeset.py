"""The probe's windows: each cluster's probe documents from a prepared corpus, as `ProbeBatch`es.

`grip prepare` writes a uniform random sample of every cluster's documents to
`probe/cluster-KKKKK-*.tar` (in draw order) and records which of them are *evaluation*
documents (`ClusterInfo.eval_ids`, every other one along the draw); the rest are
*adaptation* documents. `probe_set` turns them into token windows:

* the first `max_docs` documents of each role (a uniform sample, not file order);
* one window of `seq_len` tokens per document (`windows_per_doc` for more): a document that
  fits is `[EOS] doc`, a longer one contributes windows at seeded random offsets (not only its
  licence header); documents shorter than a window are packed together, EOS-separated, so
  few tokens are padding;
* evaluation documents alternate between two halves (split-half reliability); a window
  never mixes documents of different halves or roles;
* the draw is seeded by (seed, cluster, role): the same windows at every refresh, on every
  rank.

With `eval_split="none"` (the paper's literal protocol) every probe document is an
adaptation document and the probe measures on the same windows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from grip_loop.manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    check_shard_sha256,
    token_range_error,
)
from grip_loop.rap import ProbeBatch
from grip_loop.shards import iter_shard


def check_model_fits(model, manifest: Manifest, root: str | Path, source: str | Path) -> None:
    """Raise ValueError, naming `source` (the checkpoint or model folder), the manifest and the fix,
    when `model` cannot read this prepared corpus: a vocabulary smaller than the prepared
    tokenizer's, or (for a model folder that ships one) another tokenizer.json."""
    import hashlib

    where = Path(root) / MANIFEST_NAME
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    need = int(manifest.tokenizer["vocab_size"])
    if vocab < need:
        raise ValueError(
            f"{source}: the model's vocabulary ({vocab}) is smaller than the prepared tokenizer's ({need}, "
            f"{where}); use a model trained with this corpus's tokenizer"
        )
    tok = Path(source) / "tokenizer.json"
    sha = manifest.tokenizer.get("sha256")
    if Path(source).is_dir() and tok.is_file() and sha:
        if hashlib.sha256(tok.read_bytes()).hexdigest() != sha:
            raise ValueError(
                f"{tok}: not the prepared tokenizer of {where} (sha256 differs); use a model trained with "
                "this corpus's tokenizer"
            )


def _pieces(tokens: np.ndarray, seq_len: int, eos: int, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Up to `n` token pieces of at most `seq_len` tokens from one document."""
    doc = np.concatenate([[eos], tokens.astype(np.int64)])
    if len(doc) <= seq_len:
        return [doc]
    starts = rng.choice(len(doc) - seq_len + 1, size=min(n, len(doc) - seq_len + 1), replace=False)
    return [doc[s : s + seq_len] for s in np.sort(starts)]


def pack_windows(pieces: list[np.ndarray], seq_len: int, pad: int) -> torch.Tensor:
    """Rows of `seq_len` tokens: full pieces alone, short ones packed in order, right-padded."""
    rows: list[np.ndarray] = []
    cur: list[np.ndarray] = []
    used = 0
    for p in pieces:
        if used + len(p) > seq_len and cur:
            rows.append(np.concatenate(cur))
            cur, used = [], 0
        cur.append(p)
        used += len(p)
    if cur:
        rows.append(np.concatenate(cur))
    out = np.full((len(rows), seq_len), pad, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r[:seq_len]
    return torch.from_numpy(out)


def probe_set(
    manifest: Manifest,
    root: str | Path,
    *,
    seq_len: int = 128,
    max_docs: int = 32,
    windows_per_doc: int = 1,
    eval_split: str = "split",
    seed: int = 0,
) -> dict[int, ProbeBatch]:
    """`{cluster id: ProbeBatch}` for every cluster with probe documents (see the module docstring).

    Raises ManifestError (naming the manifest, the field and the fix) when `eval_split` is
    "split" but the corpus was prepared without an adaptation/evaluation split.
    """
    if seq_len < 2 or max_docs < 1 or windows_per_doc < 1:
        raise ValueError(
            f"probe_set: seq_len >= 2, max_docs >= 1, windows_per_doc >= 1; got {seq_len}, {max_docs}, "
            f"{windows_per_doc}"
        )
    root = Path(root)
    eos, dtype = int(manifest.tokenizer["eos_id"]), manifest.tokenizer["token_dtype"]
    vocab = int(manifest.tokenizer["vocab_size"])
    splittable = [c for c in manifest.clusters if len(c.probe_ids) >= 2]
    if eval_split == "split" and splittable and not any(c.eval_ids for c in manifest.clusters):
        c = splittable[0]
        raise ManifestError(
            f"{root / MANIFEST_NAME}: cluster {c.id} ({c.label}) has {len(c.probe_ids)} probe documents but "
            "none is an evaluation document (field clusters[].eval_ids: the corpus was prepared before "
            "the probe's adaptation/evaluation split). Re-run `grip prepare` on it, or set "
            "rap.eval_split: none (the literal same-batch protocol)"
        )
    out: dict[int, ProbeBatch] = {}
    for c in manifest.clusters:
        if not c.probe_shards:
            continue
        eval_ids = set(c.eval_ids)  # a one-document probe has none: flagged by the probe (min_docs)
        roles: dict[str, list[np.ndarray]] = {"adapt": [], "eval": []}
        for s in c.probe_shards:
            check_shard_sha256(root, s)  # small, read whole: always checked
            for doc in iter_shard(root / s.path, dtype, with_text=False):
                if doc.tokens.size and int(doc.tokens.max()) >= vocab:
                    # a data error, found at setup: the probe would fail at every refresh
                    raise token_range_error(
                        root / s.path, f"probe document {doc.key!r}", int(doc.tokens.max()), vocab, root
                    )
                role = "eval" if eval_split == "split" and doc.meta.get("doc_id") in eval_ids else "adapt"
                if len(roles[role]) < max_docs:
                    roles[role].append(doc.tokens)
            if all(len(v) >= max_docs for v in roles.values()):
                break
        if not roles["adapt"]:
            continue
        batch = {}
        for r, docs in roles.items():
            rng = np.random.default_rng([seed, c.id, 0 if r == "adapt" else 1])
            if r == "adapt":
                batch[r] = pack_windows(
                    [p for d in docs for p in _pieces(d, seq_len, eos, windows_per_doc, rng)], seq_len, eos
                )
                continue
            rows, halves = [], []
            for h in (0, 1):
                pieces = [p for d in docs[h::2] for p in _pieces(d, seq_len, eos, windows_per_doc, rng)]
                if pieces:
                    w = pack_windows(pieces, seq_len, eos)
                    rows.append(w)
                    halves.append(torch.full((len(w),), h, dtype=torch.long))
            batch[r] = torch.cat(rows) if rows else torch.zeros((0, seq_len), dtype=torch.long)
            batch["half"] = torch.cat(halves) if halves else torch.zeros(0, dtype=torch.long)
        out[c.id] = ProbeBatch(
            adapt=batch["adapt"],
            eval=batch["eval"] if eval_split == "split" else None,
            eval_half=batch["half"] if eval_split == "split" else None,
            adapt_docs=len(roles["adapt"]),
            eval_docs=len(roles["eval"]) if eval_split == "split" else None,
        )
    return out
