"""GripIterableDataset: per-cluster budgets in, packed token blocks out, exactly resumable.

How a block is made, for one partition g of G (a partition is one DataLoader worker of one
rank: g = rank * num_workers + worker_id, G = world_size * num_workers):

1. Budgets n_k (integers, from Eq. 8) are split into partition shares m_k^(g) =
   |{v in [0, n_k) : v % G == g}| (`schedule.partition_budgets`).
2. A pass of the partition is sum_k m_k^(g) draws; cluster k is drawn exactly m_k^(g)
   times in a keyed pseudo-random order (`schedule.pass_clusters`). Hence cluster k is
   drawn with frequency w_k = n_k / sum n, and the cluster of a draw is a pure function
   of (seed, budget version, partition, pass, slot).
3. Each partition keeps a per-cluster cursor c_k (never reset). A draw of cluster k reads
   virtual position v = g + G * (c_k mod m_k^(g)) and document position
   p = v mod min(n_k, N_k) of cluster k's stream (the shards of the chosen selection order,
   e.g. the Efraimidis–Spirakis order of Eq. 10). Positions [0, n_k) are the selected
   subset; n_k > N_k wraps around (replay). A pass draws cluster k m_k^(g) times, so
   across all partitions each v is visited once per pass: no duplicates, no gaps; and a
   budget switch continues each cluster from its cursor instead of restarting it.
4. Documents (+ EOS) are concatenated and cut into blocks of seq_len tokens. A block
   carries no `labels`: they are the input ids (the Hugging Face convention, the model
   shifts), so the consumer uses `input_ids` (train/module.py does) instead of receiving a
   copy. A block carries `cluster_spans`, one (cluster, tokens) row per document piece in
   it, in order (`grip_loop.collate.token_clusters` expands them to the cluster of every
   token), its majority cluster and the budget version it was drawn under.

Budget updates: `publish(budgets)` writes a shared-memory table (version + n_k) that every
worker reads before it starts a block, so a worker switches within one block of the
publication; the switch starts a new pass from the partition's current cursors. Each block
reports its `weights_version`, so the step at which an update took effect is recorded by
whoever consumes the batches (the callback).

State (`state_dict`) is O(K): budget version and budgets, pass and slot, per-cluster draw
counters, and the (cluster, position, token offset) of the partly used document; no token
buffer is saved, it is re-read. The state of each worker travels with torchdata's
StatefulDataLoader (Lightning saves it in checkpoints). With num_workers = 0 the stream is
a pure function of the seed and the steps at which budgets were published; with workers, a
worker's switch point depends on when it saw the table (recorded per block, and exact on
resume once the checkpoint is more than the prefetch depth past the update).

Reading: `grip_loop.shards.ClusterReader`, one `os.pread` a document through each shard's
memory-mapped index (shared by the workers of a rank through the page cache). The state of a
partition and its checkpoint form: `grip_loop.partition.PartitionState`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset

from grip_loop.collate import SPANS
from grip_loop.distributed import World
from grip_loop.manifest import (
    Manifest,
    check_tokenizer,
    load_manifest,
    prepared_fingerprint,
    warn_if_unchecksummed,
)
from grip_loop.partition import PartitionState
from grip_loop.schedule import pass_clusters
from grip_loop.shards import VERIFY_LEVELS, ClusterReader, verify_prepared

STATE_VERSION = 1


class ClusterExhaustedError(RuntimeError):
    """With `replay=False`, a cluster has no unread document left for a draw."""


class CorpusChangedError(ValueError):
    """A checkpoint is resumed on another prepared corpus than the one it was trained on."""


#: set to 1 to resume a checkpoint on another prepared corpus (as `allow_corpus_change=True`)
ALLOW_CORPUS_CHANGE_ENV = "GRIP_ALLOW_CORPUS_CHANGE"


class GripIterableDataset(IterableDataset):
    """Infinite stream of packed token blocks drawn by per-cluster budgets (see module docs).

    Args:
        root: a directory written by `grip prepare` (its manifest is validated first).
        budgets: initial integer budgets n_k (e.g. `grip_loop.allocate(...)`); None means
            uniform over documents (n_k = N_k).
        order: which selection order's shards to read ("grip", "diversity", "random").
        seq_len: tokens per training block.
        seed: schedule seed; together with the budget version, partition and pass it keys
            every cluster choice.
        replay: True (default): a cluster's stream wraps, every pass re-reads positions
            [0, min(n_k, N_k)) (the paper's replay). False: no document is read twice in the
            run; each draw of cluster k takes the partition's next unread position
            (g + G c, c = the partition's draws of k so far, across passes and budget
            versions), and a draw past N_k raises `ClusterExhaustedError` naming the cluster.
        expected_tokenizer: the tokenizer the model was trained with: a tokenizer.json path
            or its sha256. Checked against the manifest at construction (ManifestError on a
            mismatch). None = no check (the model vocabulary check in GripCallback remains).
        verify_shards: "quick" checks that every shard of every prepared order ends like a
            complete tar (one stat + one 1 KiB read a shard); "full" also scans every shard's
            headers and compares its document count with the manifest (3 header reads a
            document) and its sha256 with the one `grip prepare` recorded; "auto" = full up
            to `FULL_VERIFY_MAX_DOCS` documents and `FULL_VERIFY_MAX_BYTES` shard bytes, else
            quick; "none" skips them. Probe shards' sha256 is checked at every level but
            "none". Whatever the level, a shard's count is checked again at its first read,
            and below "full" its sha256 too (by one partition of G: docs/reliability.md).
        allow_corpus_change: resume a checkpoint written on another prepared corpus (another
            `prepared_fingerprint`: re-prepared, other settings, another corpus). False
            (default): `load_state_dict` raises `CorpusChangedError` naming both corpora. True
            (or the environment variable GRIP_ALLOW_CORPUS_CHANGE=1): the saved stream state
            is dropped and the stream starts afresh on this corpus (the model and optimizer
            still resume; GripCallback starts its budgets afresh too).
        world: the rank and world size to partition the stream for (`World(rank, world_size)`;
            DataLoader workers are added in each worker). None (default) = this process's, from
            torch.distributed or torchrun's environment. For tests and custom launchers.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        budgets=None,
        *,
        order: str = "grip",
        seq_len: int = 512,
        seed: int = 0,
        manifest: Manifest | None = None,
        replay: bool = True,
        expected_tokenizer: str | None = None,
        verify_shards: str = "auto",
        allow_corpus_change: bool = False,
        world: World | None = None,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        if isinstance(seq_len, bool) or not isinstance(seq_len, int | np.integer) or seq_len < 2:
            raise ValueError(
                f"seq_len: must be an integer >= 2, got {seq_len!r} (a block of T tokens trains on T-1 "
                "next-token targets: seq_len 1 trains on nothing and logs loss 0.0); set "
                "data.dataset.init_args.seq_len to 2 or more (e.g. 256)"
            )
        if verify_shards not in VERIFY_LEVELS:
            raise ValueError(f"verify_shards: one of {VERIFY_LEVELS}, got {verify_shards!r}")
        self.manifest = manifest or load_manifest(self.root)
        if expected_tokenizer is not None:
            check_tokenizer(self.manifest, self.root, expected_tokenizer)
        if verify_shards != "none":
            warn_if_unchecksummed(self.manifest, self.root)
        self.verify_level = verify_prepared(self.manifest, self.root, verify_shards)
        self._lazy_sha256 = self.verify_level != "full"
        self.replay = bool(replay)
        self.fingerprint = prepared_fingerprint(self.manifest)
        self.allow_corpus_change = bool(allow_corpus_change) or os.environ.get(
            ALLOW_CORPUS_CHANGE_ENV, ""
        ).strip() not in ("", "0")
        self.seq_len, self.seed = int(seq_len), int(seed)
        self.sizes = np.array(self.manifest.sizes, dtype=np.int64)
        self.k = len(self.sizes)
        self.eos_id = int(self.manifest.tokenizer["eos_id"])
        self.token_dtype = self.manifest.tokenizer["token_dtype"]
        n = self.sizes.copy() if budgets is None else self._check_budgets(budgets)
        # [version, n_0 .. n_{K-1}] in shared memory: written by `publish` in the main
        # process, read by every DataLoader worker before each block.
        self._table = torch.zeros(1 + self.k, dtype=torch.int64).share_memory_()
        self._table[1:] = torch.from_numpy(n)
        self._table_np: np.ndarray | None = None
        self._size_list = self.sizes.tolist()
        self._readers: list[ClusterReader] | None = None
        self._part: PartitionState | None = None
        self.set_order(order)
        self._pending_state: dict | None = None
        self._chunk_tag: tuple | None = None
        self._chunk: np.ndarray | None = None
        self.world = world

    @property
    def vocab_size(self) -> int:
        """The prepared tokenizer's vocabulary (token ids are < this)."""
        return int(self.manifest.tokenizer["vocab_size"])

    def set_order(self, order: str) -> None:
        """Switch the selection order (only before iteration starts: the callback does it at setup)."""
        if order not in self.manifest.orders:
            raise ValueError(
                f"order: {order!r} was not prepared in {self.root / 'manifest.json'} "
                f"(has {self.manifest.orders}); add it to `orders` in the prepare config and re-run"
            )
        if self._part is not None or self._readers is not None:
            raise RuntimeError("set_order: the dataset is already being iterated")
        self.order = order

    # ------------------------------------------------------------------ budgets
    def _check_budgets(self, budgets) -> np.ndarray:
        n = np.asarray(budgets)
        if n.shape != (self.k,) or not np.all(np.isfinite(n)) or np.any(n < 0) or np.any(n != np.floor(n)):
            raise ValueError(f"budgets: need {self.k} non-negative integers, got {budgets!r}")
        n = n.astype(np.int64)
        if np.any((n > 0) & (self.sizes == 0)):
            raise ValueError("budgets: an empty cluster cannot have a positive budget")
        if n.sum() == 0:
            raise ValueError("budgets: all zero, nothing to sample")
        return n

    def publish(self, budgets, version: int | None = None) -> int:
        """Make `budgets` the budgets of every worker's next block; returns the new version."""
        n = self._check_budgets(budgets)
        v = int(self._table[0]) + 1 if version is None else int(version)
        self._table[1:] = torch.from_numpy(n)
        self._table[0] = v  # written last: a reader that sees v sees its budgets
        return v

    @property
    def version(self) -> int:
        return int(self._table[0])

    @property
    def budgets(self) -> np.ndarray:
        return self._table[1:].numpy().copy()

    def weights(self) -> np.ndarray:
        n = self.budgets.astype(np.float64)
        return n / n.sum()

    def _read_table(self) -> tuple[int, np.ndarray]:
        while True:
            v = int(self._table[0])
            n = self._table[1:].numpy().copy()
            if int(self._table[0]) == v:
                return v, n

    # ------------------------------------------------------------------ partitions
    def _partition_id(self) -> tuple[int, int]:
        w = World.current() if self.world is None else self.world.in_worker()
        return w.partition, w.num_partitions

    def _new_partition(self) -> PartitionState:
        g, big_g = self._partition_id()
        v, n = self._read_table()
        return PartitionState(g=g, num_partitions=big_g, version=v, budgets=n)

    def _key(self, p: PartitionState) -> int:
        # SeedSequence-style entropy from every coordinate that defines a pass
        return int(
            np.random.SeedSequence(
                [self.seed, p.version, p.g, p.num_partitions, p.pass_index]
            ).generate_state(1, dtype=np.uint64)[0]
        )

    def _next_draw(self, p: PartitionState) -> tuple[int, int]:
        """(cluster, document position) of the partition's next draw; advances its cursors."""
        g, big_g, shares, total, budgets = p.derived()
        if p.slot >= total:
            p.pass_index, p.slot = p.pass_index + 1, 0
        k = self._cluster_at(p, total, shares)
        if not self.replay:
            # The partition's own residue class g mod G (not the `Shares` slot), so partitions
            # never share a document; cursors survive passes and budget switches.
            position = p.g + p.num_partitions * int(p.taken[k])
            if position >= self.sizes[k]:
                raise ClusterExhaustedError(
                    f"cluster {k} ({self.manifest.clusters[k].label}) of {self.root / 'manifest.json'} is "
                    "exhausted: replay=False and its "
                    f"{int(self.sizes[k])} documents are used up (partition {p.g} of {p.num_partitions}, "
                    f"after {int(p.taken[k])} draws at budget version {p.version}); set replay: true, "
                    "lower trainer.max_steps, or prepare more data for this cluster. Checkpoints "
                    "written before this point are intact: resume from one with replay: true."
                )
            p.taken[k] += 1
            p.drawn[k] += 1
            p.slot += 1
            return k, position
        # A pass draws cluster k exactly shares[k] times, so consecutive cursor values taken
        # mod shares[k] visit each of the partition's virtual positions once per pass. The
        # cursor is never reset: after a budget switch the cluster continues where it was
        # instead of re-reading its first documents.
        i = int(p.drawn[k]) % int(shares[k])
        p.drawn[k] += 1
        p.slot += 1
        limit = min(budgets[k], self._size_list[k])
        position = (g + big_g * i) % limit
        return k, position

    _CHUNK = 4096

    def _cluster_at(self, p: PartitionState, total: int, shares: np.ndarray) -> int:
        # Clusters are computed 4096 slots at a time and cached (as Python ints); the cache
        # is derived from (version, pass, chunk), never saved.
        tag = (p.version, p.pass_index, p.slot // self._CHUNK)
        if self._chunk_tag != tag:
            start = tag[2] * self._CHUNK
            slots = np.arange(start, min(start + self._CHUNK, total))
            self._chunk = pass_clusters(slots, shares, self._key(p)).tolist()
            self._chunk_tag = tag
        return self._chunk[p.slot % self._CHUNK]

    def _maybe_switch(self, p: PartitionState) -> None:
        if p.blocks < p.pinned_until:
            for v, block, n in p.pinned:
                if block == p.blocks:
                    p.switch(v, np.asarray(n, dtype=np.int64))
            return
        if int(self._table_view()[0]) == p.version:  # the common case: nothing published
            return
        v, n = self._read_table()
        if v != p.version:
            p.switch(v, n)

    def _table_view(self) -> np.ndarray:
        """A numpy view of the shared table (made in the process that reads it: not pickled)."""
        if self._table_np is None:
            self._table_np = self._table.numpy()
        return self._table_np

    def __getstate__(self):
        return {**self.__dict__, "_table_np": None}

    # ------------------------------------------------------------------ iteration
    def _reader(self, k: int) -> ClusterReader:
        if self._readers is None:
            # Shards not verified in full at construction have their sha256 checked when first
            # read, each by one partition only (the j-th shard of the order by partition
            # j mod G), so the corpus is hashed about once in all, not once per worker.
            g, big_g = (self._part.g, self._part.num_partitions) if self._part is not None else (0, 1)
            self._readers, j = [], 0
            for c in self.manifest.clusters:
                shards = c.shards[self.order]
                mine = [i for i in range(len(shards)) if (j + i) % big_g == g] if self._lazy_sha256 else []
                self._readers.append(
                    ClusterReader(
                        self.root, shards, self.token_dtype, verify_sha256=mine, vocab_size=self.vocab_size
                    )
                )
                j += len(shards)
        return self._readers[k]

    def _block(self, p: PartitionState) -> dict[str, torch.Tensor]:
        need, eos = self.seq_len, self.eos_id
        ids = np.empty(need, dtype=np.int64)
        spans: list[tuple[int, int]] = []  # (cluster, tokens) of each document piece, in order
        docs: list[tuple[int, int]] = []  # (cluster, position) of each piece
        counts: dict[int, int] = {}
        have = 0
        while have < need:
            if p.carry is not None:
                k, pos, off = p.carry
            else:
                k, pos = self._next_draw(p)
                off = 0
            toks = self._reader(k).tokens(pos, check=False)  # the document is toks + EOS
            n_doc = len(toks) + 1
            take = min(n_doc - off, need - have)
            end = off + take
            if end == n_doc:  # the EOS is in this block
                ids[have : have + take - 1] = toks[off:]
                ids[have + take - 1] = eos
            else:
                ids[have : have + take] = toks[off:end]
            spans.append((k, take))
            docs.append((k, pos))
            counts[k] = counts.get(k, 0) + take
            have += take
            p.carry = (k, pos, end) if end < n_doc else None
        if int(ids.max()) >= self.vocab_size:  # one check a block; the read again names the document
            for k, pos in docs:
                self._reader(k).tokens(pos, check=True)
        p.blocks += 1
        # majority cluster; ties go to the smallest id (as bincount().argmax() would)
        majority = min(counts, key=lambda c: (-counts[c], c))
        return {
            "input_ids": torch.from_numpy(ids),
            SPANS: torch.from_numpy(np.array(spans, dtype=np.int64)),
            "cluster_ids": torch.from_numpy(np.array(majority, dtype=np.int64)),
            "weights_version": torch.from_numpy(np.array(p.version, dtype=np.int64)),
        }

    def __iter__(self):
        if self._part is None:
            self._part = self._new_partition()
            if self._pending_state is not None:
                self._part.restore(self._pending_state)
                self._pending_state = None
        p = self._part
        while True:
            self._maybe_switch(p)
            yield self._block(p)

    # ------------------------------------------------------------------ checkpointing
    def corpus_state(self) -> dict:
        """What a checkpoint records of the corpus it was trained on (see `check_resume`)."""
        return {"corpus_fingerprint": self.fingerprint, "corpus_root": str(self.root), "corpus_k": self.k}

    def check_resume(self, saved: dict, what: str = "the checkpoint") -> bool:
        """True if `saved` (a state with `corpus_state()` fields) was written on this prepared
        corpus, or does not say (a checkpoint from before the field). On another corpus:
        CorpusChangedError naming both, or, with `allow_corpus_change`, a warning and False
        (the caller then starts afresh instead of restoring)."""
        fp = saved.get("corpus_fingerprint") if isinstance(saved, dict) else None
        if not fp or fp == self.fingerprint:
            return True
        old_root, old_k = saved.get("corpus_root", "?"), saved.get("corpus_k", "?")
        msg = (
            f"{what} was trained on the prepared corpus {old_root} (K={old_k}, fingerprint "
            f"{fp[:16]}...), but this run reads {self.root} (K={self.k}, fingerprint "
            f"{self.fingerprint[:16]}...)"
        )
        if self.allow_corpus_change:
            import warnings

            warnings.warn(
                f"{msg}; allow_corpus_change is set: the data stream and the GRIP budgets start afresh "
                "on this corpus (the model and optimizer resume)",
                UserWarning,
                stacklevel=2,
            )
            return False
        same_dir = Path(str(old_root)).resolve() == self.root.resolve()
        raise CorpusChangedError(
            f"{msg}{' (the same folder, prepared again)' if same_dir else ''}. Resume on the corpus the "
            "checkpoint was trained on, or, to continue training on this one on purpose, set "
            f"data.dataset.init_args.allow_corpus_change: true (or {ALLOW_CORPUS_CHANGE_ENV}=1): the "
            "model and optimizer resume, the data stream and budgets start afresh"
        )

    def state_dict(self) -> dict:
        p = self._part
        if p is None:
            return dict(self._pending_state or {}, table=self._table.tolist(), started=False)
        return {
            **self.corpus_state(),
            "state_version": STATE_VERSION,
            "started": True,
            "seed": self.seed,
            "order": self.order,
            **p.state(),
            "table": self._table.tolist(),
        }

    @staticmethod
    def merge_inflight_state(consumed: dict, latest: dict) -> dict:
        """State to resume from when blocks after `consumed` were already produced.

        A loader that reads ahead (Lightning fetches one batch early; workers prefetch)
        reports the state after the last *consumed* batch, so a resumed run re-produces the
        read-ahead blocks. Those were drawn under whatever budgets were live when they were
        made, possibly older than the table at save time. This pins the switches recorded up
        to the latest produced block, so the resumed run re-draws them exactly as before.
        """
        if not consumed.get("started") or not latest.get("started"):
            return consumed
        pinned = [h for h in latest["history"] if h[1] >= consumed["blocks"]]
        return {**consumed, "pinned": pinned, "pinned_until": int(latest["blocks"])}

    def load_state_dict(self, state: dict) -> None:
        if not state.get("started", False):
            return
        if not self.check_resume(state, "the data-loader state in the checkpoint"):
            return  # another corpus, allowed: start the stream afresh
        if state.get("state_version") != STATE_VERSION:
            raise ValueError(f"dataset state version {state.get('state_version')} != {STATE_VERSION}")
        if state["seed"] != self.seed or state["order"] != self.order:
            raise ValueError(
                f"checkpoint was written with seed={state['seed']} order={state['order']!r}, "
                f"this run has seed={self.seed} order={self.order!r}"
            )
        self._part = None
        self._pending_state = state
        # The budget table must not be older than the state (a resume without the callback
        # restoring it first); never move it backwards.
        if int(self._table[0]) < int(state["version"]):
            self.publish(state["budgets"], version=int(state["version"]))
