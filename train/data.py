"""Data for the Lightning loop: a DataModule over any IterableDataset of packed token blocks.

Batch contract (every dataset feeding `MoELM` yields these per block; the loader stacks them):
    input_ids   (T,) int64
    labels      (T,) int64, optional (absent = input_ids, as GRIP blocks), aligned with input_ids
                (Hugging Face convention: the model shifts, label[t] is predicted from tokens < t);
                -100 = ignored
    cluster_ids ()   int64, optional: the cluster of the block (-1 = unknown)
    cluster_spans (S, 2) int64, optional (GRIP blocks): (cluster, tokens) of each document piece,
                in order; GripCallback's accounting reads them (`grip_loop.collate`)
The loader stacks blocks with `grip_loop.collate.collate_blocks`: `default_collate`'s batch with
every field in one buffer, which a worker sends through its pipe (a batch of up to 4 MB) or as one
shared-memory storage, not one per field.

Resumability: the DataModule builds a `torchdata` StatefulDataLoader, whose state (including each
worker's dataset state when the dataset has `state_dict`/`load_state_dict`) Lightning saves in
the checkpoint (`loops.fit_loop.state_dict.combined_loader`) and restores before the first batch
of the resumed run. Lightning's fetcher reads one batch ahead of the training step, so the raw
loader state at checkpoint time already counts a batch that was never trained on; a resumed run
would silently skip it. `ResumableLoader` therefore snapshots the state after every batch and
reports the snapshot of the last batch the model actually consumed (the DataModule marks
consumption in `on_before_batch_transfer`). Cost: one extra dependency (torchdata, pure Python,
installed without touching torch) and one small state_dict per batch.

`PackedRandomTokens` is the synthetic stand-in used by tests and the CPU smoke config until the
GRIP dataset lands: block i of shard s is a pure function of (seed, s, i), so its state is a
single counter and resuming is exact by construction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import IterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from grip_loop.collate import collate_blocks
from grip_loop.distributed import World


class PackedRandomTokens(IterableDataset):
    """Seeded synthetic documents packed into fixed-length blocks, separated by EOS.

    Each document follows a cluster-specific rule (token t+1 = t + step_k mod V with probability
    `structure`, else a Zipf draw), so the loss falls as the model learns, and per-cluster losses
    differ. Infinite stream; sharded over distributed ranks and DataLoader workers (each shard
    draws different blocks).
    """

    def __init__(
        self,
        vocab_size: int = 512,
        seq_len: int = 64,
        seed: int = 0,
        num_clusters: int = 4,
        mean_doc_len: int = 48,
        structure: float = 0.7,
        eos_token_id: int = 0,
    ) -> None:
        super().__init__()
        if vocab_size < 4:
            raise ValueError(f"PackedRandomTokens.vocab_size must be >= 4, got {vocab_size}")
        if seq_len < 2:
            raise ValueError(f"PackedRandomTokens.seq_len must be >= 2, got {seq_len}")
        if num_clusters < 0:
            raise ValueError(f"PackedRandomTokens.num_clusters must be >= 0, got {num_clusters}")
        if not 0.0 <= structure <= 1.0:
            raise ValueError(f"PackedRandomTokens.structure must be in [0, 1], got {structure}")
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.seed = seed
        self.num_clusters = num_clusters
        self.mean_doc_len = mean_doc_len
        self.structure = structure
        self.eos_token_id = eos_token_id
        self.blocks_done = 0  # per (rank, worker) shard: the only state

    def state_dict(self) -> dict[str, Any]:
        return {"blocks_done": self.blocks_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.blocks_done = int(state["blocks_done"])

    def block(self, shard: int, index: int) -> dict[str, torch.Tensor]:
        """Block `index` of shard `shard` (pure function of seed, shard, index)."""
        rng = np.random.default_rng([self.seed, shard, index])
        k = int(rng.integers(self.num_clusters)) if self.num_clusters else -1
        step = 1 + 2 * max(k, 0)
        v = self.vocab_size
        zipf_p = 1.0 / np.arange(1, v)
        zipf_p /= zipf_p.sum()
        out = np.empty(self.seq_len, dtype=np.int64)
        pos = 0
        while pos < self.seq_len:
            n = min(int(rng.geometric(1.0 / self.mean_doc_len)) + 1, self.seq_len - pos)
            tok = int(rng.integers(1, v))
            follow = rng.random(n) < self.structure
            draws = rng.choice(np.arange(1, v), size=n, p=zipf_p)
            for j in range(n - 1):
                out[pos + j] = tok
                tok = (tok - 1 + step) % (v - 1) + 1 if follow[j] else int(draws[j])
            out[pos + n - 1] = self.eos_token_id
            pos += n
        ids = torch.from_numpy(out)
        return {"input_ids": ids, "labels": ids.clone(), "cluster_ids": torch.tensor(k, dtype=torch.int64)}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        shard = World.current(from_env=False).partition
        while True:
            # Count before yielding: the loader snapshots state right after a yield, and that
            # snapshot must already include the block just handed out.
            index = self.blocks_done
            self.blocks_done += 1
            yield self.block(shard, index)


class ResumableLoader(StatefulDataLoader):
    """A StatefulDataLoader whose `state_dict()` is the state after the last *consumed* batch.

    `mark_consumed()` is called once per batch that reaches the training step; batches fetched
    ahead of it (prefetch) are not part of the reported state, so resuming replays them.
    """

    _KEEP = 16  # snapshots kept; prefetch depth is 1-2 batches

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._snapshots: dict[int, dict[str, Any]] = {}
        self._yielded = 0
        self._consumed = 0

    def __iter__(self) -> Iterator[Any]:
        it = super().__iter__()
        self._yielded = self._consumed = 0
        self._snapshots = {0: super().state_dict()}
        for batch in it:
            self._yielded += 1
            self._snapshots[self._yielded] = super().state_dict()
            self._snapshots.pop(self._yielded - self._KEEP, None)
            yield batch

    def mark_consumed(self) -> None:
        self._consumed = min(self._consumed + 1, self._yielded)

    def _consumed_state(self) -> dict[str, Any]:
        if self._consumed not in self._snapshots:
            return super().state_dict()
        state = self._snapshots[self._consumed]
        merge = getattr(self.dataset, "merge_inflight_state", None)
        if merge is not None and self._yielded != self._consumed:
            # batches read ahead are re-produced on resume; let the dataset pin what they were
            state = _merge_dataset_states(state, self._snapshots[self._yielded], merge)
        return state

    def state_dict(self) -> dict[str, Any]:
        """The consumed-batch state; under torch.distributed, every rank's (Lightning saves
        rank 0's checkpoint only, and each rank's dataset partition has its own cursors)."""
        state = self._consumed_state()
        world = World.current(from_env=False).world_size
        if world == 1:
            return state
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, state)
        return {"per_rank": gathered}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "per_rank" in state_dict:
            w = World.current(from_env=False)
            rank, world = w.rank, w.world_size
            saved = len(state_dict["per_rank"])
            if saved != world:
                raise ValueError(
                    f"the checkpoint holds data-loader state for {saved} ranks but this run has {world}; "
                    "resume with the same number of processes"
                )
            state_dict = state_dict["per_rank"][rank]
        saved = saved_num_workers(state_dict)
        if saved is not None and saved != self.num_workers:
            # torchdata would fail later, at the first batch, with a bare AssertionError
            raise ValueError(
                f"num_workers: the checkpoint's data-loader state was saved with num_workers={saved}, "
                f"this run has num_workers={self.num_workers}; resume with data.num_workers: {saved}. "
                "Each worker reads its own partition of the stream (g = rank * num_workers + worker), "
                "with its own cursors, so the partitions of another worker count cannot continue "
                "where these stopped (changing it means starting the data stream afresh)"
            )
        check = getattr(self.dataset, "check_resume", None)
        if check is not None:  # in this process, before workers start (GripIterableDataset)
            for ds_state in _dataset_states(state_dict):
                check(ds_state, "the data-loader state in the checkpoint")
        super().load_state_dict(state_dict)


def _dataset_states(state: Any) -> list[dict]:
    """Every `dataset_state` dict inside a StatefulDataLoader state (one per worker)."""
    out, stack = [], [state]
    while stack:
        d = stack.pop()
        if not isinstance(d, dict):
            continue
        for key, value in d.items():
            if key == "dataset_state" and isinstance(value, dict):
                out.append(value)
            elif isinstance(value, dict):
                stack.append(value)
    return out


def saved_num_workers(state: Any) -> int | None:
    """The DataLoader worker count a StatefulDataLoader state was saved with (None: unknown)."""
    if not isinstance(state, dict) or not state:
        return None
    if "_num_yielded" in state:  # the single-process iterator's state
        return 0
    stack = [state]
    while stack:
        d = stack.pop()
        if "_num_workers" in d and isinstance(d["_num_workers"], int):
            return int(d["_num_workers"])
        stack.extend(v for v in d.values() if isinstance(v, dict))
    return None


def _merge_dataset_states(consumed: Any, latest: Any, merge: Callable[[dict, dict], dict]) -> Any:
    """Apply `merge` to every `dataset_state` found at the same place in both loader states."""
    if not isinstance(consumed, dict) or not isinstance(latest, dict):
        return consumed
    out = {}
    for key, value in consumed.items():
        other = latest.get(key)
        if key == "dataset_state" and isinstance(value, dict) and isinstance(other, dict):
            out[key] = merge(value, other)
        else:
            out[key] = _merge_dataset_states(value, other, merge)
    return out


class GripDataModule(L.LightningDataModule):
    """Wraps an IterableDataset (or a zero-argument factory building one) in a StatefulDataLoader.

    Args:
        dataset: the IterableDataset of packed blocks, or a callable returning one (called once,
            in `setup`, on every rank — use it when the dataset needs the distributed context).
        batch_size: blocks per step per device.
        num_workers: DataLoader worker processes (0 = in the main process).
        pin_memory: pin host memory (helps GPU input copies; off on CPU).
    """

    def __init__(
        self,
        dataset: IterableDataset | Callable[[], IterableDataset] | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(
                f"GripDataModule.batch_size must be an integer > 0, got {batch_size!r}; "
                "set data.batch_size to the blocks per step per device"
            )
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(
                f"GripDataModule.num_workers must be an integer >= 0, got {num_workers!r} "
                "(0 = read in the main process)"
            )
        self._source = dataset if dataset is not None else PackedRandomTokens
        self.dataset: IterableDataset | None = dataset if isinstance(dataset, IterableDataset) else None
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            self.dataset = self._source()
            if not isinstance(self.dataset, IterableDataset):
                raise ValueError(
                    f"GripDataModule.dataset factory returned {type(self.dataset).__name__}, "
                    "expected a torch IterableDataset of packed token blocks"
                )

    def train_dataloader(self) -> ResumableLoader:
        self.setup()
        self._loader = ResumableLoader(
            self.dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            collate_fn=collate_blocks,
        )
        return self._loader

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Called once per batch that reaches training_step, after any prefetch.
        loader = getattr(self, "_loader", None)
        if loader is not None and self.trainer is not None and self.trainer.training:
            loader.mark_consumed()
        return batch
