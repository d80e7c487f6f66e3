"""What `grip prepare` holds in memory: texts read a batch at a time, token ids equal to the
tokenizer's per document, and the allocator's freed memory handed back between stages."""

import json
import os
import pickle
import sys

import numpy as np
import pytest

from grip_loop import prepare_ingest, workdir
from grip_loop import tokenizer as tk
from grip_loop.docstore import open_work
from grip_loop.prepare import prepare

from .test_prepare_streaming import _cfg, synthetic_corpus


def _rss_anon_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon")


@pytest.mark.parametrize("batch", [1, 3, 7, 64, 10_000])
def test_text_batches_of_a_part_are_its_texts(tmp_path, batch):
    corpus = synthetic_corpus(tmp_path / "c.jsonl", 150, seed=batch)
    prepare(_cfg(corpus, tmp_path / "o", ingest_part_docs=64, k=2, orders=["grip"]))
    store, _ = open_work(tmp_path / "o" / "work")
    for p in range(len(store.names)):
        texts = [store.text(i) for i in range(int(store.starts[p]), int(store.starts[p + 1]))]
        batches = list(store.part_text_batches(p, batch))
        assert [t for b in batches for t in b] == texts
        assert all(len(b) == batch for b in batches[:-1]) and 0 < len(batches[-1]) <= batch


@pytest.mark.parametrize("seed", [0, 1])
def test_token_ids_are_the_tokenizers_of_each_text_whatever_the_batch(tmp_path, monkeypatch, seed):
    """The tokenize stage encodes a part a batch at a time: every document's ids are still
    `tk.encode` of its text alone, with batches that end inside a part and parts of several."""
    monkeypatch.setattr(prepare_ingest, "TOKENIZE_BATCH", 7)
    corpus = synthetic_corpus(tmp_path / "c.jsonl", 120, seed=seed)
    prepare(_cfg(corpus, tmp_path / "o", ingest_part_docs=50, k=2, orders=["grip"]))
    store, tokens = open_work(tmp_path / "o" / "work")
    tok = tk.load_tokenizer(tmp_path / "o" / "tokenizer" / "tokenizer.json")
    assert len(store.names) == 3
    for i in range(len(store)):
        np.testing.assert_array_equal(tokens.tokens(i), tk.encode(tok, [store.text(i)])[0])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim (a no-op elsewhere)")
def test_release_memory_hands_freed_heap_back():
    """Freed blocks in the middle of the heap (a live block after them keeps the heap's top from
    shrinking by itself) stay in the process until `release_memory`."""
    if not workdir.release_memory():
        pytest.skip("not glibc")
    blocks = [bytes(bytearray(700)) for _ in range(150_000)]  # ~105 MB of malloc'ed (not pymalloc) blocks
    keep = bytes(bytearray(700))  # noqa: F841  (allocated after them: the heap's top stays in use)
    before = _rss_anon_mb()
    del blocks
    freed = _rss_anon_mb()
    workdir.release_memory()
    after = _rss_anon_mb()
    assert freed - after > 50 and before - after > 50, (before, freed, after)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigma_streamed_equals_eq3_whatever_the_blocks(seed):
    """sigma_k of Eq. 3 (the RMS distance of a cluster's training rows to its centroid; 0 below 2
    rows): the same bits for any number of rows a distance computation holds, and equal to a
    direct per-cluster computation."""
    from grip_loop.prepare_cluster import sigma_streamed

    rng = np.random.default_rng(seed)
    n, d, k = 3000, 16, 7
    emb = rng.normal(size=(n, d)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = rng.integers(0, k - 1, n)  # cluster k - 1 has no row
    labels[rng.integers(0, n)] = k - 2  # ... and k - 2 maybe one
    train = rng.random(n) > 0.3
    cent = rng.normal(size=(k, d)).astype(np.float32)
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    ref = sigma_streamed(emb, labels, train, cent, block=n, rows=n)
    for block in (n, 1000, 512):  # the sums' grouping: the same bits for any `rows`
        whole = sigma_streamed(emb, labels, train, cent, block=block, rows=block)
        for rows in (1, 7, 100, 333):
            np.testing.assert_array_equal(
                sigma_streamed(emb, labels, train, cent, block=block, rows=rows), whole
            )
        np.testing.assert_allclose(whole, ref, rtol=1e-12)
    for c in range(k):
        x = emb[(labels == c) & train]
        want = np.sqrt(np.mean(np.sum((x - cent[c]) ** 2, axis=1))) if len(x) >= 2 else 0.0
        assert ref[c] == pytest.approx(want, rel=1e-6)
    bad = emb.copy()
    bad[5] *= 2
    with pytest.raises(ValueError, match="L2-normalised"):
        sigma_streamed(bad, labels, np.ones(n, bool), cent, rows=64)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field}")


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and madvise: Linux")


def _big_npy(path, mb: int) -> np.ndarray:
    a = np.lib.format.open_memmap(path, "w+", np.float32, (mb << 18,))
    a[:] = np.arange(len(a), dtype=np.float32) % 1000.0
    a.flush()
    del a
    return np.load(path, mmap_mode="r")


def _stream(m, block: int, trim: bool) -> tuple[float, int]:
    """(sum of m read block by block, the largest growth of RssFile seen, KiB)."""
    base, grew, total = _status_kib("RssFile"), 0, 0.0
    for lo in range(0, len(m), block):
        total += float(np.asarray(m[lo : lo + block], np.float64).sum())
        if trim:
            workdir.trim_maps()
        grew = max(grew, _status_kib("RssFile") - base)
    return total, grew


@linux_only
def test_trim_maps_keeps_a_streamed_maps_pages_within_the_budget(tmp_path):
    """Reading a 96 MB map block by block keeps every page mapped (the control), but with
    `trim_maps` after each block the process's file-backed resident pages stay within the budget
    plus a block, and the values read are the same."""
    m = _big_npy(tmp_path / "big.npy", 96)
    block = 1 << 18  # 1 MB of float32
    with workdir.bounded_maps(16 << 20) as bound:
        trimmed, grew_trimmed = _stream(m, block, trim=True)
    assert bound.drops >= 4
    assert grew_trimmed <= (16 + 2 + 4) * 1024, grew_trimmed  # budget + a block + slack, KiB
    del m  # a fresh map: its pages are resident again only when read
    m = np.load(tmp_path / "big.npy", mmap_mode="r")
    plain, grew_plain = _stream(m, block, trim=False)
    assert grew_plain >= 80 * 1024, grew_plain  # the control: without it the whole file stays mapped
    assert trimmed == plain


@linux_only
def test_dropping_pages_keeps_what_was_written_through_shared_and_private_maps(tmp_path):
    """MADV_DONTNEED on a shared file map loses nothing (a dirty page stays in the page cache);
    private (copy-on-write) maps, whose pages it would throw away, are left alone."""
    path = tmp_path / "w.npy"
    np.save(path, np.zeros(1 << 20, np.float32))
    shared = np.load(path, mmap_mode="r+")
    private = np.load(path, mmap_mode="c")
    shared[:1000] = 7.0  # dirty, not flushed
    private[-1000:] = 3.0  # copy-on-write: only this process's pages hold it
    with workdir.bounded_maps(0) as bound:
        assert bound.drop() >= 1  # the shared map at least (the private one is not counted)
    assert (shared[:1000] == 7.0).all() and (private[-1000:] == 3.0).all()
    assert (np.fromfile(path, np.float32, offset=128)[:1000] == 7.0).all()  # (past the .npy header)
    del shared, private


@linux_only
def test_trim_maps_acts_only_in_its_own_thread_and_inside_bounded_maps(tmp_path):
    import threading

    m = _big_npy(tmp_path / "big.npy", 8)
    workdir.trim_maps()  # outside: a no-op, nothing to check but that it does not fail
    with workdir.bounded_maps(0) as bound:
        np.asarray(m).sum()  # 8 MB more resident than when the bound began
        t = threading.Thread(target=workdir.trim_maps)
        t.start()
        t.join()
        assert bound.drops == 0  # another thread never drops (an address it races could be reused)
        workdir.trim_maps()
        assert bound.drops == 1
    with workdir.bounded_maps(1 << 40) as bound:  # a budget never reached
        bound.drop()
        bound.drops = 0
        np.asarray(m).sum()
        workdir.trim_maps()
        assert bound.drops == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_take_rows_is_fancy_indexing(tmp_path, seed):
    """`take_rows` equals `a[rows]` for sorted, unsorted, repeated and empty rows, 1-D and 2-D,
    on a memory map and an array, whatever the chunk."""
    rng = np.random.default_rng(seed)
    a2 = rng.standard_normal((1000, 7)).astype(np.float32)
    np.save(tmp_path / "a.npy", a2)
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
    raw = np.memmap(tmp_path / "b.bin", np.int64, "w+", shape=(1000,))  # a scratch array's kind
    raw[:] = rng.integers(-(2**40), 2**40, 1000)
    assert workdir._file_rows(mapped) is not None and workdir._file_rows(raw) is not None  # read, not mapped
    assert workdir._file_rows(mapped[5:]) is None  # row 0 is not the file's first: indexed as usual
    for a in (a2, mapped, mapped[5:], mapped[:900], a2[:, 0].copy(), raw):
        n = len(a)
        for rows in (
            np.sort(rng.choice(n, 300, replace=False)),
            rng.integers(0, n, 500),
            np.zeros(0, np.int64),
            np.array([n - 1, 0, n - 1, -1, -n]),
            np.arange(10, 60),  # one run of consecutive rows: one read
        ):
            for chunk in (1, 7, 8192):
                got = workdir.take_rows(a, rows, chunk=chunk)
                assert got.dtype == a.dtype and got.shape == a[rows].shape
                assert np.array_equal(got, np.asarray(a[rows]))
        for bad in ([n], [0, -n - 1]):
            with pytest.raises(IndexError):
                workdir.take_rows(a, bad)


@linux_only
def test_take_rows_of_a_map_leaves_its_pages_unmapped(tmp_path):
    """A scattered gather through the map maps far more than the rows (the control); through
    `take_rows` the process's file-backed pages do not grow."""
    m = _big_npy(tmp_path / "big.npy", 64)
    rows = np.sort(np.random.default_rng(0).choice(len(m), 2000, replace=False))
    before = _status_kib("RssFile")
    got = workdir.take_rows(m, rows)
    assert _status_kib("RssFile") - before < 1024
    want = m[rows]
    assert _status_kib("RssFile") - before > 4 * 1000  # KiB: a page for most of the 2000 rows, at least
    assert np.array_equal(got, want)


@pytest.mark.parametrize("seed", [0, 1])
def test_encoded_token_bytes_are_each_documents_ids(tmp_path, seed):
    """`TokenStore.encoded` (positioned reads) gives each document's ids as little-endian bytes of
    the shard dtype, in the order asked, across parts; ids that do not fit the dtype raise."""
    corpus = synthetic_corpus(tmp_path / "c.jsonl", 120, seed=seed)
    prepare(_cfg(corpus, tmp_path / "o", ingest_part_docs=32, k=2, orders=["grip"]))
    store, tokens = open_work(tmp_path / "o" / "work")
    n = int(tokens.starts[-1])
    ids = np.random.default_rng(seed).permutation(n)[: n // 2]
    # the documents' index rows are read, not mapped: the same texts and records as one by one
    lines = [json.loads(x) for x in corpus.read_text().splitlines()]
    assert [store.text(i) for i in range(n)] == [d["text"] for d in lines[:n]]
    assert list(store.encoded(ids)) == [(store.text(int(i)).encode(), store.meta(int(i))) for i in ids]
    for dtype in ("uint16", "uint32", "int64"):
        want = [tokens.tokens(int(i)).astype(np.dtype(dtype).newbyteorder("<")).tobytes() for i in ids]
        assert list(tokens.encoded(ids, dtype)) == want
    assert list(tokens.encoded(np.zeros(0, np.int64), "uint16")) == []
    big = next(int(i) for i in range(n) if tokens.tokens(i).size and tokens.tokens(i).max() > 255)
    with pytest.raises(ValueError, match="out of range"):
        list(tokens.encoded([big], "uint8"))
    # one descriptor per part, kept across calls (a write unit calls once per shard), closed by close()
    fds = {p: f[0] for p, f in tokens._fds.items()}
    assert len(fds) == len(tokens.names) > 1
    list(tokens.encoded(ids, "uint32"))
    assert {p: f[0] for p, f in tokens._fds.items()} == fds
    copy = pickle.loads(pickle.dumps(tokens))  # without descriptors or maps: it opens its own
    assert copy._fds == {} and list(copy.encoded(ids, "uint32")) == list(tokens.encoded(ids, "uint32"))
    copy.close()
    tokens.close()
    store.close()
    assert tokens._fds == {}
    for fd in fds.values():
        with pytest.raises(OSError):
            os.fstat(fd)


@linux_only
def test_take_rows_never_reads_a_file_that_replaced_the_mapped_one(tmp_path):
    """A scratch file of the same name may replace a mapped one (`Scratch.path` unlinks, then
    creates): the rows then come from the map, not from the new file at the array's filename."""
    path = tmp_path / "s.bin"
    old = np.memmap(path, np.int64, "w+", shape=(100,))
    old[:] = np.arange(100)
    old.flush()
    path.unlink()
    new = np.memmap(path, np.int64, "w+", shape=(100,))
    new[:] = -1
    new.flush()
    rows = np.array([3, 50, 99, 4])
    assert workdir.take_rows(old, rows).tolist() == [3, 50, 99, 4]
    assert workdir.take_rows(new, rows).tolist() == [-1, -1, -1, -1]


@pytest.mark.parametrize("size", [0, 1, (1 << 20) + 7])
def test_file_sha256_is_one_function_and_hashes_the_bytes(tmp_path, size):
    """The project records one hash of a file (work units, shards, the tokenizer): manifest and
    tokenizer use workdir's, and it is sha256 of the file's bytes, streamed."""
    import hashlib

    from grip_loop import manifest

    path = tmp_path / "f.bin"
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    assert manifest.file_sha256 is tk.file_sha256 is workdir.file_sha256
    assert workdir.file_sha256(path) == hashlib.sha256(data).hexdigest()


@linux_only
def test_a_resumed_embed_stage_checks_its_blocks_without_mapping_the_file(tmp_path, monkeypatch):
    """A resume reads every finished block of the embeddings to check its rows are unit vectors:
    inside `bounded_maps` the file does not stay mapped (a 10^7 resume mapped all 2.5 GB)."""
    import grip_loop.embed as embed

    n, dim, block = 96 << 12, 64, 4096  # 96 MB of float32 rows
    path = tmp_path / "embeddings.npy"
    a = np.lib.format.open_memmap(path, "w+", np.float32, (n, dim))
    for lo in range(0, n, 1 << 16):
        a[lo : lo + (1 << 16)] = 1.0 / 8.0  # unit rows (64 x 1/64)
    a.flush()
    del a
    n_blocks = n // block
    np.save(tmp_path / "done.npy", np.ones(n_blocks, np.uint8))
    (tmp_path / "meta.json").write_text(json.dumps({"key": "k", "dim": dim}))
    grew, real = [], embed._unit_rows

    def unit_rows(emb, lo, hi):
        ok = real(emb, lo, hi)
        grew.append(_status_kib("RssFile") - base)
        return ok

    monkeypatch.setattr(embed, "_unit_rows", unit_rows)
    args = (path, tmp_path / "done.npy", tmp_path / "meta.json", "k", n, n_blocks, block)
    base = _status_kib("RssFile")
    with workdir.bounded_maps(16 << 20):
        done, why = embed._resumable(*args)
    assert why is None and done.all() and len(grew) == n_blocks
    assert max(grew) <= (16 + 1 + 4) * 1024, max(grew)  # budget + a block + slack, KiB
    grew.clear()
    base = _status_kib("RssFile")
    embed._resumable(*args)  # the control: outside a bound, the whole file stays mapped
    assert max(grew) >= 80 * 1024, max(grew)
