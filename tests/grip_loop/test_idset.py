"""`grip_loop.idset.SeenIds` against a Python set, and the reader's ids with it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from grip_loop.corpus import CorpusReader
from grip_loop.idset import SeenIds, id_hash


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("buffer", [1, 3, 64])
@pytest.mark.parametrize("spill", [False, True])
def test_add_and_contains_match_a_python_set(tmp_path, seed, buffer, spill, monkeypatch):
    import grip_loop.idset as idset

    monkeypatch.setattr(idset, "STEP", 8)  # many fence pages (the real one is 512 hashes)
    rng = np.random.default_rng(seed)
    # few distinct strings, so repeats hit both the recent set and the merged sorted array
    words = [f"doc-{i}" for i in rng.integers(0, 300, 2000)] + ["", "é/ü", "\udcff"]
    # block 7: a merge reads the old file in many blocks
    seen, ref = SeenIds(tmp_path / "spill" if spill else None, buffer=buffer, block=7), set()
    for w in words:
        assert seen.add(w) == (w not in ref)
        ref.add(w)
        assert w in seen
    assert len(seen) == len(ref)
    for i in range(300, 400):  # never added
        assert f"doc-{i}" not in seen
    merged = seen.sorted_hashes()
    assert np.all(np.diff(merged) > 0)  # sorted, no repeats
    assert set(merged.tolist()) | seen._recent == {id_hash(w) for w in ref}
    seen.close()
    assert not list((tmp_path / "spill").glob("*")) if spill else True


def test_spill_keeps_one_file_and_close_removes_it(tmp_path):
    spill = tmp_path / "spill"
    seen = SeenIds(spill, buffer=4)
    for i in range(50):
        seen.add(str(i))
    files = list(spill.glob("*"))
    assert len(files) == 1 and files[0].suffix == ".bin"
    assert np.array_equal(
        np.fromfile(files[0], np.uint64), np.sort(np.array([id_hash(str(i)) for i in range(48)], np.uint64))
    )
    seen.close()
    assert not spill.exists()


def test_a_spill_file_cut_short_is_an_error_not_a_miss(tmp_path):
    """A truncated spill file (a full disk, another process) must not make seen ids look new."""
    spill = tmp_path / "spill"
    seen = SeenIds(spill, buffer=4)
    for i in range(50):
        seen.add(str(i))
    (f,) = spill.glob("*.bin")
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(OSError, match="cut short") as err:
        [str(i) in seen for i in range(48)]  # some lookup lands past the cut
    assert str(spill) in str(err.value)
    with pytest.raises(OSError, match="cut short"):
        for i in range(50, 60):  # the next merge reads the old file whole
            seen.add(str(i))
    seen.close()


def test_a_hash_collision_renames_but_ids_stay_unique(tmp_path, monkeypatch):
    import grip_loop.idset as idset

    monkeypatch.setattr(idset, "id_hash", lambda s: 7 if s in ("a", "b") else hash(s) & (2**63 - 1))
    src = tmp_path / "c.jsonl"
    src.write_text("\n".join(json.dumps({"id": i, "text": f"t{i}"}) for i in ["a", "b", "a"]) + "\n")
    ids = [d.id for d in CorpusReader(src)]
    assert len(set(ids)) == 3 and ids[0] == "a"  # "b" collides with "a": it gets a suffix


@pytest.mark.parametrize("scratch", [False, True])
def test_reader_ids_with_many_repeats_are_unique_and_as_before(tmp_path, scratch, monkeypatch):
    import grip_loop.idset as idset

    monkeypatch.setattr(idset.SeenIds.__init__, "__defaults__", (None, 5))  # merge every 5 ids
    rows = [{"id": f"x{i % 7}", "text": f"doc {i}"} for i in range(60)] + [{"id": "x0#2", "text": "z"}]
    src = tmp_path / "c.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    reader = CorpusReader(src, scratch_dir=tmp_path / "work" if scratch else None)
    ids = [d.id for d in reader]
    # the old reader's rule, with a Python set: first keeps its id, later ones "#2", "#3", ...
    seen, nxt, want = set(), {}, []
    for r in rows:
        i = r["id"]
        if i in seen:
            n = nxt.get(i, 2)
            while f"{i}#{n}" in seen:
                n += 1
            nxt[i] = n + 1
            i = f"{i}#{n}"
        seen.add(i)
        want.append(i)
    assert ids == want and len(set(ids)) == len(ids)
    assert reader.stats.duplicate_ids == sum(a != r["id"] for a, r in zip(ids, rows, strict=True))
    assert not list((tmp_path / "work").glob("*")) if scratch else True


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps")
def test_the_spill_file_is_never_mapped(tmp_path, monkeypatch):
    """Merges and lookups read and write the spill file with positioned reads: a map would keep
    every page they touched resident (whole folios: 160 MB at 10^7 ids, docs/benchmarks.md 7g)."""
    import grip_loop.idset as idset

    mapped = []
    real = idset.SeenIds._has

    def has(self, h):
        maps = Path("/proc/self/maps").read_text()
        mapped.append(str(self._scratch.folder) in maps)
        return real(self, h)

    monkeypatch.setattr(idset.SeenIds, "_has", has)
    seen = SeenIds(tmp_path / "spill", buffer=16, block=5)
    for i in range(200):
        seen.add(f"id-{i}")
    assert seen._fd is not None and len(seen.sorted_hashes()) == 192 and not any(mapped)
    assert all(f"id-{i}" in seen for i in range(200)) and "id-200" not in seen
    seen.close()


def test_a_spilled_merge_holds_a_block_not_the_array(tmp_path):
    """A merge streams the old file a block at a time: its private memory is a few blocks, not
    the merged array (the fence once kept a view of every block written: 80 MB at 10^7 ids)."""
    import tracemalloc

    rng = np.random.default_rng(0)
    hashes = np.unique(rng.integers(1, 2**63, 2_000_050, dtype=np.uint64))
    new, first = hashes[:50], hashes[50:]  # 16 MB on file, then 50 more merged in
    seen = SeenIds(tmp_path / "spill", block=1 << 15)  # 256 KB blocks
    seen._merge_file(first)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        seen._merge_file(new)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * (1 << 15) * 8 + (1 << 20), peak  # a few blocks and the fence (~31 KB)
    assert np.array_equal(seen.sorted_hashes(), hashes)
    assert all(seen._has(int(h)) for h in hashes[::997]) and not seen._has(0)
    seen.close()
