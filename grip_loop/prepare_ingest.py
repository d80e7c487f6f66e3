"""`grip prepare` stages 1-2: ingest (the corpus streamed into document parts) and tokenize
(the BPE trained on a bounded seeded sample on rank 0, then every part encoded, part p on rank
p mod world). Each writes its record last; a resume checks it before trusting the files."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np

from grip_loop import distributed, docstore, workdir
from grip_loop.prepare_common import (
    _atomic_json,
    _atomic_npy,
    _cached,
    _file_sha256,
    _finished,
    _key,
    _note,
    _sha_matches,
)
from grip_loop.prepare_config import PrepareConfig

#: Documents encoded at a time in the tokenize stage (one read of their texts).
TOKENIZE_BATCH = 1024


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
        scratch_dir=work / "tmp" / "ingest",  # the ids seen so far, memory-mapped (prepare.SCRATCH)
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


def _tokenize(
    cfg: PrepareConfig, out: Path, work: Path, store: docstore.DocStore, fp: str, rank: int, world: int
) -> dict:
    """Train (or load) the tokenizer on rank 0, then encode the document parts, part p on rank
    p mod world; each part is skipped when its record, key and checksums check out. Returns the
    tokenizer's record (`work/tokens.json`)."""
    from tqdm import tqdm

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
            workdir.release_memory()  # the BPE training's (its threads' arenas included)
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
    mine = range(rank, len(store.names), world)
    bar = tqdm(
        total=sum(int(store.starts[p + 1] - store.starts[p]) for p in mine),
        desc="tokenize" if world == 1 else f"tokenize (rank 0's {len(mine)} of {len(store.names)} parts)",
        unit="doc",
        disable=not cfg.progress or rank != 0,
        mininterval=5.0,
    )
    for p in mine:
        name = store.names[p]
        part_key = _key("tokens", info["key"], info["sha256"], store.names[p], len(store.idx(p)))
        rec_path = tok_dir / f"{name}.json"
        files = {s: tok_dir / f"{name}.{s}" for s in ("ids.npy", "offsets.npy")}
        rec = _finished(rec_path, part_key, "tokenize")
        if rec is not None:
            sums = rec.get("sha256") if isinstance(rec.get("sha256"), dict) else {}
            bad = next((f for s, f in files.items() if not _sha_matches(f, sums.get(s))), None)
            if bad is None:
                bar.update(len(store.idx(p)))
                continue
            _note(
                bad,
                "missing, or does not match the checksum recorded when it was written",
                f"tokenize ({name})",
            )
        rec_path.unlink(missing_ok=True)
        tok = tok or tk.load_tokenizer(tok_file)
        # a batch of texts at a time: what is held is the part's token ids, not its texts too
        chunks, lens = [], [np.zeros(1, np.int64)]
        for texts in store.part_text_batches(p, TOKENIZE_BATCH):  # (trims the maps a batch)
            ids = tk.encode(tok, texts, batch_size=TOKENIZE_BATCH)
            lens.append(np.fromiter((len(x) for x in ids), np.int64, len(ids)))
            chunks.append(np.concatenate(ids).astype(dtype))
            del ids, texts
        offsets = np.cumsum(np.concatenate(lens))
        flat = np.concatenate(chunks) if chunks else np.zeros(0, dtype)
        del chunks
        _atomic_npy(files["ids.npy"], flat)
        _atomic_npy(files["offsets.npy"], offsets)
        _atomic_json(rec_path, {"key": part_key, "sha256": {s: _file_sha256(f) for s, f in files.items()}})
        bar.update(len(offsets) - 1)
        del flat, offsets
        workdir.release_memory()  # a part's freed strings and arrays, back before the next part
    bar.close()
    distributed.barrier()
    return info
