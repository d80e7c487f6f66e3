"""End to end on a real corpus: 120 small files of the running Python's standard library, on CPU."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from grip_loop.docstore import open_work, read_docs
from grip_loop.manifest import load_manifest
from grip_loop.prepare import PrepareConfig, load_config, prepare
from grip_loop.prepare_cluster import heldout_split, probe_sizes
from grip_loop.shards import iter_shard
from tests.stdlib_prepared import N_DOCS, TINY, _cfg

ROOT = Path(__file__).resolve().parents[2]


def _comparable(directory):
    m = json.loads((Path(directory) / "manifest.json").read_text())
    m["stats"].pop("timings")
    m["config"].pop("out")
    return m


def _shard_docs(directory, m, order, k):
    return [
        (d.key, d.tokens.tolist(), d.meta)
        for s in m.clusters[k].shards[order]
        for d in iter_shard(Path(directory) / s.path, m.tokenizer["token_dtype"])
    ]


@pytest.mark.slow
def test_end_to_end_manifest_and_shards(stdlib_prepared):
    m = load_manifest(stdlib_prepared)
    cfg = PrepareConfig.from_dict(m.config)
    n_held = m.stats["heldout_docs"]
    n_eval = m.stats["probe_eval_docs"]
    assert n_eval == sum(len(c.eval_ids) for c in m.clusters) > 0
    assert m.n_docs == m.stats["n_docs"] == N_DOCS - n_held - n_eval and n_held >= 1
    assert m.stats["read"]["skipped"] == {"binary": 1, "empty": 1}
    assert m.k == 8 and m.orders == ["grip", "diversity", "random"]
    emb = np.load(stdlib_prepared / "work" / "embeddings.npy")
    labels = np.load(stdlib_prepared / "work" / "labels.npy")
    centroids = np.load(stdlib_prepared / "centroids.npy")
    assert emb.shape == (N_DOCS, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert np.array_equal(labels, np.argmax(emb @ centroids.T, axis=1))
    docs = read_docs(stdlib_prepared / "work")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(stdlib_prepared / m.tokenizer["path"]))
    assert m.tokenizer["eos_id"] == tok.token_to_id("<|endoftext|>")
    before_split = np.array(m.sizes) + np.array([len(c.eval_ids) for c in m.clusters])  # Eq. 4's N_k
    n_probe = probe_sizes(
        before_split, np.array([c.sigma for c in m.clusters]), 0.02, cfg.probe_min_per_cluster
    )
    held = {d.meta["doc_id"] for s in m.heldout for d in iter_shard(stdlib_prepared / s.path, "uint16")}
    train = np.array([d["id"] not in held for d in docs])
    in_file_order = 0
    evaluation = {i for c in m.clusters for i in c.eval_ids}
    for c in m.clusters:
        members = np.flatnonzero(
            (labels == c.id) & train & np.array([d["id"] not in evaluation for d in docs])
        )
        assert c.n_docs == len(members)  # the probe's evaluation documents are not trained on
        assert 0 <= c.quality <= 1 and 0 <= c.sigma < 2  # 0: a singleton cluster
        assert len(c.probe_ids) == n_probe[c.id] >= min(cfg.probe_min_per_cluster, c.n_docs)
        member_ids = {docs[i]["id"] for i in members}
        assert set(c.probe_ids) - set(c.eval_ids) <= member_ids and not set(c.eval_ids) & member_ids
        # the probe's split: every other document along the (random) draw is an evaluation one
        assert c.eval_ids == c.probe_ids[1::2] and len(c.eval_ids) == len(c.probe_ids) // 2
        ids = [d["id"] for d in docs]
        in_file_order += c.probe_ids == sorted(c.probe_ids, key=ids.index)
        assert c.name and c.name.split(":")[0] in {"python", "mixed"}
        probe = [
            d
            for s in c.probe_shards
            for d in iter_shard(stdlib_prepared / s.path, m.tokenizer["token_dtype"])
        ]
        assert [d.meta["doc_id"] for d in probe] == c.probe_ids
        per_order = {}
        for order in m.orders:
            got = _shard_docs(stdlib_prepared, m, order, c.id)
            assert [meta["position"] for _, _, meta in got] == list(range(c.n_docs))
            assert {int(key) for key, _, _ in got} == set(members.tolist())
            for key, ids, meta in got[:5]:  # stored ids are the tokenizer's ids of the text
                assert ids == tok.encode(docs[int(key)]["text"], add_special_tokens=False).ids
                assert meta["length"] == len(ids) and meta["cluster"] == c.id
            per_order[order] = [int(key) for key, _, _ in got]
        assert c.examples == [docs[i]["path"] for i in per_order["grip"][: cfg.n_examples]]
        assert sum(len(v) for v in per_order.values()) == 3 * c.n_docs
    assert in_file_order < m.k  # the probe is a uniform draw kept in draw order, not file order
    assert len(set(m.names)) == m.k  # names are unique
    assert sum(c.n_tokens for c in m.clusters) == m.stats["n_tokens"]
    assert m.stats["probe_docs"] == n_probe.sum() >= round(0.02 * N_DOCS)


def test_heldout_split_is_disjoint_and_stratified(stdlib_prepared):
    """Held-out documents are in no training or probe shard; counts per language follow the rule."""
    from collections import Counter

    m = load_manifest(stdlib_prepared)
    docs = read_docs(stdlib_prepared / "work")
    held = [d for s in m.heldout for d in iter_shard(stdlib_prepared / s.path, "uint16")]
    held_ids = [d.meta["doc_id"] for d in held]
    assert len(set(held_ids)) == len(held_ids) == m.stats["heldout_docs"] >= 1
    trained = {
        d.meta["doc_id"]
        for c in m.clusters
        for s in [*c.shards["grip"], *c.probe_shards]
        for d in iter_shard(stdlib_prepared / s.path, "uint16", with_text=False)
    }
    assert not trained & set(held_ids)
    assert len(trained) + len(held_ids) == N_DOCS  # nothing lost either
    by_lang = Counter(d["lang"] for d in docs)
    expect = {lang: min(int(np.floor(0.02 * n + 0.5)), n - 1) for lang, n in by_lang.items()}
    assert m.stats["heldout_langs"] == {k: v for k, v in expect.items() if v}
    assert Counter(d.meta["lang"] for d in held) == Counter(m.stats["heldout_langs"])
    assert all(0 <= d.meta["cluster"] < m.k for d in held)


def test_heldout_split_function():
    langs = ["py"] * 500 + ["c"] * 100 + ["go"] * 10 + ["rs"] * 1
    for seed in range(3):
        idx = heldout_split(langs, 0.1, seed)
        got = np.array(langs, dtype=object)[idx]
        assert (got == "py").sum() == 50 and (got == "c").sum() == 10 and (got == "go").sum() == 1
        assert (got == "rs").sum() == 0  # a language keeps at least one training document
        assert np.all(np.diff(idx) > 0)
    assert not np.array_equal(heldout_split(langs, 0.1, 0), heldout_split(langs, 0.1, 1))
    assert np.array_equal(heldout_split(langs, 0.1, 4), heldout_split(langs, 0.1, 4))
    assert len(heldout_split(langs, 0.0, 0)) == 0
    with pytest.raises(ValueError, match="heldout_fraction"):
        PrepareConfig(heldout_fraction=1.0)


@pytest.mark.slow
def test_grip_order_is_the_es_order_of_eq10_weights(stdlib_prepared):
    """Rebuild cluster 0's orders from the saved embeddings with the library math: same stream."""
    from grip_loop.prepare_cluster import cluster_orders
    from grip_loop.prepare_common import _seed

    m = load_manifest(stdlib_prepared)
    emb = np.load(stdlib_prepared / "work" / "embeddings.npy")
    labels = np.load(stdlib_prepared / "work" / "labels.npy")
    lengths = open_work(stdlib_prepared / "work")[1].lengths()
    k = int(np.argmax(m.sizes))
    ids = [d["id"] for d in read_docs(stdlib_prepared / "work")]
    held = {d.meta["doc_id"] for s in m.heldout for d in iter_shard(stdlib_prepared / s.path, "uint16")}
    not_trained = held | set(m.clusters[k].eval_ids)  # held-out slice, the probe's evaluation documents
    members = np.array([i for i in np.flatnonzero(labels == k) if ids[i] not in not_trained])
    orders = cluster_orders(emb[members], lengths[members], m.orders, beta=0.3, knn_k=10, seed=_seed(0, k, 0))
    for order in m.orders:
        assert [int(key) for key, _, _ in _shard_docs(stdlib_prepared, m, order, k)] == members[
            orders[order]
        ].tolist()
    assert orders["grip"].tolist() != orders["random"].tolist()


@pytest.mark.slow
def test_deterministic_for_a_fixed_seed(stdlib_prepared, stdlib_corpus, tmp_path):
    """Every stage after embedding redone from scratch (embeddings are checked by test_embed)."""
    again = tmp_path / "again"
    (again / "work").mkdir(parents=True)
    for f in ("embeddings.npy", "embeddings.done.npy", "embeddings.json"):
        shutil.copy(stdlib_prepared / "work" / f, again / "work" / f)
    prepare(_cfg(stdlib_corpus, again))
    assert _comparable(again) == _comparable(stdlib_prepared)
    m = load_manifest(again)
    for k in range(m.k):
        assert _shard_docs(again, m, "grip", k) == _shard_docs(stdlib_prepared, m, "grip", k)
    assert (again / "tokenizer" / "tokenizer.json").read_bytes() == (
        stdlib_prepared / "tokenizer" / "tokenizer.json"
    ).read_bytes()
    other = tmp_path / "other"
    shutil.copytree(again / "work", other / "work")
    prepare(_cfg(stdlib_corpus, other, seed=1))
    assert _comparable(other)["clusters"] != _comparable(stdlib_prepared)["clusters"]


@pytest.mark.slow
def test_resume_after_interruption(stdlib_prepared, stdlib_corpus, tmp_path, monkeypatch, capsys):
    from grip_loop.embed import Encoder
    from grip_loop.shards import ShardWriter

    out = tmp_path / "resumed"
    real_embed, real_write = Encoder.embed, ShardWriter.write_encoded
    calls = {"embed": 0, "write": 0}

    def embed_then_die(self, texts):
        calls["embed"] += 1
        if calls["embed"] == 2:
            raise KeyboardInterrupt("killed in embed")
        return real_embed(self, texts)

    def write_then_die(self, *a, **kw):
        calls["write"] += 1
        if calls["write"] == 100:
            raise KeyboardInterrupt("killed in write")
        return real_write(self, *a, **kw)

    monkeypatch.setattr(Encoder, "embed", embed_then_die)
    monkeypatch.setattr(ShardWriter, "write_encoded", write_then_die)  # every document passes through it
    with pytest.raises(KeyboardInterrupt, match="embed"):
        prepare(_cfg(stdlib_corpus, out))
    assert not (out / "manifest.json").exists()
    with pytest.raises(KeyboardInterrupt, match="write"):
        prepare(_cfg(stdlib_corpus, out))
    assert calls["embed"] == 2 + 1  # 2 blocks of 64: the finished one was not redone
    assert not (out / "manifest.json").exists()
    assert list(out.rglob("*.tmp")) == []  # the shard being written was dropped
    with pytest.raises(Exception, match="re-run `grip prepare"):
        load_manifest(out)
    capsys.readouterr()
    m = prepare(_cfg(stdlib_corpus, out))
    assert calls["embed"] == 3  # nothing re-embedded
    assert _comparable(out) == _comparable(stdlib_prepared)
    # the stages taken from OUT/work say so (not a meaningless docs/s)
    said = capsys.readouterr().out
    for stage in ("ingest", "tokenize", "cluster"):
        assert f"{stage}: cached" in said and m.stats["timings"][stage].get("resumed"), stage
    assert not m.stats["timings"]["write"].get("resumed")


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(stdlib_prepared, stdlib_corpus, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "train",
    ]
    cmd += [
        "prepare",
        "--corpus",
        str(stdlib_corpus),
        "--out",
        str(out),
        "--config",
        str(TINY),
        "--no-progress",
    ]
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    one = np.load(stdlib_prepared / "work" / "embeddings.npy")
    two = np.load(out / "work" / "embeddings.npy")
    assert np.allclose(one, two, atol=1e-5)
    assert _comparable(out) == _comparable(stdlib_prepared)


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        prepare(PrepareConfig(corpus=str(tmp_path / "nope"), out=str(tmp_path / "o")))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "bin.py").write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="no readable documents"):
        prepare(PrepareConfig(corpus=str(tmp_path / "c"), out=str(tmp_path / "o"), progress=False))
    with pytest.raises(ValueError, match="orders"):
        PrepareConfig(orders=["grip", "best"])
    with pytest.raises(ValueError, match="unknown field"):
        PrepareConfig.from_dict({"kk": 3})
    bad = tmp_path / "bad.yaml"
    bad.write_text("encoder: {max_tokens: 2}\n")
    with pytest.raises(ValueError, match="bad.yaml: encoder.max_tokens"):
        load_config(bad)


def test_probe_sizes_floor_and_neyman():
    sizes, sigma = np.array([1000, 10, 2, 0]), np.array([0.5, 0.5, 0.1, 0.0])
    n = probe_sizes(sizes, sigma, 0.01, 4)
    assert n.tolist() == [4, 4, 2, 0]  # B_probe = round(0.01 * 1012) = 10 = the sum of the floors
    n = probe_sizes(sizes, sigma, 0.1, 4)  # B = 101: the floors, the rest to the big spread cluster
    assert n.sum() == 101 and n.tolist()[1:] == [4, 2, 0]
    from grip_loop.budget import probe_allocation

    big = np.array([5000, 3000, 2000])
    assert np.array_equal(
        probe_sizes(big, np.array([0.2, 0.4, 0.9]), 0.01, 1), probe_allocation(big, [0.2, 0.4, 0.9], 100)
    )


def test_every_prepare_config_parses():
    for path in sorted((ROOT / "configs" / "prepare").glob("*.yaml")):
        cfg = load_config(path, corpus="x", out="y")
        assert cfg.k >= 1


def _jsonl_corpus(path: Path, groups: dict[str, int], missing: int = 0) -> Path:
    """A JSONL corpus of real stdlib code: `groups[value]` documents with src=value each, plus
    `missing` documents without the field."""
    import sysconfig

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    files = [f for f in files if 500 < f.stat().st_size < 8000]
    i = 0
    with open(path, "w") as fh:
        for value, n in groups.items():
            for _ in range(n):
                rec = {"id": f"d{i}", "text": files[i].read_text(), "lang": "python", "src": value}
                fh.write(json.dumps(rec) + "\n")
                i += 1
        for _ in range(missing):
            fh.write(json.dumps({"id": f"d{i}", "text": files[i].read_text(), "lang": "python"}) + "\n")
            i += 1
    return path


@pytest.mark.slow
def test_cluster_by_a_field_makes_one_named_cluster_per_value(tmp_path, capsys):
    corpus = _jsonl_corpus(tmp_path / "c.jsonl", {"zeta": 12, "alpha": 14, "mid": 10}, missing=3)
    m = prepare(_cfg(corpus, tmp_path / "out", cluster_by="src", heldout_fraction=0.2))
    assert m.k == 3 and m.names == ["alpha", "mid", "zeta"]  # sorted by value, named by it
    assert "3 of 39 documents have no 'src' field" in capsys.readouterr().out
    assert m.stats["read"]["missing_field"] == {"src": 3}
    docs = {json.loads(line)["id"]: json.loads(line) for line in open(corpus)}
    for c in m.clusters:
        got = [
            d.meta["doc_id"]
            for s in c.shards["grip"]
            for d in iter_shard(tmp_path / "out" / s.path, "uint16")
        ]
        assert got and all(docs[i]["src"] == c.name for i in got)  # nothing merged from elsewhere
        assert c.eval_ids == c.probe_ids[1::2]
    # held-out documents: stratified by the cluster field, labelled with their own value
    held = [d for s in m.heldout for d in iter_shard(tmp_path / "out" / s.path, "uint16")]
    assert sorted(m.names[d.meta["cluster"]] for d in held) == ["alpha"] * 3 + ["mid"] * 2 + ["zeta"] * 2
    assert all(docs[d.meta["doc_id"]]["src"] == m.names[d.meta["cluster"]] for d in held)
    assert m.n_docs + len(held) + m.stats["probe_eval_docs"] == 36
    # centroids: the normalised mean embedding of each value's training documents
    cent = np.load(tmp_path / "out" / "centroids.npy")
    assert cent.shape == (3, 384) and np.allclose(np.linalg.norm(cent, axis=1), 1, atol=1e-5)


def test_cluster_by_a_field_nobody_has_is_a_clear_error(tmp_path):
    corpus = _jsonl_corpus(tmp_path / "c.jsonl", {}, missing=4)
    with pytest.raises(ValueError, match=r"no document in .*c\.jsonl has the field 'topic'.*id, lang") as e:
        prepare(_cfg(corpus, tmp_path / "out", cluster_by="topic"))
    assert "--cluster-by" in str(e.value)


def test_cluster_method_config_and_cli_override():
    base = ROOT / "configs" / "prepare" / "default.yaml"
    cfg = load_config(base, corpus="x", out="y", cluster={"method": "gem"})
    assert cfg.cluster.method == "gem" and cfg.cluster.balance == 1.0 and cfg.cluster.sample == 50_000
    assert load_config(base, corpus="x", out="y", cluster={"method": None}).cluster.method == "kmeans"
    assert load_config(TINY, corpus="x", out="y", cluster={"method": "gem"}).cluster.method == "gem"
    for bad, match in (
        ({"method": "dbscan"}, "cluster.method"),
        ({"balance": -1}, "cluster.balance"),
        ({"niter": 0}, "cluster.niter"),
        ({"student_heldout": 1.0}, "cluster.student_heldout"),
        ({"mthod": "gem"}, "cluster: unknown field"),
    ):
        with pytest.raises(ValueError, match=match):
            PrepareConfig.from_dict({"cluster": bad})


@pytest.mark.slow
def test_gem_clusters_end_to_end(stdlib_prepared, stdlib_corpus, tmp_path, capsys):
    """`cluster.method: gem` from the stdlib fixture's embeddings: a complete manifest, labels
    from the student, GIS of every training document, names and cards; a re-run resumes."""
    out = tmp_path / "gem"
    (out / "work").mkdir(parents=True)
    for f in ("embeddings.npy", "embeddings.done.npy", "embeddings.json"):
        shutil.copy(stdlib_prepared / "work" / f, out / "work" / f)
    m = prepare(_cfg(stdlib_corpus, out, cluster={"method": "gem"}))
    m = load_manifest(out)
    how = m.stats["clustering"]
    assert how["method"] == "gem" and how["mm_iterations"] >= 1 and how["objective"][1] >= how["objective"][0]
    assert 0.8 <= how["student_agreement"] <= 1 and how["student_heldout_points"] >= 1
    assert m.k == 8 and len(set(m.names)) == 8 and all(":" in n for n in m.names)
    centroids = np.load(out / "centroids.npy")
    assert np.all(np.isfinite(centroids)) and np.allclose(np.linalg.norm(centroids, axis=1), 1, atol=1e-5)
    labels = np.load(out / "work" / "labels.npy")
    assert labels.min() >= 0 and labels.max() < 8
    assert _comparable(out)["clusters"] != _comparable(stdlib_prepared)["clusters"]  # not k-means
    docs = read_docs(out / "work")
    gis = np.load(out / "stats" / "gis.npy")
    assert gis.shape == (len(docs),) and np.isnan(gis).sum() == m.stats["heldout_docs"]
    for c in m.clusters:
        member_paths = {docs[i]["path"] for i in np.flatnonzero(labels == c.id)}
        assert c.influential and set(c.influential) <= member_paths
        assert sum(c.languages.values()) == pytest.approx(1, abs=1e-3) and c.top_terms
        # the influential documents are the members with the highest GIS
        ranked = sorted(
            (i for i in np.flatnonzero(labels == c.id) if np.isfinite(gis[i])), key=lambda i: (-gis[i], i)
        )
        assert c.influential == [docs[i]["path"] for i in ranked[: len(c.influential)]]
    from train import cli

    capsys.readouterr()
    assert cli.main(["inspect", str(out), "--cluster", m.clusters[2].name]) == 0
    card = capsys.readouterr().out
    assert card.startswith(f"cluster 2: {m.clusters[2].name}") and m.clusters[2].influential[0] in card
    assert "sigma_k" in card and "Q_k" in card and "languages   python" in card
    assert cli.main(["inspect", str(out), "--cluster", "99"]) == 2
    assert "no cluster '99'" in capsys.readouterr().err
    before = _comparable(out)
    prepare(_cfg(stdlib_corpus, out, cluster={"method": "gem"}))
    assert _comparable(out) == before  # the cluster stage resumed to the same result


def test_a_small_corpus_gets_one_line_with_the_fix_instead_of_faiss_s_warning(capfd):
    from grip_loop.cluster import spherical_kmeans
    from grip_loop.prepare_cluster import _without_faiss_size_warning, small_corpus_notes

    # the default K = 64 on 216 files: one line, naming a K that fits
    (line,) = small_corpus_notes(PrepareConfig(k=64), 216)
    assert "k=64" in line and "216 documents" in line and "--k 5" in line
    assert small_corpus_notes(PrepareConfig(k=5), 216) == []  # 5 x 39 <= 216
    assert small_corpus_notes(PrepareConfig(k=64, cluster_by="lang"), 216) == []
    emb = np.random.default_rng(0).normal(size=(60, 8)).astype(np.float32)
    spherical_kmeans(emb, 8, niter=2)
    assert "please provide at least" in capfd.readouterr().err  # faiss's raw warning exists...
    with _without_faiss_size_warning():
        spherical_kmeans(emb, 8, niter=2)
        os.write(2, b"another line\n")
    err = capfd.readouterr().err
    assert "please provide at least" not in err and "another line" in err  # ...and only it goes
