"""Bad corpus input is skipped and counted, never a crash; nothing usable is a clear error."""

from __future__ import annotations

import json
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
    """Make `secret.py` unreadable (chmod is no obstacle to root, so fail its open directly)."""
    real = os.open

    def fail_open(path, *args, **kwargs):
        if os.fspath(path).endswith("/secret.py"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", fail_open)


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


# ---------------------------------------------------------------------------------------
# Issue 13, section 2. Each test below failed on the reader before the fix.

SECRET = "TOP_SECRET = 'a file outside the corpus root'\n"


def _escape_tree(tmp_path: Path) -> Path:
    """A corpus whose links try every way out of its root (and two that stay inside)."""
    out = tmp_path / "outside"
    (out / "pkg").mkdir(parents=True)
    (out / "secret.py").write_text(SECRET)
    (out / "pkg" / "mod.py").write_text(SECRET)
    (out / "data.jsonl").write_text(json.dumps({"text": SECRET}) + "\n")
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "ok.py").write_text("x = 1\n")
    os.symlink(out / "secret.py", root / "abs.py")  # absolute link out
    os.symlink("../outside/secret.py", root / "rel.py")  # relative link out
    os.symlink("abs.py", root / "chain.py")  # a link to a link out
    os.symlink(out / "data.jsonl", root / "data.jsonl")  # a JSONL file out
    os.symlink(out / "pkg", root / "vendor")  # a directory out
    os.symlink("/proc/self/environ", root / "environ.txt")  # the reader's own environment
    os.symlink("/dev/zero", root / "zero.py")  # an endless device
    os.symlink("ok.py", root / "inside.py")  # stays inside the root: read
    os.symlink("../ok.py", root / "sub" / "up.py")  # stays inside too
    os.symlink("..", out / "pkg" / "back")  # from the outside dir back up: a loop if followed
    return root


@pytest.mark.timeout(60)
def test_symlinks_never_leave_the_corpus_root(tmp_path):
    root = _escape_tree(tmp_path)
    reader = CorpusReader(root)
    docs = list(reader)
    assert [(d.id, d.text) for d in docs] == [
        ("inside.py", "x = 1\n"),
        ("ok.py", "x = 1\n"),
        ("sub/up.py", "x = 1\n"),
    ]
    assert dict(reader.stats.skipped) == {"outside_root": 7}
    # the corpus given as a link is fine: its root is where the link points
    os.symlink(root, tmp_path / "alias")
    assert len(list(CorpusReader(tmp_path / "alias"))) == 3


@pytest.mark.timeout(60)
def test_following_links_out_of_the_root_is_opt_in(tmp_path):
    root = _escape_tree(tmp_path)
    reader = CorpusReader(root, follow_symlinks_outside=True)
    docs = list(reader)
    by_id = {d.id: d.text for d in docs}
    assert set(by_id) == {
        "abs.py",
        "chain.py",
        "data.jsonl:1",
        "inside.py",
        "ok.py",
        "rel.py",
        "sub/up.py",
        "vendor/back/data.jsonl:1",  # vendor/back -> outside/: walked once; its pkg/ was already
        "vendor/back/secret.py",
        "vendor/mod.py",
    }
    assert by_id["abs.py"] == by_id["vendor/mod.py"] == SECRET
    # /proc/self/environ is NUL-separated (binary); /dev/zero is no regular file, never opened
    assert reader.stats.skipped["not_regular"] == 1 and reader.stats.skipped["binary"] == 1
    assert "outside_root" not in reader.stats.skipped


def test_follow_symlinks_outside_is_a_prepare_option(tmp_path, monkeypatch):
    import grip_loop.prepare as prep
    from train.cmd_prepare import main

    assert PrepareConfig().follow_symlinks_outside is False
    (tmp_path / "p.yaml").write_text("follow_symlinks_outside: true\n")
    assert prep.load_config(tmp_path / "p.yaml").follow_symlinks_outside is True
    with pytest.raises(ValueError, match="follow_symlinks_outside: must be true or false"):
        PrepareConfig(follow_symlinks_outside="no")
    seen = []
    monkeypatch.setattr(prep, "prepare", lambda cfg, **kw: seen.append(cfg.follow_symlinks_outside))
    (tmp_path / "c").mkdir()
    args = ["--corpus", str(tmp_path / "c"), "--out", str(tmp_path / "o"), "--no-progress"]
    assert main(args) == 0 and main([*args, "--follow-symlinks-outside"]) == 0
    assert seen == [False, True]


@pytest.mark.timeout(60)
def test_fifos_sockets_and_devices_are_skipped_without_blocking(tmp_path):
    import socket

    root = tmp_path / "c"
    root.mkdir()
    (root / "ok.py").write_text("x = 1\n")
    os.mkfifo(root / "pipe.py")  # opening it for reading would block until a writer comes
    os.mkfifo(root / "pipe.jsonl")
    os.mkfifo(root / "pipe.tar")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(root / "sock.py"))
        os.symlink("/dev/null", root / "null.py")  # outside, then not regular
        reader = CorpusReader(root)
        assert [d.id for d in reader] == ["ok.py"]
        assert dict(reader.stats.skipped) == {"not_regular": 4, "outside_root": 1}
        reader = CorpusReader(root, follow_symlinks_outside=True)
        assert [d.id for d in reader] == ["ok.py"]
        assert dict(reader.stats.skipped) == {"not_regular": 5}
    reader = CorpusReader(root / "pipe.jsonl")  # a FIFO given as the corpus itself
    assert list(reader) == [] and dict(reader.stats.skipped) == {"not_regular": 1}


def _bad_strings_tree(root: Path) -> None:
    """Bad names (not UTF-8) and bad strings (lone surrogates) in every place a reader takes them."""
    import io
    import tarfile

    root.mkdir()
    (root / "ok.py").write_text("x = 1\n")
    raw = os.fsencode(root)
    Path(os.fsdecode(os.path.join(raw, b"caf\xe9.py"))).write_text("y = 2\n")  # a Latin-1 name
    os.mkdir(os.path.join(raw, b"d\xff"))
    Path(os.fsdecode(os.path.join(raw, b"d\xff", b"z.py"))).write_text("z = 3\n")  # in a dir so named
    records = [
        {"text": "lone \ud800 surrogate"},
        {"text": "fine", "id": "bad \udfff id"},
        {"text": "fine", "lang": "\ud83d"},
        {"text": "fine", "path": "p\udc80"},
        {"text": "fine", "source": "s\ud800"},
        {"text": "fine", "\ud800key": "v"},
        {"text": "nul \x00 inside"},
        {"text": "pair \ud83d\ude00 ok", "id": "emoji"},  # a valid surrogate pair: one character
    ]
    with open(root / "a.jsonl", "w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")  # ensure_ascii: surrogates written as \ud800 escapes
        fh.write("[" * 100_000 + "\n")  # nested too deep for json (RecursionError)
        fh.write('{"text": "big", "id": ' + "9" * 5000 + "}\n")  # an int over the digit limit (ValueError)
    (root / "b.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "bom = 1"}).encode() + b"\n")

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(root / "s.tar", "w", format=tarfile.GNU_FORMAT, errors="surrogateescape") as tar:
        add(tar, "k\udcff.txt", b"t = 1")  # a member name that is not UTF-8
        add(tar, "good.txt", b"g = 1")
        add(tar, "meta.txt", b"m = 1")
        add(tar, "meta.json", json.dumps({"doc_id": "\ud800"}).encode())
        add(tar, "utf8surrogate.txt", b"\xed\xa0\x80 = 1")  # a surrogate encoded as UTF-8: invalid


def _all_encodable(doc) -> bool:
    strings = [doc.id, doc.text, doc.lang, doc.path, *doc.fields, *doc.fields.values()]
    try:
        for s in strings:
            s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def test_bad_names_and_strings_are_skipped_and_counted(tmp_path):
    _bad_strings_tree(tmp_path / "c")
    reader = CorpusReader(tmp_path / "c")
    docs = list(reader)
    assert [d.id for d in docs] == ["emoji", "b.jsonl:1", "ok.py", "s.tar/good"]
    assert docs[0].text == "pair \U0001f600 ok" and docs[1].text == "bom = 1"
    assert all(_all_encodable(d) for d in docs)
    assert dict(reader.stats.skipped) == {
        "bad_name": 3,  # café.py, d\xff/z.py, the tar member k\xff.txt
        "bad_metadata": 6,  # id, lang, path, another field, a key, a shard's doc_id
        "undecodable": 2,  # a lone surrogate in JSONL text, a UTF-8-encoded surrogate in a shard
        "binary": 1,  # NUL in the text, as for files
        "bad_jsonl_line": 2,  # too deep, an int too long
    }


# ---- bounded memory on compressed input


def _peak_bytes(fn):
    import tracemalloc

    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


HUGE = 64 << 20  # decompressed; under 100 KB compressed


def _write_run(fh, n: int, byte: bytes = b"x") -> None:
    chunk = byte * (1 << 20)
    for _ in range(n >> 20):
        fh.write(chunk)
    fh.write(byte * (n & ((1 << 20) - 1)))


def test_a_huge_line_in_a_small_jsonl_gz_is_skipped_in_bounded_memory(tmp_path):
    import gzip

    (tmp_path / "c").mkdir()
    path = tmp_path / "c" / "bomb.jsonl.gz"
    with gzip.open(path, "wb", compresslevel=9) as fh:
        fh.write(b'{"text": "ok = 1"}\n{"text": "')
        _write_run(fh, HUGE)
        fh.write(b'"}\n{"text": "fine = 2"}\n')
    assert path.stat().st_size < HUGE / 100
    reader = CorpusReader(tmp_path / "c", max_file_bytes=1 << 16)
    docs, peak = _peak_bytes(lambda: list(reader))
    assert [d.text for d in docs] == ["ok = 1", "fine = 2"]
    assert dict(reader.stats.skipped) == {"too_large": 1}
    assert peak < 8 << 20, f"peak {peak >> 20} MiB for a {HUGE >> 20} MiB line"


def test_an_oversized_line_is_discarded_up_to_its_end(tmp_path):
    """The rest of an oversized line is read in bounded pieces and dropped, never parsed."""
    lines = [
        json.dumps({"text": "a" * 50}),
        json.dumps({"text": "b" * 5000}),  # over 8 x max_file_bytes: never parsed
        json.dumps({"text": "c" * 150}),  # line under the limit, text over max_file_bytes
        json.dumps({"text": "d" * 50}),
    ]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.jsonl").write_text("\n".join(lines))  # no final newline
    reader = CorpusReader(tmp_path / "c", max_file_bytes=100)
    assert [(d.id, d.text[0]) for d in reader] == [("a.jsonl:1", "a"), ("a.jsonl:4", "d")]
    assert dict(reader.stats.skipped) == {"too_large": 2}


def _tar_gz_bomb(path: Path, kind: str, compression: str = "gz") -> None:
    """A compressed tar: sample 0001, then a HUGE member of `kind`, then sample 0003."""
    import bz2
    import gzip
    import lzma
    import tarfile

    def header(name, size, type_=tarfile.REGTYPE):
        info = tarfile.TarInfo(name)
        info.size, info.type = size, type_
        return info.tobuf(format=tarfile.GNU_FORMAT)

    def member(fh, name, data=None, size=None, type_=tarfile.REGTYPE):
        size = len(data) if data is not None else size
        fh.write(header(name, size, type_))
        if data is not None:
            fh.write(data)
        else:
            _write_run(fh, size)
        fh.write(b"\0" * (-size % 512))

    opener = {"gz": gzip.open, "bz2": bz2.open, "xz": lzma.open}[compression]
    with opener(path, "wb") as fh:
        member(fh, "0001.txt", b"ok = 1")
        if kind == "txt":
            member(fh, "0002.txt", size=HUGE)
        elif kind == "json":
            member(fh, "0002.txt", b"meta = 1")
            member(fh, "0002.json", size=HUGE)
        elif kind == "pax":  # an extended header: tarfile reads it whole before the member
            member(fh, "././@PaxHeader", size=HUGE, type_=tarfile.XHDTYPE)
            member(fh, "0002.txt", b"pax = 1")
        elif kind == "longname":  # a GNU long name: the same
            member(fh, "././@LongLink", size=HUGE, type_=tarfile.GNUTYPE_LONGNAME)
            member(fh, "0002.txt", b"long = 1")
        member(fh, "0003.txt", b"fine = 2")
        fh.write(b"\0" * 1024)


@pytest.mark.parametrize(
    "kind, compression",
    [("txt", "gz"), ("json", "gz"), ("pax", "gz"), ("longname", "gz"), ("txt", "bz2"), ("txt", "xz")],
)
def test_a_huge_member_in_a_small_tar_gz_is_skipped_in_bounded_memory(tmp_path, kind, compression):
    """tarfile's own stream mode ("r|*") hands a whole compressed block to the decompressor:
    96 MiB for a 32 MiB member; and it reads extended headers whole."""
    (tmp_path / "c").mkdir()
    path = tmp_path / "c" / f"s.tar.{compression}"
    _tar_gz_bomb(path, kind, compression)
    assert path.stat().st_size < HUGE / 100
    reader = CorpusReader(tmp_path / "c", max_file_bytes=1 << 16)
    docs, peak = _peak_bytes(lambda: list(reader))
    # the bound: a few buffers, and xz's own dictionary (8 MiB at its default preset)
    assert peak < 16 << 20, f"peak {peak >> 20} MiB for a {HUGE >> 20} MiB member"
    assert dict(reader.stats.skipped) == {"too_large": 1}
    if kind in ("txt", "json"):  # the sample is skipped, the next one read
        assert [d.text for d in docs] == ["ok = 1", "fine = 2"]
    else:  # a header over the limit ends the file: what came before it is kept
        assert [d.text for d in docs] == ["ok = 1"]


def test_a_chain_of_tar_headers_ends_the_file_not_the_run(tmp_path):
    """3000 pax headers in a row: tarfile recurses once per header (RecursionError)."""
    import io
    import tarfile

    buf = io.BytesIO()
    for _ in range(3000):
        rec = b"18 comment=abcdef\n"
        info = tarfile.TarInfo("././@PaxHeader")
        info.type, info.size = tarfile.XHDTYPE, len(rec)
        buf.write(info.tobuf(format=tarfile.USTAR_FORMAT) + rec + b"\0" * (-len(rec) % 512))
    info = tarfile.TarInfo("0001.txt")
    info.size = 6
    buf.write(info.tobuf() + b"x = 1\n" + b"\0" * (506 + 1024))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.tar").write_bytes(buf.getvalue())
    (tmp_path / "c" / "b.py").write_text("b = 1\n")
    reader = CorpusReader(tmp_path / "c")
    assert [d.id for d in reader] == ["b.py"]
    assert dict(reader.stats.skipped) == {"unreadable": 1}


def test_a_deep_directory_tree_is_walked_without_recursion(tmp_path):
    """rglob recursed once per level: 1500 nested directories raised RecursionError."""
    dirs = [tmp_path / "c"]
    try:
        dirs[0].mkdir()
        for _ in range(1500):
            dirs.append(dirs[-1] / "d")
            dirs[-1].mkdir()
        (dirs[-1] / "x.py").write_text("x = 1\n")
        (dirs[0] / "a.py").write_text("a = 1\n")
        assert [d.id for d in CorpusReader(dirs[0])] == ["a.py", "d/" * 1500 + "x.py"]
    finally:  # bottom up: shutil.rmtree (pytest's cleanup) recurses once per level, too
        for f in (dirs[-1] / "x.py", dirs[0] / "a.py"):
            f.unlink(missing_ok=True)
        for d in reversed(dirs):
            if d.exists():
                d.rmdir()


# ---- unique ids


def test_document_ids_stay_unique(tmp_path):
    import io
    import tarfile

    root = tmp_path / "c"
    root.mkdir()
    recs = [
        {"id": None},
        {"id": None},
        {},
        {"id": ""},
        {"id": 7},
        {"id": True},
        {"id": [1]},
        {"id": "x"},
        {"id": "x"},
        {"id": "x#2"},
        {"id": "a.jsonl:1"},
        {"id": "b.py"},
        {"id": 7.5},
        {"lang": None, "path": None},
    ]
    with open(root / "a.jsonl", "w") as fh:
        for i, r in enumerate(recs, 1):
            fh.write(json.dumps({"text": f"t{i}", **r}) + "\n")
    (root / "b.py").write_text("b = 1\n")
    with tarfile.open(root / "s.tar", "w") as tar:
        for key, meta in (("000", {"doc_id": "x"}), ("001", {"doc_id": "x"}), ("002", {"doc_id": None})):
            for ext, data in (("txt", f"s{key}".encode()), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    reader = CorpusReader(root)
    docs = list(reader)
    ids = [d.id for d in docs]
    assert ids == [
        "a.jsonl:1",
        "a.jsonl:2",
        "a.jsonl:3",
        "a.jsonl:4",
        "7",
        "a.jsonl:6",
        "a.jsonl:7",
        "x",
        "x#2",
        "x#2#2",
        "a.jsonl:1#2",
        "b.py",
        "a.jsonl:13",
        "a.jsonl:14",
        "b.py#2",
        "x#3",
        "x#4",
        "s.tar/002",
    ]
    assert len(set(ids)) == len(ids)
    assert (docs[13].lang, docs[13].path) == ("unknown", "a.jsonl:14")  # not "None"
    assert reader.stats.duplicate_ids == 6
    assert "6 duplicate ids made unique" in reader.stats.summary()
    assert reader.stats.to_dict()["duplicate_ids"] == 6


def test_prepare_warns_about_duplicate_ids_even_with_nothing_skipped(tmp_path, capsys, monkeypatch):
    import grip_loop.prepare as prep

    monkeypatch.setattr(prep, "embed_corpus", lambda *a, **k: pytest.fail("embedded"))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.jsonl").write_text('{"id": "x", "text": "a = 1"}\n{"id": "x", "text": "b = 2"}\n')
    cfg = PrepareConfig(corpus=str(tmp_path / "c"), out=str(tmp_path / "o"), k=4, progress=False)
    with pytest.raises(ValueError, match="only 2 usable documents"):  # stops right after ingest
        prepare(cfg)
    assert "read 2 documents; skipped 0; 1 duplicate ids made unique" in capsys.readouterr().out
    ingest = json.loads((tmp_path / "o" / "work" / "ingest.json").read_text())
    assert ingest["read_stats"]["duplicate_ids"] == 1


# ---- end to end: `grip prepare` on a corpus with all of the above


def _fake_embed(texts, cfg, work, key, progress=True):
    """Stands in for the encoder (the stage under test is everything around it)."""
    import numpy as np

    x = np.random.default_rng(len(texts)).standard_normal((len(texts), 8)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _hostile_corpus(tmp_path: Path) -> Path:
    import gzip
    import io
    import tarfile

    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.py").write_text(SECRET)
    root = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"corpus\xff")))  # its own name, too
    root.mkdir()
    for i in range(24):
        (root / f"m{i:02d}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i * i}\n" * (1 + i % 3))
    os.symlink(tmp_path / "outside" / "secret.py", root / "leak.py")
    os.symlink("/proc/self/environ", root / "environ.txt")
    os.mkfifo(root / "fifo.py")
    Path(os.fsdecode(os.path.join(os.fsencode(root), b"caf\xe9.py"))).write_text("y = 2\n")
    with gzip.open(root / "j.jsonl.gz", "wb") as fh:
        for i, lang in enumerate(["c++", "c++", "c--", "c--", "x" * 300, "x" * 300]):
            # null ids; languages whose held-out shard names used to collide / be too long
            fh.write(
                json.dumps({"id": None, "lang": lang, "text": f"int g{i}(void) {{ return {i}; }}"}).encode()
            )
            fh.write(b"\n")
        fh.write(json.dumps({"text": "lone \ud800"}).encode() + b"\n")
        fh.write(json.dumps({"text": "ok", "id": "\udfff"}).encode() + b"\n")
        fh.write(json.dumps({"text": "a" * 9000 + "\x00 late NUL"}).encode() + b"\n")  # kept, as for files
        fh.write(json.dumps({"text": "dup = 1", "id": "dup"}).encode() + b"\n")
        fh.write(json.dumps({"text": "dup = 2", "id": "dup"}).encode() + b"\n")
        fh.write(b'{"text": "')
        _write_run(fh, 4 << 20)
        fh.write(b'"}\n')
    with tarfile.open(root / "s.tar.gz", "w:gz", format=tarfile.GNU_FORMAT, errors="surrogateescape") as tar:
        for name, data in (("k\udcff.txt", b"t = 1"), ("good.txt", b"g = 1")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return root


@pytest.mark.timeout(300)
def test_grip_prepare_end_to_end_on_a_hostile_corpus(tmp_path, monkeypatch):
    """The CLI with a YAML config: prepare finishes, and the tokenizer, shards, manifest and
    fingerprint see only good documents, with unique ids; every skip is counted."""
    import io
    import sys

    import yaml

    import grip_loop.prepare as prep
    from grip_loop.docstore import read_docs
    from grip_loop.manifest import load_manifest
    from grip_loop.shards import iter_shard
    from train.cmd_prepare import main

    root = _hostile_corpus(tmp_path)
    cfg = yaml.safe_load((Path(__file__).parents[2] / "configs" / "prepare" / "tiny.yaml").read_text())
    cfg.update(k=2, heldout_fraction=0.5, follow_symlinks_outside=False)
    (tmp_path / "prepare.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr(prep, "embed_corpus", _fake_embed)
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")  # a strict UTF-8 terminal
    monkeypatch.setattr(sys, "stdout", stdout)
    out = tmp_path / "out"
    assert main(["--corpus", str(root), "--out", str(out), "--config", str(tmp_path / "prepare.yaml")]) == 0
    stdout.flush()
    printed = stdout.buffer.getvalue().decode()
    assert "skipped" in printed and "wrote" in printed

    m = load_manifest(out)
    read = m.stats["read"]
    assert read["skipped"] == {
        "bad_metadata": 1,
        "bad_name": 2,
        "not_regular": 1,
        "outside_root": 2,
        "too_large": 1,
        "undecodable": 1,
    }
    assert read["read"] == 24 + 6 + 3 + 1 and read["duplicate_ids"] == 1
    docs = read_docs(out / "work")
    ids = [d["id"] for d in docs]
    assert len(set(ids)) == len(ids) == read["read"] and {"dup", "dup#2"} <= set(ids)
    shards = [s.path for c in m.clusters for ss in c.shards.values() for s in ss]
    shards += [s.path for c in m.clusters for s in c.probe_shards] + [s.path for s in m.heldout]
    texts = [d.text for p in set(shards) for d in iter_shard(out / p, m.tokenizer["token_dtype"])]
    assert texts and not any("TOP_SECRET" in t for t in texts)
    # held-out shards: one file per language, however the language is spelled
    held = [s.path for s in m.heldout]
    assert len(set(held)) == len(held) and all(len(Path(p).name) < 100 for p in held)
    held_docs = [d.meta["lang"] for p in held for d in iter_shard(out / p, m.tokenizer["token_dtype"])]
    assert len(held_docs) == m.stats["heldout_docs"] and {"c++", "c--", "x" * 300} <= set(held_docs)
