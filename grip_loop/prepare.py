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
             (orders: per cluster, resumable, spread over the ranks: `grip_loop.prepare_geometry`)
6. judge     four rubric scores of every probe document -> Q_k on [0, 1]
7. write     shards/<order>/cluster-KKKKK/shard-*.tar in order, probe/cluster-KKKKK-*.tar, and
             manifest.json last (the old manifest is removed before any shard is rewritten;
             per unit, resumable, spread over the ranks: `grip_loop.prepare_write`)

Under torchrun, stages 2, 3, the k-means assignment of 4, the orders of 5 and 7 run on every
rank; the rest runs on rank 0 while the others wait (`_on_rank0`: if rank 0 fails, every rank
stops).

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

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from grip_loop import (
    blockwise,
    distributed,
    docstore,
    prepare_cluster,
    prepare_geometry,
    prepare_write,
    workdir,
)
from grip_loop.embed import embed_corpus
from grip_loop.judge import JudgeInput, score_clusters
from grip_loop.manifest import SCHEMA_VERSION, ClusterInfo, Manifest
from grip_loop.naming import CodedValues, describe_clusters, influence_scores
from grip_loop.prepare_cluster import (
    _cluster,
    _knn_stats,
    _pathology,
    _without_faiss_size_warning,
    clusters_from_field,
    heldout_split_codes,
    probe_sizes,
    sigma_streamed,
    small_corpus_notes,
    split_probe,
)
from grip_loop.prepare_common import _CACHED, _atomic_npy, _key, _seed, _Timer
from grip_loop.prepare_config import ClusterConfig, PrepareConfig, load_config
from grip_loop.prepare_ingest import _ingest, _tokenize
from grip_loop.prepare_write import heldout_prefixes
from grip_loop.selection import selection_order

__all__ = ["ClusterConfig", "PrepareConfig", "load_config", "prepare"]

#: Each process's O(N) working arrays, memory-mapped files (`workdir.Scratch`): `OUT/work/tmp/rank-R/`.
SCRATCH = "tmp"

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
        with workdir.bounded_maps():  # RSS: the stage files' pages are read, not kept mapped
            return _run(cfg, out, rank, world)
    finally:
        lock.release()
        distributed.shutdown()


def _run(cfg: PrepareConfig, out: Path, rank: int, world: int) -> Manifest | None:
    timer = _Timer(log=cfg.progress and rank == 0)
    _CACHED.clear()
    work = out / "work"
    if rank == 0:
        work.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(work / SCRATCH, ignore_errors=True)  # what a killed run left
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
    scratch = workdir.Scratch(work / SCRATCH / f"rank-{rank}")
    try:  # the stores' descriptors and maps are closed, the scratch files removed, however the run ends
        return _stages(cfg, out, work, rank, world, ingest, store, tokens, timer, scratch)
    finally:
        store.close()
        tokens.close()
        scratch.close()


def _stages(cfg, out, work, rank, world, ingest, store, tokens, timer, scratch) -> Manifest | None:
    from grip_loop.shards import token_dtype_for

    fp = ingest["fingerprint"]
    t0 = time.perf_counter()
    tok_info = _tokenize(cfg, out, work, store, fp, rank, world)
    timer.record("tokenize", t0, len(store))

    t0 = time.perf_counter()
    emb_key = _key("embed", fp, asdict(cfg.encoder) | {"device": None})
    emb = embed_corpus(store.texts, cfg.encoder, work, emb_key, progress=cfg.progress)
    timer.record("embed", t0, len(store))
    dtype = token_dtype_for(tok_info["vocab_size"])
    lengths = tokens.lengths(out=scratch.empty("lengths", len(store), np.int64))
    fit = _on_rank0(
        rank, lambda: _rank0_fit(cfg, out, work, store, emb, emb_key, ingest, scratch)
    )  # the clusters
    prepare_cluster.assign_blocks(work, emb, rank, world)  # k-means: every rank labels its blocks
    args = (cfg, out, work, store, emb, tok_info, lengths, timer, fit, scratch)
    state = _on_rank0(rank, lambda: _rank0_clusters(*args))  # names, sigma_k, probes
    prepare_geometry.compute(cfg, work, emb, lengths, rank, world)  # each cluster's orders
    args = (cfg, out, work, store, emb, ingest, tok_info, timer, dtype, state, scratch)
    state = _on_rank0(rank, lambda: _rank0_stages(*args))
    t0 = time.perf_counter() - (state["t_plan"] if rank == 0 else 0.0)  # the plan is part of the stage
    written = prepare_write.write(out, work, store, tokens, dtype, rank, world, cfg.progress)
    if rank != 0:
        return None
    n_write = state["n_write"]
    timer.record("write", t0, n_write, skipped=n_write > 0 and written == 0)
    return _manifest(cfg, out, work, store, state, emb.shape[1], ingest, tok_info, dtype, timer)


def _on_rank0(rank: int, fn):
    """`fn()` on rank 0 while the other ranks wait; its result on rank 0 (None elsewhere). When it
    fails, rank 0 raises its error and every other rank stops too, naming it."""
    result, why = None, None
    if rank == 0:
        try:
            result = fn()
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}"
            distributed.broadcast(why)
            raise
    why = distributed.broadcast(why)
    if why is not None:
        raise RuntimeError(f"rank 0 failed ({why}); see its error above")
    return result


def _rank0_fit(cfg, out, work, store, emb, emb_key, ingest, scratch) -> dict:
    """Rank 0: the held-out slice and the clusters (labels too, but for a k-means assignment
    still to do: `prepare_cluster.assign_blocks`). The (N,) arrays are `scratch` maps."""
    n = len(store)
    # the language (or --cluster-by value) of every document: ingest["strata"][codes[i]]
    codes = store.column(4, out=scratch.empty("strata", n, np.int64))

    t0 = time.perf_counter()
    # held-out slice: stratified by the cluster field with --cluster-by (every cluster is
    # represented in the evaluation), by language otherwise
    held = heldout_split_codes(codes, ingest["strata"], cfg.heldout_fraction, cfg.seed)
    train = scratch.full("train", n, True, bool)
    train[held] = False
    if cfg.cluster_by:
        labels = scratch.empty("labels", n, np.int64)
        centroids, labels, names = clusters_from_field(codes, ingest["strata"], emb, train, out=labels)
        _atomic_npy(out / "centroids.npy", centroids)
        n_clusters = len(names)
        cluster_stats = {"method": "field", "field": cfg.cluster_by}
    else:
        if cfg.k > int(train.sum()):
            raise ValueError(
                f"k: {cfg.k} clusters but the corpus has only {int(train.sum())} training documents; lower k"
            )
        with _without_faiss_size_warning():  # small_corpus_notes said it in one line, with the fix
            centroids, labels, cluster_stats = _cluster(cfg, out, work, emb, emb_key, train, held)
        n_clusters, names = cfg.k, None
    return dict(
        held=held,
        train=train,
        centroids=centroids,
        labels=labels,
        names=names,
        n_clusters=n_clusters,
        cluster_stats=cluster_stats,
        t_cluster=t0,
        emb_key=emb_key,
        codes=codes,
        strata=ingest["strata"],
    )


def _rank0_clusters(cfg, out, work, store, emb, tok_info, lengths, timer, fit, scratch) -> dict:
    """Rank 0, after the assignment: the clusters' names and GIS, sigma_k and each cluster's
    probe and training documents (`prepare_geometry.plan`). Returns them. The (N,) arrays are
    `scratch` maps or stage files, read in blocks; a cluster's documents are views of them."""
    n, n_clusters, t0 = len(store), fit["n_clusters"], fit["t_cluster"]
    held, train, centroids, labels, names = (
        fit[k] for k in ("held", "train", "centroids", "labels", "names")
    )
    cluster_stats = fit["cluster_stats"]
    if labels is None:
        centroids, labels, cluster_stats = prepare_cluster.finish_labels(
            cfg, out, work, train, centroids, cluster_stats, scratch
        )
    # the training documents' labels (-1: held out), and each cluster's, ascending
    train_labels = blockwise.fill(
        scratch.empty("train_labels", n, np.int64), lambda lo, hi: np.where(train[lo:hi], labels[lo:hi], -1)
    )
    by_label, bounds = blockwise.group_by_label(
        train_labels, n_clusters, out=scratch.empty("by_label", n, np.int64)
    )
    workdir.release_memory()  # the assignment's and the grouping's temporaries
    # Geometric Influence Scores of the training documents, and from them each cluster's
    # influential documents, terms, languages and (k-means / GEM) name (grip_loop.naming)
    gis = scratch.empty("gis", n, np.float64)  # blocks of 8192 rows: float64 copies of (block, dim) floats
    gis = influence_scores(emb, train_labels, n_clusters, block=8192, out=gis)
    described = describe_clusters(
        train_labels,
        n_clusters,
        # every member's language: ingest's codes (strata are the languages without --cluster-by)
        store.field("lang") if cfg.cluster_by else CodedValues(fit["codes"], fit["strata"]),
        store.field("path"),
        store.texts,
        seed=cfg.seed,
        gis=gis,
        members=[by_label[bounds[k] : bounds[k + 1]] for k in range(n_clusters)],
        spill_dir=str(scratch.folder),
    )
    if not cfg.cluster_by:
        names = [c["name"] for c in described]
    (out / "stats").mkdir(exist_ok=True)
    gis32 = blockwise.fill(scratch.empty("gis32", n, np.float32), lambda lo, hi: gis[lo:hi])
    _atomic_npy(out / "stats" / "gis.npy", gis32)
    timer.record("cluster", t0, n)

    t0 = time.perf_counter()
    sizes = np.diff(bounds)
    sigma = sigma_streamed(emb, labels, train, centroids)
    n_probe = probe_sizes(sizes, sigma, cfg.probe_fraction, cfg.probe_min_per_cluster)
    flat, mb, probes = scratch.empty("members", int(bounds[-1]), np.int64), [0], []
    for k in range(n_clusters):
        m = by_label[bounds[k] : bounds[k + 1]]
        # a uniform draw, kept in draw order: any prefix is a uniform sample, and the probe's
        # adaptation / evaluation roles alternate along it (split_probe)
        pick = selection_order(np.ones(len(m)), seed=_seed(cfg.seed, k, 1))[: n_probe[k]]
        probes.append(m[pick])
        if not cfg.probe_eval_in_training:  # the probe measures documents training never sees
            held_out = np.asarray(split_probe(m[pick].tolist())[1], np.int64)
            m = m[~np.isin(m, held_out)]
            train[held_out] = False
        flat[mb[-1] : mb[-1] + len(m)] = m
        mb.append(mb[-1] + len(m))
        workdir.trim_maps()
    mb = np.asarray(mb, np.int64)
    knn_cfg = [cfg.orders, cfg.beta, cfg.knn_k, cfg.knn_approx_above, cfg.knn_target_recall, cfg.seed]
    prepare_geometry.plan(work, flat, mb, [fit["emb_key"], tok_info["key"], *knn_cfg])
    return dict(
        n_clusters=n_clusters,
        names=names,
        members=[flat[mb[k] : mb[k + 1]] for k in range(n_clusters)],
        probes=probes,
        sizes=np.diff(mb),
        lengths=lengths,
        sigma=sigma,
        described=described,
        held=held,
        labels=labels,
        train=train,
        n_probe=n_probe,
        cluster_stats=cluster_stats,
        t_geometry=t0,
        codes=fit["codes"],
        strata=fit["strata"],
    )


def _rank0_stages(cfg, out, work, store, emb, ingest, tok_info, timer, dtype, st, scratch) -> dict:
    """Rank 0, after every rank computed its clusters' orders: the rest of the geometry stage,
    the judge stage, then the plan of the write stage (its streams of documents,
    `prepare_write.plan`, laid out one at a time). Returns what the manifest needs."""
    n, n_clusters, lengths, probes = len(store), st["n_clusters"], st["lengths"], st["probes"]
    members, held, labels, train = st["members"], st["held"], st["labels"], st["train"]
    knn_info = prepare_geometry.knn_infos(work, n_clusters)
    pathology = _pathology(cfg, out, emb, lengths)
    timer.record("geometry", st["t_geometry"], n)

    t0 = time.perf_counter()
    judge = cfg.judge.build(cache_dir=work)

    def judge_inputs(p):  # one cluster's probe documents, read when the judge gets to them
        for i in p.tolist():
            meta = store.meta(i)
            yield JudgeInput(meta["id"], store.text(i), meta["lang"])

    # scored a chunk of documents at a time, keeping each cluster's results only (not every
    # probe document's text and scores: ~30 MB at K = 10^4, docs/benchmarks.md 7f)
    quality, dims, n_judged = score_clusters(judge, (list(judge_inputs(p)) for p in probes))
    timer.record("judge", t0, n_judged)

    t0 = time.perf_counter()

    def in_order(k: int, name: str):  # cluster k's training documents in the order `name`
        return lambda: members[k][prepare_geometry.orders(cfg, work, k, [name])[name]]

    if cfg.cluster_by:
        held_lang = np.array([store.meta(int(i))["lang"] for i in held], dtype=object)
    else:  # ingest's stratum codes are the languages: no metadata read per held-out document
        held_lang = np.asarray(st["strata"], dtype=object)[
            workdir.take_rows(st["codes"], held).astype(np.int64)
        ]
    held_langs: dict[str, int] = {}
    held_streams = []
    for lang, prefix in heldout_prefixes(sorted(set(held_lang.tolist()))).items():
        mine = held[held_lang == lang]
        held_langs[lang] = len(mine)
        held_streams.append(("heldout", prefix, mine, workdir.take_rows(labels, mine), cfg.shard_max_docs))
    del held_lang

    def streams():  # in manifest order, made one at a time as the plan lays them out
        for k in range(n_clusters):
            workdir.trim_maps()
            for name in cfg.orders:
                yield (f"shards/{name}/cluster-{k:05d}", "shard", in_order(k, name), k, cfg.shard_max_docs)
            yield ("probe", f"cluster-{k:05d}", probes[k], k, 1 << 30)
        yield from held_streams

    # bounds of each document's bytes in a shard: tokens, text, tar headers (lower); + the meta JSON, escaped
    size = np.dtype(dtype).itemsize
    lower = store.column(1, out=scratch.empty("lower", n, np.int64))
    blockwise.fill(lower, lambda lo, hi: lengths[lo:hi] * size + 3 * 512 + lower[lo:hi])
    upper = store.column(3, out=scratch.empty("upper", n, np.int64))
    blockwise.fill(upper, lambda lo, hi: lower[lo:hi] + 3 * upper[lo:hi] + prepare_write._META_FIXED_BYTES)
    prepare_write.plan(
        out,
        work,
        streams=streams(),
        lower=lower,
        upper=upper,
        key_parts=[ingest["fingerprint"], tok_info["key"], tok_info["sha256"], dtype],
        scratch=scratch,
    )
    return st | dict(
        quality=quality,
        dims=dims,
        held_langs=held_langs,
        judge=judge,
        pathology=pathology,
        knn_info=knn_info,
        n_write=int(train.sum()) * len(cfg.orders) + len(held),
        t_plan=time.perf_counter() - t0,
    )


def _manifest(cfg, out, work, store, st, dim, ingest, tok_info, dtype, timer) -> Manifest:
    """Rank 0, after every rank wrote its units: the manifest, with the shards read from the
    units' records on disk (`prepare_write.shard_lists`, in the order the plan laid them out)."""
    lists = iter(prepare_write.shard_lists(work))
    lengths, train, held = st["lengths"], st["train"], st["held"]
    n_train, n_tokens = int(train.sum()), blockwise.masked_sum(lengths, train)
    clusters = []
    for k in range(st["n_clusters"]):
        workdir.trim_maps()
        m, order = st["members"][k], prepare_geometry.orders(cfg, work, k)
        shard_lists = {name: next(lists) for name in cfg.orders}
        probe_infos = next(lists)
        probe_ids = [store.meta(int(i))["id"] for i in st["probes"][k]]
        described = st["described"][k]
        lm = workdir.take_rows(lengths, m)  # positioned reads: a cluster's rows are scattered
        clusters.append(
            ClusterInfo(
                id=k,
                name=st["names"][k],
                n_docs=int(st["sizes"][k]),
                n_tokens=int(lm.sum()),
                mean_length=float(lm.mean()) if len(m) else 0.0,
                sigma=float(st["sigma"][k]),
                quality=float(st["quality"][k]),
                quality_scores=st["dims"][k],
                probe_ids=probe_ids,
                eval_ids=split_probe(probe_ids)[1],
                probe_shards=probe_infos,
                shards=shard_lists,
                examples=[store.meta(int(m[j]))["path"] for j in order[cfg.orders[0]][: cfg.n_examples]],
                languages=described["languages"],
                top_terms=described["top_terms"],
                influential=[store.meta(int(i))["path"] for i in described["influential"]],
            )
        )
    heldout_infos = [s for infos in lists for s in infos]
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
        k=st["n_clusters"],
        seed=cfg.seed,
        orders=list(cfg.orders),
        clusters=clusters,
        config=cfg.to_dict(),
        heldout=heldout_infos,
        stats={
            "n_docs": n_train,
            "n_tokens": n_tokens,
            "mean_length": float(np.float64(n_tokens) / n_train),  # what lengths[train].mean() is
            "heldout_docs": len(held),
            "heldout_langs": st["held_langs"],
            "read": ingest["read_stats"],
            "probe_docs": int(st["n_probe"].sum()),
            "probe_eval_docs": sum(len(c.eval_ids) for c in clusters),
            "probe_eval_in_training": cfg.probe_eval_in_training,
            "judge": getattr(st["judge"], "stats", {"kind": cfg.judge.kind}),
            "length_knn": st["pathology"],
            "knn": _knn_stats(cfg, st["knn_info"]),
            "centroids": "centroids.npy",
            "clustering": st["cluster_stats"],
            "gis": "stats/gis.npy",
            "timings": timer.stages,
        },
    )
    manifest.save(out)
    return manifest
