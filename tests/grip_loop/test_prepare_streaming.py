"""`grip prepare` out of core: document / token parts, the hashed encoder, approximate kNN, and
output independent of the part size and of the number of processes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from grip_loop.docstore import open_work, read_docs
from grip_loop.prepare import PrepareConfig, prepare

ROOT = Path(__file__).resolve().parents[2]
WORDS = [f"w{i}" for i in range(400)]


def synthetic_corpus(path: Path, n: int, seed: int = 0) -> Path:
    """n small JSONL documents from 6 topics (each topic draws from its own slice of words)."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as fh:
        for i in range(n):
            topic = int(rng.integers(6))
            words = rng.choice(WORDS[topic * 60 : topic * 60 + 80], int(rng.integers(5, 40)))
            lang = ["python", "c", "go"][topic % 3]
            fh.write(json.dumps({"id": f"d{i}", "text": " ".join(words), "lang": lang}) + "\n")
    return path


def _cfg(corpus, out, **kw):
    base = dict(
        corpus=str(corpus),
        out=str(out),
        k=4,
        vocab_size=300,
        encoder={"kind": "hashed", "dim": 32, "hash_buckets": 1024, "block_size": 50},
        kmeans_niter=5,
        probe_min_per_cluster=4,
        orders=["grip", "random"],
        shard_max_docs=40,
        progress=False,
    )
    return PrepareConfig.from_dict({**base, **kw})


def _files(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.parts[len(out.parts)] in ("shards", "probe", "heldout", "tokenizer")
    }


def _comparable(out: Path) -> dict:
    m = json.loads((out / "manifest.json").read_text())
    m["stats"].pop("timings")
    for k in ("out", "ingest_part_docs"):
        m["config"].pop(k)
    return m


@pytest.mark.slow
def test_parts_are_an_implementation_detail(tmp_path):
    """Ingest into parts of 64 documents or into one part: the same documents and token ids,
    the same manifest and byte-identical shards. Approximate kNN above 40 members is logged."""
    corpus = synthetic_corpus(tmp_path / "c.jsonl", 300)
    a, b = tmp_path / "a", tmp_path / "b"
    ma = prepare(_cfg(corpus, a, ingest_part_docs=64, knn_approx_above=40))
    prepare(_cfg(corpus, b, ingest_part_docs=10_000, knn_approx_above=40))
    assert len(json.loads((a / "work" / "ingest.json").read_text())["parts"]) == 5
    assert len(list((a / "work" / "tokens").glob("part-*.ids.npy"))) == 5
    assert read_docs(a / "work") == read_docs(b / "work")
    (da, ta), (_, tb) = open_work(a / "work"), open_work(b / "work")
    assert all(np.array_equal(ta.tokens(i), tb.tokens(i)) for i in range(len(da)))
    assert _comparable(a) == _comparable(b)
    assert _files(a) == _files(b)
    knn = ma.stats["knn"]
    assert knn["approx_clusters"] >= 1 and knn["min_recall"] >= 0.95
    assert knn["approx_clusters"] + knn["exact_clusters"] == ma.k
    assert ma.encoder["kind"] == "hashed" and ma.encoder["dim"] == 32


@pytest.mark.slow
def test_torchrun_two_processes_write_the_same_bytes_as_one(tmp_path):
    """gloo on CPU: tokenize parts, embedding blocks and shard-writing units split over 2 ranks;
    the manifest and every shard equal one process's, byte for byte. Then units lost from the
    2-process folder are redone by a 2-process re-run, and only they."""
    corpus = synthetic_corpus(tmp_path / "c.jsonl", 240)
    cfg = tmp_path / "cfg.yaml"
    d = _cfg(corpus, tmp_path / "x", ingest_part_docs=50).to_dict()
    for k in ("corpus", "out"):
        d.pop(k)
    import yaml

    cfg.write_text(yaml.safe_dump(d))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    outs = {1: tmp_path / "p1", 2: tmp_path / "p2"}

    def run(nproc: int) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
        cmd += [
            "-m",
            "train",
            "prepare",
            "--corpus",
            str(corpus),
            "--out",
            str(outs[nproc]),
            "--config",
            str(cfg),
        ]
        r = subprocess.run(
            cmd + ["--no-progress"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    run(1)
    run(2)
    m1, m2 = _comparable(outs[1]), _comparable(outs[2])
    assert m1 == m2
    assert _files(outs[1]) == _files(outs[2])
    e1, e2 = (np.load(o / "work" / "embeddings.npy") for o in outs.values())
    assert np.array_equal(e1, e2)
    # both ranks computed clusters' orders and wrote units; clusters of more than
    # shard_max_docs documents were cut into shard units
    geometry = [json.loads(p.read_text()) for p in (outs[2] / "work" / "geometry").glob("cluster-*.json")]
    assert {g["rank"] for g in geometry} == {0, 1}
    records = {
        p.name: p for p in sorted((outs[2] / "work" / "write").glob("*.json")) if p.name != "plan.json"
    }
    ranks = {name: json.loads(p.read_text())["rank"] for name, p in records.items()}
    assert set(ranks.values()) == {0, 1}
    assert any(name.endswith("shard-000001.json") for name in ranks)
    # a unit of each rank lost (its record, or a shard): redone, and nothing else
    lost = [next(n for n, r in ranks.items() if r == rank) for rank in (0, 1)]
    (records[lost[0]]).unlink()
    shard = json.loads(records[lost[1]].read_text())["shards"][0]["path"]
    (outs[2] / shard).unlink()
    stamps = {n: p.stat().st_mtime_ns for n, p in records.items() if n not in lost}
    run(2)
    assert _comparable(outs[2]) == m1 and _files(outs[2]) == _files(outs[1])
    assert {n: records[n].stat().st_mtime_ns for n in stamps} == stamps
    assert all(records[n].is_file() for n in lost)


def test_a_failed_write_unit_is_named_and_a_rerun_redoes_only_the_unfinished_units(
    tmp_path, monkeypatch, capsys
):
    from grip_loop.shards import ShardWriter, verify_prepared

    corpus = synthetic_corpus(tmp_path / "c.jsonl", 120)
    out = tmp_path / "out"
    real, calls = ShardWriter.write_encoded, {"n": 0}

    def write(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 50:
            raise OSError("a disk error")
        return real(self, *a, **kw)

    monkeypatch.setattr(ShardWriter, "write_encoded", write)
    with pytest.raises(OSError, match="a disk error"):
        prepare(_cfg(corpus, out))
    err = capsys.readouterr().err
    assert "error: grip prepare: rank 0: writing shards/" in err and "failed: a disk error" in err
    assert not (out / "manifest.json").exists()
    assert not (out / "work" / "tmp").exists()  # the scratch arrays are removed however a run ends
    done = len(list((out / "work" / "write").glob("*__*.json")))
    assert done >= 1
    calls["n"] = -(10**9)  # no more failures
    m = prepare(_cfg(corpus, out))
    assert verify_prepared(m, out, "full") == "full"
    total = sum(s.n_docs for c in m.clusters for ss in [*c.shards.values(), c.probe_shards] for s in ss)
    total += sum(s.n_docs for s in m.heldout)
    assert 0 < calls["n"] + 10**9 < total  # the finished units were not written again
    assert not list(out.rglob("*.tmp"))


def test_scratch_arrays_are_removed_and_a_killed_runs_are_cleared_on_resume(tmp_path):
    corpus = synthetic_corpus(tmp_path / "c.jsonl", 120)
    out = tmp_path / "out"
    prepare(_cfg(corpus, out))
    assert not (out / "work" / "tmp").exists()
    want, files = _comparable(out), _files(out)
    stale = out / "work" / "tmp" / "rank-1"  # what a SIGKILLed run of two processes left
    stale.mkdir(parents=True)
    (stale / "lengths.bin").write_bytes(b"\0" * 64)
    shutil.rmtree(out / "work" / "write")  # the write stage is planned and written again
    prepare(_cfg(corpus, out))
    assert not (out / "work" / "tmp").exists()
    assert _comparable(out) == want and _files(out) == files


@pytest.mark.parametrize("seed", [0, 1])
def test_kmeans_assignment_by_block_over_ranks_equals_one_assign(tmp_path, seed):
    """The assignment's blocks, split over 3 (simulated) ranks in any order, give the labels of
    one `assign` over every row."""
    from grip_loop import workdir
    from grip_loop.cluster import assign
    from grip_loop.prepare_cluster import assign_blocks

    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((1000, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    centroids = emb[rng.choice(1000, 7, replace=False)]
    adir = tmp_path / "assign"
    adir.mkdir()
    np.save(adir / "centroids.npy", centroids)
    workdir.atomic_json(adir / "plan.json", {"key": "k", "n": len(emb), "block": 96})
    for rank in (2, 0, 1):
        assign_blocks(tmp_path, emb, rank, 3)
    blocks = sorted(adir.glob("block-*.npy"))
    assert len(blocks) == 11
    labels = np.concatenate([np.load(b) for b in blocks])
    assert np.array_equal(labels, assign(emb, centroids))
    assert len(np.unique(labels)) > 1


def test_ingest_spills_the_seen_ids_to_scratch_and_removes_them(tmp_path, monkeypatch):
    """The ingest's id set merged into its memory-mapped file every 5 ids (`grip_loop.idset`):
    the same prepared folder as with the ids in memory, and no file left under work/tmp."""
    import grip_loop.idset as idset

    corpus = synthetic_corpus(tmp_path / "c.jsonl", 120)
    with open(corpus, "a") as fh:  # repeated ids: renamed the same way by both
        fh.write(json.dumps({"id": "d3", "text": "alpha beta gamma", "lang": "c"}) + "\n")
    prepare(_cfg(corpus, tmp_path / "a"))
    spilled = []
    real = idset.SeenIds._merge_file

    def merge_file(self, new):
        real(self, new)
        spilled.append(
            os.readlink(f"/proc/self/fd/{self._fd}") if sys.platform == "linux" else "/work/tmp/ingest/"
        )

    monkeypatch.setattr(idset.SeenIds.__init__, "__defaults__", (None, 5))
    monkeypatch.setattr(idset.SeenIds, "_merge_file", merge_file)
    prepare(_cfg(corpus, tmp_path / "b"))
    assert len(spilled) >= 20 and all("/work/tmp/ingest/" in f for f in spilled)
    assert not (tmp_path / "b" / "work" / "tmp").exists()
    a, b = _comparable(tmp_path / "a"), _comparable(tmp_path / "b")
    assert a == b and _files(tmp_path / "a") == _files(tmp_path / "b")
    for run in ("a", "b"):
        assert (
            json.loads((tmp_path / run / "work" / "ingest.json").read_text())["read_stats"]["duplicate_ids"]
            == 1
        )


def test_no_stage_gathers_scattered_rows_through_a_file_map(tmp_path, monkeypatch):
    """Every gather of rows spread over a memory-mapped file goes through `workdir.take_rows`
    (positioned reads), never through the map: one such gather maps the page-cache folio around
    each row, most of the file at 10^7 documents, and only a 10^7-document run showed each one
    (docs/benchmarks.md 7h: the naming's `gis[m]`, the write plan's `upper[members]`). Here every
    integer or boolean index of an `np.memmap` of a file during a whole `grip prepare` is
    checked: one whose rows span more than half of the file fails the test, naming the site.
    Gathers inside a contiguous slice (one cluster's members) stay allowed."""
    import traceback

    found: list[str] = []
    real = np.memmap.__getitem__

    def spread(a, index) -> float:  # the fraction of a's file the index's rows span
        i = index[0] if isinstance(index, tuple) and index else index
        if isinstance(i, list):
            i = np.asarray(i)
        if not isinstance(i, np.ndarray) or i.ndim != 1 or not i.size or a.filename is None:
            return 0.0
        rows = np.flatnonzero(i) if i.dtype == bool else np.where(i < 0, i + len(a), i)
        if not len(rows):
            return 0.0
        row_bytes = a.itemsize * int(np.prod(a.shape[1:]))
        return (int(rows.max()) - int(rows.min()) + 1) * row_bytes / max(1, os.path.getsize(a.filename))

    def getitem(self, index):
        if spread(self, index) > 0.5:
            site = traceback.extract_stack(limit=2)[0]  # the line that indexed
            found.append(
                f"{Path(site.filename).name}:{site.lineno} ({site.name}): {Path(self.filename).name}"
            )
        return real(self, index)

    monkeypatch.setattr(np.memmap, "__getitem__", getitem)
    probe = np.memmap(tmp_path / "probe.bin", np.int64, "w+", shape=(4096,))
    probe[np.array([0, 4095])]  # the check itself: a scattered gather is seen
    assert len(found) == 1 and "probe.bin" in found.pop()
    probe[np.arange(10, 20)]  # a contiguous run of rows is not
    assert not found
    corpus = synthetic_corpus(tmp_path / "c.jsonl", 1500)
    prepare(_cfg(corpus, tmp_path / "out", k=6, knn_approx_above=40))
    assert not found, "gathers through a file map (use workdir.take_rows):\n" + "\n".join(sorted(set(found)))
