"""PackedRandomTokens and GripDataModule: batch contract, determinism, exact resume."""

from __future__ import annotations

import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from train.data import GripDataModule, PackedRandomTokens


def take(it, n):
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_blocks_follow_the_batch_contract(seed):
    ds = PackedRandomTokens(vocab_size=64, seq_len=40, seed=seed, num_clusters=3, mean_doc_len=10)
    blocks = take(iter(ds), 20)
    for b in blocks:
        assert b["input_ids"].shape == (40,) and b["input_ids"].dtype == torch.int64
        assert torch.equal(b["labels"], b["input_ids"])
        assert 0 <= int(b["input_ids"].min()) and int(b["input_ids"].max()) < 64
        assert b["cluster_ids"].shape == () and 0 <= int(b["cluster_ids"]) < 3
    eos = sum(int((b["input_ids"] == 0).sum()) for b in blocks)
    assert eos >= 20 * 40 / 10 * 0.5  # documents of mean length ~10 are packed with EOS
    # Deterministic in the seed, different across seeds.
    again = take(
        iter(PackedRandomTokens(vocab_size=64, seq_len=40, seed=seed, num_clusters=3, mean_doc_len=10)), 20
    )
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(blocks, again, strict=True))
    other = take(iter(PackedRandomTokens(vocab_size=64, seq_len=40, seed=seed + 100, num_clusters=3)), 3)
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(blocks, other, strict=False))


def test_validation_names_field():
    with pytest.raises(ValueError, match="seq_len"):
        PackedRandomTokens(seq_len=1)
    with pytest.raises(ValueError, match="batch_size"):
        GripDataModule(batch_size=0)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stateful_loader_resumes_exactly(num_workers):
    def loader():
        return StatefulDataLoader(
            PackedRandomTokens(vocab_size=50, seq_len=16, seed=5), batch_size=3, num_workers=num_workers
        )

    full = take(iter(loader()), 8)
    first = loader()
    it = iter(first)
    take(it, 3)
    state = first.state_dict()
    del it
    resumed = loader()
    resumed.load_state_dict(state)
    rest = take(iter(resumed), 5)
    for a, b in zip(full[3:], rest, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["cluster_ids"], b["cluster_ids"])


def test_workers_draw_different_blocks():
    dl = StatefulDataLoader(
        PackedRandomTokens(vocab_size=50, seq_len=16, seed=0), batch_size=1, num_workers=2
    )
    a, b = take(iter(dl), 2)
    assert not torch.equal(a["input_ids"], b["input_ids"])


def test_datamodule_accepts_dataset_or_factory():
    dm = GripDataModule(lambda: PackedRandomTokens(vocab_size=30, seq_len=8), batch_size=2)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (2, 8) and batch["cluster_ids"].shape == (2,)
    dm2 = GripDataModule(PackedRandomTokens(vocab_size=30, seq_len=8), batch_size=4)
    assert next(iter(dm2.train_dataloader()))["input_ids"].shape == (4, 8)
    with pytest.raises(ValueError, match="IterableDataset"):
        GripDataModule(lambda: [1, 2, 3]).setup()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumable_loader_reports_consumed_not_prefetched_state(num_workers):
    from train.data import ResumableLoader

    def loader():
        return ResumableLoader(
            PackedRandomTokens(vocab_size=50, seq_len=16, seed=2), batch_size=2, num_workers=num_workers
        )

    full = take(iter(loader()), 6)
    first = loader()
    it = iter(first)
    take(it, 4)  # the trainer fetched 4 batches ...
    for _ in range(3):  # ... but trained on 3 (one prefetched)
        first.mark_consumed()
    state = first.state_dict()
    del it
    resumed = loader()
    resumed.load_state_dict(state)
    rest = take(iter(resumed), 3)
    for a, b in zip(full[3:], rest, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])
