"""Bad corpus input is skipped and counted, never a crash; nothing usable is a clear error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from grip_loop.corpus import CorpusReader
from grip_loop.prepare import PrepareConfig, prepare


def _bad_tree(root: Path) -> None:
    root.mkdir()
    (root / "good.py").write_text("def f():\n    return 1\n")
    (root / "also_good.c").write_text("int main(void) { return 0; }\n")
    (root / "binary.py").write_bytes(b"\x7fELF\x00\x00\x01\x02" * 100)
    (root / "latin1.py").write_bytes("caf\xe9 = 1\n".encode("latin-1"))  # invalid UTF-8
    (root / "empty.py").write_text("")
    (root / "blank.py").write_text("   \n\n\t\n")
    with open(root / "huge.py", "wb") as fh:  # 50 MB, sparse: never read, skipped by size
        fh.truncate(50 << 20)
    (root / "secret.py").write_text("x = 2\n")
    os.symlink("loop_a.py", root / "loop_b.py")  # a symlink loop
    os.symlink("loop_b.py", root / "loop_a.py")
    os.symlink("nowhere.py", root / "dangling.py")
    (root / "sub").mkdir()
    (root / "sub" / "deep.py").write_text("y = 3\n")
    os.symlink("..", root / "sub" / "up")  # a directory loop: not followed


@pytest.fixture
def unreadable(monkeypatch):
    """Make `secret.py` unreadable (chmod is no obstacle to root, so fail its read directly)."""
    real = Path.read_bytes

    def read_bytes(self):
        if self.name == "secret.py":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)


def test_every_kind_of_bad_file_is_skipped_and_counted(tmp_path, unreadable):
    _bad_tree(tmp_path / "c")
    reader = CorpusReader(tmp_path / "c")
    docs = list(reader)
    assert sorted(d.id for d in docs) == ["also_good.c", "good.py", "sub/deep.py"]
    assert reader.stats.read == 3
    assert dict(reader.stats.skipped) == {
        "binary": 1,
        "undecodable": 1,
        "empty": 2,
        "too_large": 1,
        "unreadable": 1,
        "broken_link": 3,  # the two loop members and the dangling link
    }
    summary = reader.stats.summary()
    assert summary.startswith("read 3 documents; skipped 9") and "1 too_large" in summary


def test_oversized_jsonl_record_and_tar_member_are_skipped(tmp_path):
    import io
    import json
    import tarfile

    big = "x" * 3000
    (tmp_path / "c").mkdir()
    with open(tmp_path / "c" / "a.jsonl", "w") as fh:
        fh.write(json.dumps({"text": big}) + "\n" + json.dumps({"text": "ok = 1"}) + "\n")
    with tarfile.open(tmp_path / "c" / "b.tar", "w") as tar:
        for key, text in (("0001", big), ("0002", "fine = 2")):
            info = tarfile.TarInfo(f"{key}.txt")
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text.encode()))
    reader = CorpusReader(tmp_path / "c", max_file_bytes=1000)
    assert [d.text for d in reader] == ["ok = 1", "fine = 2"]
    assert dict(reader.stats.skipped) == {"too_large": 2}


def test_prepare_prints_the_summary_and_stores_it(tmp_path, unreadable, capsys, monkeypatch):
    """A corpus of bad files plus 3 good ones gets past ingest (then k=4 > 3 stops it, before
    the tokenizer and the encoder ever run)."""
    import grip_loop.prepare as prep

    monkeypatch.setattr(prep, "embed_corpus", lambda *a, **k: pytest.fail("embedded"))
    _bad_tree(tmp_path / "c")
    cfg = PrepareConfig(corpus=str(tmp_path / "c"), out=str(tmp_path / "o"), k=4, progress=False)
    with pytest.raises(ValueError, match=r"^k: 4 clusters but .* only 3 usable documents; lower k"):
        prepare(cfg)
    assert "read 3 documents; skipped 9" in capsys.readouterr().out
    assert not (tmp_path / "o" / "tokenizer").exists()  # stopped before tokenize
    ingest = (tmp_path / "o" / "work" / "ingest.json").read_text()
    assert '"broken_link": 3' in ingest


def test_a_corpus_with_nothing_usable_is_a_clear_error(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "bin.py").write_bytes(b"\x00" * 10)
    (tmp_path / "c" / "notes.xyz").write_text("unknown extension")
    os.symlink("x", tmp_path / "c" / "dangling.py")
    cfg = PrepareConfig(corpus=str(tmp_path / "c"), out=str(tmp_path / "o"), progress=False)
    with pytest.raises(ValueError, match="no readable documents") as err:
        prepare(cfg)
    msg = str(err.value)
    assert str(tmp_path / "c") in msg and "1 binary" in msg and "1 broken_link" in msg
    assert not (tmp_path / "o" / "manifest.json").exists()
