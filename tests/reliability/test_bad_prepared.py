"""A damaged prepared corpus is refused when the dataset is built, before training starts,
with an error naming the file and the fix (re-run `grip prepare`)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from grip_loop.dataset import GripIterableDataset
from grip_loop.manifest import ManifestError, load_manifest
from tests.prepared import make_prepared

SIZES = [9, 5, 12]


@pytest.fixture
def prepared(tmp_path):
    make_prepared(tmp_path / "p", SIZES, orders=("grip", "random"), max_docs=4)
    return tmp_path / "p"


def _shard(root: Path, k: int = 2, i: int = 1, order: str = "random") -> Path:
    m = json.loads((root / "manifest.json").read_text())
    return root / m["clusters"][k]["shards"][order][i]["path"]


def _truncate_mid(root):
    p = _shard(root)
    os.truncate(p, p.stat().st_size // 2 + 100)  # mid-member, not on a block boundary
    return p


def _cut_tail(root):
    p = _shard(root)
    os.truncate(p, 1536)  # on a block boundary: only the end-of-archive marker is gone
    return p


def _delete(root):
    p = _shard(root)
    p.unlink()
    return p


def _consistent_count_edit(root):
    """A hand edit that keeps the manifest's own sums consistent: only the shard knows."""
    path = root / "manifest.json"
    m = json.loads(path.read_text())
    m["clusters"][2]["shards"]["random"][1]["n_docs"] -= 1
    m["clusters"][2]["shards"]["grip"][1]["n_docs"] -= 1
    m["clusters"][2]["n_docs"] -= 1
    path.write_text(json.dumps(m))
    return _shard(root, order="grip")  # listed first: the first one reported


def _other_schema(root):
    path = root / "manifest.json"
    m = json.loads(path.read_text())
    m["schema_version"] = 2
    path.write_text(json.dumps(m))
    return path


@pytest.mark.parametrize(
    "damage,match",
    [
        (_truncate_mid, "not a whole number of 512-byte"),
        (_cut_tail, "no end-of-archive marker"),
        (_delete, "missing"),
        (_consistent_count_edit, "holds 4 documents but .* says 3"),
        (_other_schema, "schema version 2"),
    ],
    ids=["truncated", "tail-cut", "missing", "count-edit", "schema"],
)
def test_damage_is_refused_before_the_first_block(prepared, damage, match):
    bad = damage(prepared)
    # the default order is "grip"; the damaged shard belongs to "random": every prepared order
    # is checked, since the callback may switch to it at setup
    with pytest.raises(ManifestError, match=match) as err:
        GripIterableDataset(prepared, seq_len=16)
    msg = str(err.value)
    assert str(bad) in msg and "grip prepare" in msg


def test_quick_verification_leaves_the_count_to_the_first_read(prepared):
    _consistent_count_edit(prepared)
    bad = _shard(prepared, order="random")
    ds = GripIterableDataset(prepared, seq_len=16, order="random", verify_shards="quick")
    with pytest.raises(ManifestError, match="holds 4 documents but the manifest says 3") as err:
        for _ in zip(range(200), ds, strict=False):
            pass
    assert str(bad) in str(err.value)


def test_auto_verification_is_quick_above_the_threshold(prepared, monkeypatch):
    import grip_loop.dataset as dsmod

    _consistent_count_edit(prepared)
    monkeypatch.setattr(dsmod, "FULL_VERIFY_MAX_DOCS", 10)
    GripIterableDataset(prepared, seq_len=16)  # header scan skipped: passes
    with pytest.raises(ValueError, match="verify_shards"):
        GripIterableDataset(prepared, verify_shards="some")


def test_the_training_cli_fails_at_startup_on_a_damaged_corpus(prepared, tmp_path, monkeypatch):
    """The real entry point: LightningCLI makes a dataset factory from the config and the
    DataModule calls it at setup, the first thing `trainer.fit` does (before any step)."""
    from train.main import build_cli

    _truncate_mid(prepared)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    cfg = Path(__file__).resolve().parents[2] / "configs" / "train" / "cpu-tiny-grip.yaml"
    cli = build_cli(["--config", str(cfg), f"--data.dataset.init_args.root={prepared}"], run=False)
    with pytest.raises(ManifestError, match="truncated or corrupt shard"):
        cli.datamodule.setup("fit")


# ------------------------------------------------------------------ another tokenizer


def _with_tokenizer(root: Path, texts) -> Path:
    from grip_loop.tokenizer import file_sha256, train_tokenizer

    tok = train_tokenizer(texts, vocab_size=300)
    path = root / "tokenizer" / "tokenizer.json"
    path.parent.mkdir(exist_ok=True)
    tok.save(str(path))
    m = load_manifest(root)
    m.tokenizer.update(path="tokenizer/tokenizer.json", sha256=file_sha256(path))
    m.save(root)
    return path


def test_training_with_another_tokenizer_is_refused(prepared, tmp_path):
    from grip_loop.tokenizer import file_sha256, train_tokenizer

    mine = _with_tokenizer(prepared, ["def f(x): return x + 1\n"] * 20)
    other = tmp_path / "other.json"
    train_tokenizer(["SELECT * FROM t WHERE a = 1;\n"] * 20, vocab_size=300).save(str(other))
    GripIterableDataset(prepared, expected_tokenizer=str(mine))  # the same file: fine
    GripIterableDataset(prepared, expected_tokenizer=file_sha256(mine).upper())  # or its sha
    with pytest.raises(ManifestError, match="prepared with tokenizer sha256") as err:
        GripIterableDataset(prepared, expected_tokenizer=str(other))
    assert str(prepared / "manifest.json") in str(err.value) and "tokenizer_path" in str(err.value)


def test_a_tokenizer_rebuilt_after_the_shards_is_refused(prepared):
    """An interrupted `grip prepare` with new tokenizer settings rewrites tokenizer.json but
    leaves the old manifest and shards: their ids no longer match the tokenizer file."""
    from grip_loop.tokenizer import train_tokenizer

    path = _with_tokenizer(prepared, ["def f(x): return x + 1\n"] * 20)
    load_manifest(prepared)
    train_tokenizer(["fn main() { println!(); }\n"] * 20, vocab_size=300).save(str(path))
    with pytest.raises(ManifestError, match="tokenizer was rebuilt") as err:
        GripIterableDataset(prepared)
    assert str(path) in str(err.value) and "grip prepare" in str(err.value)
    path.unlink()
    with pytest.raises(ManifestError, match="tokenizer listed in .* is missing"):
        load_manifest(prepared)
