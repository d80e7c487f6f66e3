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
from tests.tiny import TINY

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
    m["schema_version"] = 99
    path.write_text(json.dumps(m))
    return path


@pytest.mark.parametrize(
    "damage,match",
    [
        (_truncate_mid, "not a whole number of 512-byte"),
        (_cut_tail, "no end-of-archive marker"),
        (_delete, "missing"),
        (_consistent_count_edit, "holds 4 documents but .* says 3"),
        (_other_schema, "schema version 99"),
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
    import grip_loop.shards as dsmod

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


# ------------------------------------------------------------------ content checksums (issue 13, 3)


def _flip_token_bytes(path: Path, doc: int = 1) -> None:
    """Change bytes inside one document's `.ids` member: the tar structure stays intact."""
    from grip_loop.shards import shard_index

    off, size = shard_index(path)[doc].tolist()
    assert size >= 4
    with open(path, "r+b") as fh:
        fh.seek(off + 2)
        b = fh.read(2)
        fh.seek(off + 2)
        fh.write(bytes(x ^ 0x5A for x in b))


def test_the_manifest_records_every_shards_sha256(prepared):
    from grip_loop.manifest import file_sha256

    m = load_manifest(prepared)
    shards = [s for c in m.clusters for ss in c.shards.values() for s in ss]
    shards += [s for c in m.clusters for s in c.probe_shards]
    assert shards and all(s.sha256 == file_sha256(prepared / s.path) for s in shards)


def test_changed_token_bytes_are_refused_at_start(prepared):
    """Used to pass full verification (tail, headers and counts are intact) and train."""
    bad = _shard(prepared)  # an order the dataset does not read by default
    _flip_token_bytes(bad)
    ds_ok = GripIterableDataset(prepared, seq_len=16, verify_shards="quick")  # quick: no hashing at start
    assert ds_ok.verify_level == "quick"
    with pytest.raises(ManifestError, match="content sha256 .* differs from the .* recorded in") as err:
        GripIterableDataset(prepared, seq_len=16)  # auto = full for a small corpus
    msg = str(err.value)
    assert str(bad) in msg and f"grip prepare --out {prepared}" in msg


def test_large_corpora_check_each_shards_sha256_at_its_first_read(prepared, monkeypatch):
    import grip_loop.shards as dsmod

    bad = _shard(prepared)
    _flip_token_bytes(bad)
    monkeypatch.setattr(dsmod, "FULL_VERIFY_MAX_BYTES", 1)  # "auto" is now quick
    ds = GripIterableDataset(prepared, seq_len=16, order="random")
    assert ds.verify_level == "quick"
    with pytest.raises(ManifestError, match="content sha256") as err:
        for _ in zip(range(500), ds, strict=False):
            pass
    assert str(bad) in str(err.value)


def test_a_changed_probe_shard_is_refused_at_start_at_every_level(prepared):
    from grip_loop.probeset import probe_set

    m = load_manifest(prepared)
    bad = prepared / m.clusters[1].probe_shards[0].path
    _flip_token_bytes(bad, doc=0)
    for level in ("auto", "quick", "full"):
        with pytest.raises(ManifestError, match="content sha256") as err:
            GripIterableDataset(prepared, seq_len=16, verify_shards=level)
        assert str(bad) in str(err.value)
    with pytest.raises(ManifestError, match="content sha256"):
        probe_set(m, prepared, seq_len=16)


def test_a_manifest_without_checksums_warns_once_and_trains(prepared):
    """Corpora prepared before checksums existed still load."""
    path = prepared / "manifest.json"
    m = json.loads(path.read_text())
    for c in m["clusters"]:
        for s in [s for ss in c["shards"].values() for s in ss] + c["probe_shards"]:
            del s["sha256"]
    path.write_text(json.dumps(m))
    with pytest.warns(UserWarning, match="have no recorded sha256") as rec:
        ds = GripIterableDataset(prepared, seq_len=16)
    assert sum("sha256" in str(w.message) for w in rec) == 1
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GripIterableDataset(prepared, seq_len=16)  # once per directory and process
    assert next(iter(ds))["input_ids"].shape == (16,)


@pytest.mark.parametrize("bad", ["abc", 7, "Z" * 64])
def test_a_malformed_sha256_in_the_manifest_is_named(prepared, bad):
    path = prepared / "manifest.json"
    m = json.loads(path.read_text())
    m["clusters"][0]["shards"]["grip"][0]["sha256"] = bad
    path.write_text(json.dumps(m))
    with pytest.raises(ManifestError, match=r"clusters\[0\]\.shards\['grip'\]\[0\]\.sha256 must be 64 hex"):
        load_manifest(prepared)


def test_grip_prepare_records_checksums_that_training_and_eval_check(tmp_path, monkeypatch):
    """The real pipeline (encoder replaced by random vectors): every training, probe and
    held-out shard gets its sha256; a changed training shard stops the dataset, a changed
    held-out shard stops `grip eval`'s reader."""
    import yaml

    import grip_loop.prepare as prep
    from grip_loop.manifest import file_sha256
    from tests.reliability.test_bad_corpus import _fake_embed
    from train.eval import heldout_documents

    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        body = "\n".join(f"    y{j} = x * {i + j} + {j}" for j in range(i % 7 + 2))
        (src / f"m{i:02d}.py").write_text(f"def f{i}(x):\n{body}\n    return x\n")
    cfg = yaml.safe_load((Path(__file__).parents[2] / "configs" / "prepare" / "tiny.yaml").read_text())
    cfg.update(k=2, heldout_fraction=0.2, corpus=str(src), out=str(tmp_path / "out"), orders=["grip"])
    monkeypatch.setattr(prep, "embed_corpus", _fake_embed)
    m = prep.prepare(prep.PrepareConfig.from_dict(cfg))
    out = tmp_path / "out"
    shards = [s for c in m.clusters for ss in c.shards.values() for s in ss]
    shards += [s for c in m.clusters for s in c.probe_shards] + list(m.heldout)
    assert m.heldout and all(s.sha256 == file_sha256(out / s.path) for s in shards)
    heldout_documents(out)
    _flip_token_bytes(out / m.heldout[0].path, doc=0)
    with pytest.raises(ManifestError, match="content sha256"):
        heldout_documents(out)
    GripIterableDataset(out, seq_len=16)
    _flip_token_bytes(out / m.clusters[0].shards["grip"][0].path, doc=0)
    with pytest.raises(ManifestError, match="content sha256"):
        GripIterableDataset(out, seq_len=16)


# ------------------------------------------------------------------ out-of-range tokens (issue 13, 3)


def _set_token(root: Path, shard_path: Path, value: int, doc: int = 0) -> None:
    """Write token id `value` into document `doc` of a shard and record the new sha256, as a
    shard written wrong at prepare time (or by an old grip-loop without checksums) would be."""
    import numpy as np

    from grip_loop.manifest import file_sha256
    from grip_loop.shards import shard_index

    off, _ = shard_index(shard_path)[doc].tolist()
    with open(shard_path, "r+b") as fh:
        fh.seek(off)
        fh.write(np.array([value], dtype="<u2").tobytes())
    path = root / "manifest.json"
    m = json.loads(path.read_text())
    rel = str(shard_path.relative_to(root))
    for c in m["clusters"]:
        for s in [s for ss in c["shards"].values() for s in ss] + c["probe_shards"]:
            if s["path"] == rel:
                s["sha256"] = file_sha256(shard_path)
    path.write_text(json.dumps(m))


def _trainer(tmp_path, callbacks, max_steps=2):
    import lightning as L

    return L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )


def test_a_probe_shard_with_an_out_of_range_token_fails_at_setup(prepared, tmp_path):
    """Used to make every refresh fail: the run became static budgets with a warning, exit 0."""
    import lightning as L

    from grip_loop.callback import GripCallback
    from train.data import GripDataModule
    from train.module import MoELM

    class NoStep(L.Callback):
        def on_train_batch_start(self, *a):
            pytest.fail("training started")

    m = load_manifest(prepared)
    bad = prepared / m.clusters[1].probe_shards[0].path
    _set_token(prepared, bad, 5000)  # the manifest's tokenizer has 2048 tokens
    cb = GripCallback(probe_seq_len=16, first_refresh_after_steps=1, refresh_every_n_steps=1)
    model = MoELM(model="tiny", vocab_size=8192, model_overrides=TINY)  # the model could embed it
    dm = GripDataModule(GripIterableDataset(prepared, seq_len=16), batch_size=2)
    with pytest.raises(ManifestError, match="holds token id 5000, but the tokenizer recorded in") as err:
        _trainer(tmp_path, [cb, NoStep()]).fit(model, datamodule=dm)
    msg = str(err.value)
    assert str(bad) in msg and "not model.vocab_size" in msg and "grip prepare" in msg


def test_a_data_error_in_the_probe_stops_training_instead_of_keeping_budgets(prepared, tmp_path, monkeypatch):
    """Transient probe failures keep the previous budgets; a ManifestError is not transient."""
    import grip_loop.callback as cbmod
    from grip_loop.callback import GripCallback
    from train.data import GripDataModule
    from train.module import MoELM

    def damaged(*a, **k):
        raise ManifestError("probe/x.tar: unreadable shard; re-run `grip prepare`")

    monkeypatch.setattr(cbmod, "rapid_adaptation_probe", damaged)
    cb = GripCallback(probe_seq_len=16, first_refresh_after_steps=0, refresh_every_n_steps=1)
    model = MoELM(model="tiny", vocab_size=2048, model_overrides=TINY)
    dm = GripDataModule(GripIterableDataset(prepared, seq_len=16), batch_size=2)
    with pytest.raises(ManifestError, match="probe/x.tar"):
        _trainer(tmp_path, [cb]).fit(model, datamodule=dm)


def test_a_training_shard_with_an_out_of_range_token_names_the_shard(prepared):
    """Used to reach the model and be reported as `set model.vocab_size`."""
    bad = _shard(prepared, k=0, i=0, order="grip")
    _set_token(prepared, bad, 3000)
    ds = GripIterableDataset(prepared, seq_len=16)
    with pytest.raises(ManifestError, match="holds token id 3000, but the tokenizer recorded") as err:
        for _ in zip(range(500), ds, strict=False):
            pass
    assert str(bad) in str(err.value) and "not model.vocab_size" in str(err.value)


def test_the_model_tells_a_small_model_vocabulary_from_damaged_data(prepared, tmp_path):
    """Below the data's tokenizer vocabulary: set model.vocab_size. At or above it (a dataset
    that knows its tokenizer), or negative: the data is damaged."""
    import torch
    from torch.utils.data import IterableDataset

    from train.data import GripDataModule
    from train.module import MoELM

    # GRIP tokens reach 1000 + position; the tokenizer has 2048: the model's 1000 is too small
    dm = GripDataModule(GripIterableDataset(prepared, seq_len=16), batch_size=2)
    with pytest.raises(
        ValueError,
        match=r">= model vocab_size 1000; the data's tokenizer has 2048 tokens: set model\.vocab_size >= 2048",
    ):
        _trainer(tmp_path, []).fit(MoELM(model="tiny", vocab_size=1000, model_overrides=TINY), datamodule=dm)

    class Damaged(IterableDataset):
        vocab_size = 50  # the tokenizer that made the data

        def __iter__(self):
            while True:
                yield {"input_ids": torch.full((8,), 60, dtype=torch.long)}

    dm = GripDataModule(Damaged(), batch_size=2)
    with pytest.raises(
        ValueError, match=r"token id 60, outside the vocabulary .* \(50 tokens\): the data is damaged"
    ):
        _trainer(tmp_path, []).fit(MoELM(model="tiny", vocab_size=56, model_overrides=TINY), datamodule=dm)


# ------------------------------------------------------------------ manifest values out of range (issue 13, 3)


def _edit(root: Path, fn) -> Path:
    path = root / "manifest.json"
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))
    return path


@pytest.mark.parametrize(
    "edit,field",
    [
        (lambda m: m["clusters"][1].update(sigma=-0.5), r"clusters\[1\]\.sigma must be a number in \[0, 2\]"),
        (
            lambda m: m["clusters"][1].update(sigma=float("nan")),
            r"clusters\[1\]\.sigma must be a finite number",
        ),
        (lambda m: m["clusters"][1].update(sigma=7.0), r"clusters\[1\]\.sigma must be a number in \[0, 2\]"),
        (
            lambda m: m["clusters"][0].update(quality=7.5),
            r"clusters\[0\]\.quality must be a number in \[0, 1\]",
        ),
        (
            lambda m: m["clusters"][0].update(quality=-0.2),
            r"clusters\[0\]\.quality must be a number in \[0, 1\]",
        ),
        (lambda m: m["clusters"][0].update(quality=float("inf")), r"clusters\[0\]\.quality must be a finite"),
        (
            lambda m: m["clusters"][2].update(quality_scores={"syntax": 11}),
            r"clusters\[2\]\.quality_scores\['syntax'\] must be a score in \[0, 10\]",
        ),
        (
            lambda m: m["clusters"][2].update(mean_length=-3.0),
            r"clusters\[2\]\.mean_length must be a number >= 0",
        ),
        (lambda m: m["clusters"][2].update(n_docs=-12), r"clusters\[2\]\.n_docs must be an integer >= 0"),
        (
            lambda m: m["clusters"][2]["shards"]["grip"][0].update(n_tokens=-1),
            r"clusters\[2\]\.shards\['grip'\]\[0\]\.n_tokens must be",
        ),
        (lambda m: m["tokenizer"].update(eos_id=2048), r"tokenizer\.eos_id must be < tokenizer\.vocab_size"),
        (
            lambda m: m["tokenizer"].update(vocab_size=70000),
            r"tokenizer\.vocab_size must be at most 65536 with token_dtype uint16",
        ),
    ],
    ids=[
        "sigma<0",
        "sigma-nan",
        "sigma>2",
        "quality>1",
        "quality<0",
        "quality-inf",
        "score>10",
        "mean_length<0",
        "n_docs<0",
        "n_tokens<0",
        "eos>=vocab",
        "vocab>uint16",
    ],
)
def test_out_of_range_manifest_values_name_the_file_and_field(prepared, edit, field):
    path = _edit(prepared, edit)
    with pytest.raises(ManifestError, match=field) as err:
        GripIterableDataset(prepared, seq_len=16)
    assert str(path) in str(err.value) and "grip prepare" in str(err.value)
