"""Faults inside the training loop: an exhausted cluster without replay, a DataLoader worker
killed by a signal, a probe failing on one rank of two."""

from __future__ import annotations

import os
import re

import lightning as L
import numpy as np
import pytest
import torch

from grip_loop.dataset import ClusterExhaustedError, GripIterableDataset
from tests.prepared import decode_docs, make_prepared
from tests.reliability._train_helpers import KillerDataset
from tests.tiny import TINY
from train.data import GripDataModule
from train.module import MoELM

SIZES = [12, 8, 10]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("p")
    make_prepared(root, SIZES, max_len=12)
    return root


# ------------------------------------------------------------------ replay disabled


def test_without_replay_every_document_is_read_at_most_once_then_a_clear_error(prepared):
    ds = GripIterableDataset(prepared, seq_len=8, replay=False)
    ds._partition_id = lambda: (0, 1)
    blocks = []
    with pytest.raises(
        ClusterExhaustedError, match=r"cluster \d \(.+\) of .*manifest.json is exhausted"
    ) as err:
        for b in ds:
            blocks.append(b)
    assert "replay: true" in str(err.value)
    docs = decode_docs(blocks)
    assert len(docs) == len(set(docs))  # never twice
    k = int(str(err.value).split("cluster ")[1].split()[0])
    assert sorted(p for c, p in docs if c == k)[: SIZES[k]] == list(range(SIZES[k]))  # all of k, in order


def test_without_replay_budget_switches_do_not_restart_a_cluster(prepared):
    ds = GripIterableDataset(prepared, budgets=[4, 4, 4], seq_len=8, replay=False)
    ds._partition_id = lambda: (0, 1)
    it = iter(ds)
    first = [next(it) for _ in range(3)]
    ds.publish([6, 1, 5])  # a refresh: with replay a new pass would start at position 0 again
    later = []
    with pytest.raises(ClusterExhaustedError):
        while True:
            later.append(next(it))
    docs = decode_docs(first + later)
    assert len(docs) == len(set(docs))


def test_without_replay_state_round_trips_and_default_state_is_unchanged(prepared):
    ds = GripIterableDataset(prepared, seq_len=8, replay=False)
    ds._partition_id = lambda: (0, 1)
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = ds.state_dict()
    rest = [next(it)["input_ids"] for _ in range(3)]
    back = GripIterableDataset(prepared, seq_len=8, replay=False)
    back._partition_id = lambda: (0, 1)
    back.load_state_dict(state)
    again = [b["input_ids"] for _, b in zip(range(3), back, strict=False)]
    assert all(torch.equal(a, b) for a, b in zip(rest, again, strict=True))
    old = dict(state)
    old.pop("taken")  # a checkpoint from before the field existed still loads
    GripIterableDataset(prepared, seq_len=8).load_state_dict(old)


def test_exhaustion_stops_training_and_keeps_the_last_checkpoint(prepared, tmp_path):
    ds = GripIterableDataset(prepared, seq_len=16, replay=False)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=2, save_top_k=-1)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=100,
        logger=False,
        callbacks=[ckpt],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    model = MoELM(model="tiny", vocab_size=2048, model_overrides=TINY, warmup_steps=1)
    with pytest.raises(ClusterExhaustedError, match="is exhausted"):
        trainer.fit(model, datamodule=GripDataModule(ds, batch_size=2, num_workers=0))
    assert 2 <= trainer.global_step < 100
    last = max((tmp_path / "ck").glob("*.ckpt"), key=lambda p: int(p.stem.split("step=")[1]))
    assert torch.load(last, weights_only=False)["global_step"] >= 2


# ------------------------------------------------------------------ a worker killed


@pytest.mark.slow
def test_a_killed_dataloader_worker_stops_training_and_the_checkpoint_resumes(prepared, tmp_path):
    flag = tmp_path / "kill-now"

    class FlagAt(L.Callback):  # arm the killer after the step-4 checkpoint is on disk
        def on_train_batch_end(self, trainer, *a):
            if trainer.global_step == 4:
                flag.touch()

    def fit(ckpt_path=None, steps=8):
        L.seed_everything(0)
        inner = GripIterableDataset(prepared, seq_len=16)
        ds = KillerDataset(inner, str(flag), at=3)
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=steps,
            logger=False,
            callbacks=[
                L.pytorch.callbacks.ModelCheckpoint(
                    dirpath=tmp_path / "ck", every_n_train_steps=4, save_top_k=-1
                ),
                FlagAt(),
            ],
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
        )
        model = MoELM(model="tiny", vocab_size=2048, model_overrides=TINY, warmup_steps=1)
        trainer.fit(model, datamodule=GripDataModule(ds, batch_size=2, num_workers=2), ckpt_path=ckpt_path)
        return trainer

    # torch reports the death from its SIGCHLD check ("is killed by signal") or, when the main
    # process was receiving that worker's batch, from the broken hand-over ("exited unexpectedly").
    # The SIGCHLD handler raises wherever the main process happens to be, so library code on the
    # stack may wrap it (inspect.signature turns it into "TypeError: unsupported callable"): the
    # worker's death must be in the raised exception's chain, not necessarily on top of it.
    with pytest.raises(Exception) as raised:
        fit()
    chain, exc = [], raised.value
    while exc is not None and len(chain) < 20:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    died = re.compile(r"DataLoader worker \(pid.*\) (is killed by signal|exited unexpectedly)")
    assert any(isinstance(e, RuntimeError) and died.search(str(e)) for e in chain), chain
    ckpt = tmp_path / "ck" / "epoch=0-step=4.ckpt"
    state = torch.load(ckpt, weights_only=False)  # intact and loadable
    assert state["global_step"] == 4
    os.unlink(flag)
    trainer = fit(ckpt_path=str(ckpt))  # resume from it
    assert trainer.global_step == 8


# ------------------------------------------------------------------ the probe failing on one rank


def _rap_rank(rank: int, world: int) -> np.ndarray:
    import grip_loop.rap as rap
    from models import build_model

    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=64, num_layers=1, hidden_size=32, head_dim=8, expert_size=16)
    if rank == 1:  # rank 1's clusters fail inside the probe (before the all_reduce)

        def boom(*a, **k):
            raise RuntimeError("probe exploded on rank 1")

        rap._probe_group = boom
    batches = {k: torch.randint(1, 64, (2, 16), generator=torch.Generator().manual_seed(k)) for k in range(4)}
    import warnings

    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        res = rap.rapid_adaptation_probe(model, batches, rap.RAPConfig(steps=2, min_docs=1), num_clusters=4)
    return res.delta


@pytest.mark.slow
def test_a_probe_failing_on_one_rank_does_not_hang_the_others(tmp_path):
    """Clusters 1 and 3 belong to rank 1: they come back NaN on both ranks (the callback then
    keeps the previous budgets everywhere); rank 0's clusters keep their values."""
    from tests.ranks import run_ranks

    d0, d1 = run_ranks(_rap_rank, 2, tmp_path, timeout_s=240)
    np.testing.assert_array_equal(d0, d1)
    assert np.all(np.isfinite(d0[[0, 2]])) and np.all(np.isnan(d0[[1, 3]]))


# ------------------------------------------------------------------ num_workers changed on resume (issue 13, 5)


@pytest.mark.parametrize("before,after", [(2, 0), (0, 2), (2, 1)])
def test_resuming_with_another_num_workers_is_refused_by_name(prepared, before, after):
    """torchdata used to fail at the first batch with a bare AssertionError."""
    from grip_loop.collate import collate_blocks
    from train.data import ResumableLoader, saved_num_workers

    def loader(n):
        ds = GripIterableDataset(prepared, seq_len=8)
        return ResumableLoader(ds, batch_size=2, num_workers=n, collate_fn=collate_blocks)

    first = loader(before)
    it = iter(first)
    for _ in range(3):
        next(it)
        first.mark_consumed()
    state = first.state_dict()
    del it
    assert saved_num_workers(state) == before
    with pytest.raises(
        ValueError,
        match=rf"^num_workers: .* saved with num_workers={before}, this run has "
        rf"num_workers={after}; resume with data.num_workers: {before}",
    ):
        loader(after).load_state_dict(state)
    same = loader(before)
    same.load_state_dict(state)  # the same count resumes
    assert next(iter(same))["input_ids"].shape == (2, 8)


# ------------------------------------------------------------------ resuming on another corpus (issue 13, 3)


def _fit(root, tmp_path, *, steps, ckpt=None, allow=False, callback=True):
    from grip_loop.callback import GripCallback

    ds = GripIterableDataset(root, seq_len=16, allow_corpus_change=allow)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        callbacks=[GripCallback(probe_seq_len=16, first_refresh_after_steps=1000, max_probe_overhead=None)]
        if callback
        else [],
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    model = MoELM(model="tiny", vocab_size=2048, model_overrides=TINY)
    trainer.fit(model, datamodule=GripDataModule(ds, batch_size=2), ckpt_path=ckpt)
    return trainer, ds


def test_a_checkpoint_resumed_on_another_prepared_corpus_is_refused_naming_both(tmp_path):
    """Used to resume on a re-prepared corpus (same K) without a word, and to fail with a
    budget-shape message with another K."""
    from grip_loop.dataset import CorpusChangedError

    a = tmp_path / "a"
    make_prepared(a, SIZES, max_len=12, seed=0)
    trainer, ds = _fit(a, tmp_path, steps=2)
    ckpt = tmp_path / "a.ckpt"
    trainer.save_checkpoint(ckpt)
    fp_a = ds.fingerprint

    # the same folder, prepared again with another seed (same K)
    import shutil

    shutil.rmtree(a)
    make_prepared(a, SIZES, max_len=12, seed=1)
    with pytest.raises(CorpusChangedError) as err:
        _fit(a, tmp_path, steps=4, ckpt=ckpt)
    msg = str(err.value)
    assert fp_a[:16] in msg and GripIterableDataset(a).fingerprint[:16] in msg
    assert str(a) in msg and "prepared again" in msg and "allow_corpus_change: true" in msg

    # another folder with another K
    b = tmp_path / "b"
    make_prepared(b, [7, 9], max_len=12)
    with pytest.raises(CorpusChangedError, match=r"K=3.*K=2") as err:
        _fit(b, tmp_path, steps=4, ckpt=ckpt)
    assert str(a) in str(err.value) and str(b) in str(err.value)
    # without the GRIP callback, the data-loader state is bound too
    with pytest.raises(CorpusChangedError, match="data-loader state"):
        _fit(b, tmp_path, steps=4, ckpt=ckpt, callback=False)

    # the explicit override: model and optimizer resume, data and budgets start afresh
    with pytest.warns(UserWarning, match="allow_corpus_change is set"):
        trainer, _ = _fit(b, tmp_path, steps=4, ckpt=ckpt, allow=True)
    assert trainer.global_step == 4


def test_the_corpus_fingerprint_survives_a_move_and_an_identical_re_prepare(tmp_path):
    import shutil

    from grip_loop.manifest import load_manifest, prepared_fingerprint

    make_prepared(tmp_path / "a", SIZES, seed=0)
    fp = prepared_fingerprint(load_manifest(tmp_path / "a"))
    shutil.copytree(tmp_path / "a", tmp_path / "moved")
    assert prepared_fingerprint(load_manifest(tmp_path / "moved")) == fp
    make_prepared(tmp_path / "again", SIZES, seed=0)
    assert prepared_fingerprint(load_manifest(tmp_path / "again")) == fp
    make_prepared(tmp_path / "other", SIZES, seed=1)
    assert prepared_fingerprint(load_manifest(tmp_path / "other")) != fp


def test_the_loader_refuses_another_corpus_unless_allowed(tmp_path, monkeypatch):
    from grip_loop.collate import collate_blocks
    from grip_loop.dataset import ALLOW_CORPUS_CHANGE_ENV, CorpusChangedError
    from train.data import ResumableLoader

    make_prepared(tmp_path / "a", SIZES, seed=0)
    make_prepared(tmp_path / "b", SIZES, seed=1)
    first = ResumableLoader(
        GripIterableDataset(tmp_path / "a", seq_len=8), batch_size=2, collate_fn=collate_blocks
    )
    it = iter(first)
    for _ in range(3):
        next(it)
        first.mark_consumed()
    state = first.state_dict()
    with pytest.raises(CorpusChangedError, match="fingerprint"):
        ResumableLoader(GripIterableDataset(tmp_path / "b", seq_len=8), batch_size=2).load_state_dict(state)
    monkeypatch.setenv(ALLOW_CORPUS_CHANGE_ENV, "1")
    fresh = next(
        iter(
            ResumableLoader(
                GripIterableDataset(tmp_path / "b", seq_len=8), batch_size=2, collate_fn=collate_blocks
            )
        )
    )
    resumed = ResumableLoader(
        GripIterableDataset(tmp_path / "b", seq_len=8), batch_size=2, collate_fn=collate_blocks
    )
    with pytest.warns(UserWarning, match="start afresh"):
        resumed.load_state_dict(state)
        got = next(iter(resumed))
    assert torch.equal(got["input_ids"], fresh["input_ids"])  # the stream started afresh
    old = {k: v for k, v in state.items()}
    same = ResumableLoader(
        GripIterableDataset(tmp_path / "a", seq_len=8), batch_size=2, collate_fn=collate_blocks
    )
    same.load_state_dict(old)  # the same corpus resumes
