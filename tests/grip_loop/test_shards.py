"""Shard format and manifest: round trips, atomic writes, and errors that name the file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from grip_loop.manifest import (
    SCHEMA_VERSION,
    ClusterInfo,
    Manifest,
    ManifestError,
    load_manifest,
)
from grip_loop.shards import ShardWriter, iter_shard, token_dtype_for


def _write(tmp_path, docs, **kw):
    with ShardWriter(tmp_path / "s", **kw) as w:
        for i, toks in enumerate(docs):
            w.write(f"{i:09d}", toks, f"doc {i} ü", {"doc_id": str(i), "length": len(toks)})
    return w.finished


@pytest.mark.parametrize("dtype,vocab", [("uint16", 65536), ("uint32", 200_000)])
def test_round_trip_preserves_tokens_text_meta_and_order(tmp_path, dtype, vocab):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, vocab, size=rng.integers(0, 50)) for _ in range(23)]
    infos = _write(tmp_path, docs, token_dtype=dtype, max_docs=5)
    assert [s.n_docs for s in infos] == [5, 5, 5, 5, 3]
    assert sum(s.n_tokens for s in infos) == sum(len(d) for d in docs)
    got = [d for s in infos for d in iter_shard(tmp_path / "s" / s.path, dtype)]
    assert [d.key for d in got] == [f"{i:09d}" for i in range(23)]
    for i, d in enumerate(got):
        np.testing.assert_array_equal(d.tokens, docs[i])
        assert d.text == f"doc {i} ü" and d.meta == {"doc_id": str(i), "length": len(docs[i])}


def test_with_text_false_skips_text_only(tmp_path):
    infos = _write(tmp_path, [np.arange(4), np.arange(2)])
    docs = list(iter_shard(tmp_path / "s" / infos[0].path, "uint16", with_text=False))
    assert [d.text for d in docs] == ["", ""] and [len(d.tokens) for d in docs] == [4, 2]


def test_shards_are_readable_by_webdataset(tmp_path):
    wds = pytest.importorskip("webdataset")
    infos = _write(tmp_path, [np.arange(3, dtype=np.int64)] * 4)
    samples = list(wds.WebDataset(str(tmp_path / "s" / infos[0].path), shardshuffle=False))
    assert len(samples) == 4
    assert np.frombuffer(samples[0]["ids"], dtype="<u2").tolist() == [0, 1, 2]


def test_interrupted_writer_leaves_no_finished_shard(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "s") as w:
            w.write("000000000", np.arange(3), "x", {})
            raise RuntimeError("killed")
    assert list((tmp_path / "s").iterdir()) == []


def test_truncated_shard_error_names_file(tmp_path):
    infos = _write(tmp_path, [np.arange(1000)] * 10)
    path = tmp_path / "s" / infos[0].path
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(ManifestError, match=str(path.name)):
        list(iter_shard(path, "uint16"))


def test_token_dtype_for_and_range_checks(tmp_path):
    assert token_dtype_for(50_000) == "uint16" and token_dtype_for(65_536) == "uint16"
    assert token_dtype_for(65_537) == "uint32"
    with pytest.raises(ValueError, match="tokens"):
        with ShardWriter(tmp_path / "s", token_dtype="uint16") as w:
            w.write("000000000", np.array([70_000]), "", {})
    with pytest.raises(ValueError, match="key"):
        ShardWriter(tmp_path / "t").write("a.b", np.arange(2), "", {})


def _manifest(tmp_path, n=(3, 2)):
    clusters = []
    for k, nk in enumerate(n):
        infos = _write(tmp_path / f"c{k}", [np.arange(4)] * nk)
        shards = [s.under(f"c{k}/s") for s in infos]
        clusters.append(
            ClusterInfo(
                id=k,
                n_docs=nk,
                n_tokens=4 * nk,
                mean_length=4.0,
                sigma=0.1,
                quality=0.5,
                shards={"grip": shards},
            )
        )
    return Manifest(
        schema_version=SCHEMA_VERSION,
        corpus_fingerprint="abc",
        tokenizer={"vocab_size": 16, "eos_id": 0, "token_dtype": "uint16"},
        encoder={"name": "x"},
        k=len(n),
        seed=0,
        orders=["grip"],
        clusters=clusters,
    )


@pytest.mark.parametrize("n", [(3, 2), (1,), (2, 0, 4)])
def test_manifest_file_is_json_dump_of_its_dict(tmp_path, n):
    """`save` writes each cluster's dict as the encoder reaches it: the file is still exactly
    `json.dump(to_dict(), indent=2)` plus a newline (with and without held-out shards)."""
    m = _manifest(tmp_path, n)
    for heldout in ([], m.clusters[0].shards["grip"][:1]):
        m.heldout = list(heldout)
        m.save(tmp_path)
        assert (tmp_path / "manifest.json").read_text() == json.dumps(m.to_dict(), indent=2) + "\n"


def test_manifest_round_trip_is_atomic_and_validated(tmp_path):
    m = _manifest(tmp_path)
    m.save(tmp_path)
    assert not (tmp_path / "manifest.json.tmp").exists()
    back = load_manifest(tmp_path)
    assert back == m and back.sizes == [3, 2] and back.n_docs == 5


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda d: d.update(schema_version=0), "schema version"),
        (lambda d: d["clusters"][0].update(n_docs=7), "lists 3 documents"),
        (lambda d: d.update(k=5), "k=5"),
        (lambda d: d["clusters"][1].pop("sigma"), "clusters\\[1\\].sigma must be a finite number"),
        (lambda d: d["clusters"][1].update(extra=1), "malformed"),
    ],
)
def test_hand_edited_manifest_is_rejected_with_file_and_fix(tmp_path, edit, match):
    _manifest(tmp_path).save(tmp_path)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    edit(raw)
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=match) as err:
        load_manifest(tmp_path)
    assert "manifest.json" in str(err.value) and "grip prepare" in str(err.value)


def test_missing_shard_and_missing_manifest(tmp_path):
    m = _manifest(tmp_path)
    m.save(tmp_path)
    (tmp_path / m.clusters[1].shards["grip"][0].path).unlink()
    with pytest.raises(ManifestError, match="missing"):
        load_manifest(tmp_path)
    load_manifest(tmp_path, check_files=False)
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path / "nowhere")


def test_index_file_matches_a_header_scan_and_is_memory_mapped(tmp_path):
    """The writer's `<shard>.idx.npy` equals a scan of the tar headers, over several seeds and
    sizes (empty documents and ones that end exactly on a 512-byte block included)."""
    from grip_loop.shards import index_path, load_index, shard_index

    for seed in range(3):
        rng = np.random.default_rng(seed)
        docs = [rng.integers(0, 60000, size=int(n)) for n in rng.choice([0, 1, 255, 256, 257, 1000], 30)]
        infos = _write(tmp_path / str(seed), docs, max_docs=7)
        for s in infos:
            path = tmp_path / str(seed) / "s" / s.path
            idx = load_index(path, s.n_docs)
            assert isinstance(idx, np.memmap) and index_path(path).name == path.name[:-4] + ".idx.npy"
            assert np.array_equal(idx, shard_index(path))
    path = tmp_path / "0" / "s" / infos[0].path
    with pytest.raises(
        ManifestError, match=r"holds 7 documents but the manifest says 99 \(its index .*idx\.npy\)"
    ):
        load_index(path, 99)
    index_path(path).unlink()
    assert load_index(path, infos[0].n_docs) is None  # no index: the reader scans the headers


def test_a_folder_prepared_by_an_older_schema_says_re_run_prepare(tmp_path):
    _manifest(tmp_path).save(tmp_path)
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["schema_version"] = 1  # before the shard index files
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(
        ManifestError, match=r"schema version 1, this grip-loop reads version 2; re-run `grip prepare"
    ):
        load_manifest(tmp_path)


def test_writer_bytes_equal_tarfiles_and_the_recorded_sha256(tmp_path):
    """The writer builds USTAR headers itself: every shard equals, byte for byte, the tar that
    `tarfile` writes for the same members (a naive reference), and its sha256 is recorded."""
    import hashlib
    import io
    import tarfile

    rng = np.random.default_rng(3)
    docs = []
    for i in range(40):
        n_tok = int(rng.choice([0, 1, 255, 256, 257, 1000]))
        text = "".join(rng.choice(list('ab\u00e9\u4e2d\n"\\'), int(rng.integers(0, 1200))))
        key = f"{i:09d}" if i % 7 else f"{i:095d}"  # "<95 digits>.json": a name of 100 bytes, the most
        docs.append((key, rng.integers(0, 60000, n_tok), text, {"i": i, "s": text[:5]}))
    with ShardWriter(tmp_path, token_dtype="uint16", max_docs=15, max_bytes=20_000) as w:
        for d in docs:
            w.write(*d)
        infos = w.close()
    assert len(infos) >= 3 and sum(s.n_docs for s in infos) == len(docs)
    it = iter(docs)
    for s in infos:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, tok, text, meta in (next(it) for _ in range(s.n_docs)):
                for ext, payload in (
                    ("ids", np.asarray(tok, "<u2").tobytes()),
                    ("txt", text.encode()),
                    ("json", json.dumps(meta, sort_keys=True).encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mode = len(payload), 0o444
                    tar.addfile(info, io.BytesIO(payload))
        got = (tmp_path / s.path).read_bytes()
        assert got == buf.getvalue()
        assert s.sha256 == hashlib.sha256(got).hexdigest()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_meta_json_is_json_dumps(seed):
    """The write stage formats each document's metadata JSON itself: equal to json.dumps."""
    from grip_loop.prepare_write import meta_json

    rng = np.random.default_rng(seed)
    alphabet = list('az09 "\\/\n\t\x00\x1f\u00e9\u2028\U0001f600') + ["\udcff"]
    for _ in range(200):
        s = ["".join(rng.choice(alphabet, int(rng.integers(0, 12)))) for _ in range(3)]
        n, k, pos = (int(x) for x in rng.integers(0, 10**12, 3))
        doc = {"id": s[0], "lang": s[1], "path": s[2], "group": "x"}
        want = {"doc_id": s[0], "length": n, "lang": s[1], "path": s[2], "cluster": k, "position": pos}
        assert meta_json(doc, n, k, pos) == json.dumps(want, sort_keys=True).encode()
