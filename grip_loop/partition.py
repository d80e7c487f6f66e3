"""The state of one partition's block stream (one DataLoader worker of one rank): the cursors
`GripIterableDataset` advances, and how they are saved and restored (its `state_dict`).

The state is O(K) and saved from the dataclass fields themselves: every field that declares a
`load` converter in its metadata is a key of the saved state (lists and ints, JSON-friendly),
read back through that converter. Adding a field to the state is adding one line here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import NamedTuple

import numpy as np

from grip_loop.schedule import partition_budgets


def _ints(v) -> np.ndarray:
    return np.asarray(v, dtype=np.int64)


def _carry(v) -> tuple[int, int, int] | None:
    return tuple(v) if v is not None else None


def _entries(v) -> list[tuple]:
    return [tuple(h) for h in v]


def _saved(load, optional: bool = False):
    """Field metadata: saved in the state, read back with `load`. `optional`: a state written
    before the field existed lacks it, and the fresh partition's value stays."""
    return {"load": load, "optional": optional}


def _plain(v):
    """`v` as the saved state holds it: numpy arrays and tuples become (nested) lists."""
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, tuple | list):
        return [_plain(x) for x in v]
    if isinstance(v, np.integer):
        return int(v)
    return v


class Shares(NamedTuple):
    """What a partition's budgets imply (derived from them, never saved)."""

    #: the partition slot positions are computed for: (g, G), or with fewer budgeted documents
    #: than partitions (sum n < G), (g mod sum n, sum n): the spare partitions replay those of
    #: another instead of starving (a rank with nothing to read would hang DDP)
    slot: int
    num_slots: int
    shares: np.ndarray  # m_k of that slot (`schedule.partition_budgets`): draws of k per pass
    total: int  # sum of shares: draws per pass
    budgets: list[int]  # n_k as Python ints


@dataclass
class PartitionState:
    """Everything that changes while one partition iterates (see `grip_loop.dataset`)."""

    g: int  # this partition, of `num_partitions` (saved together as "partition")
    num_partitions: int
    version: int = field(metadata=_saved(int))
    budgets: np.ndarray = field(metadata=_saved(_ints))
    pass_index: int = field(default=0, metadata=_saved(int))
    slot: int = field(default=0, metadata=_saved(int))
    #: per-cluster draw counter: the cursor, kept across passes and switches
    drawn: np.ndarray = field(default=None, metadata=_saved(_ints))
    #: (cluster, position, token offset) of a partly used document
    carry: tuple[int, int, int] | None = field(default=None, metadata=_saved(_carry))
    blocks: int = field(default=0, metadata=_saved(int))
    #: replay=False: per-cluster draws over the whole run (never reset)
    taken: np.ndarray = field(default=None, metadata=_saved(_ints, optional=True))
    #: (version, first block under it, budgets) of every switch
    history: list = field(default_factory=list, metadata=_saved(_entries))
    #: switches replayed from a checkpoint (`GripIterableDataset.merge_inflight_state`): until
    #: block `pinned_until` the recorded switches, not the live table, decide the budgets
    pinned: list = field(default_factory=list, metadata=_saved(_entries, optional=True))
    pinned_until: int = field(default=0, metadata=_saved(int, optional=True))

    # Derived from `budgets` (never saved): recomputed when `budgets` is another object.
    _shares_of: np.ndarray | None = field(default=None, repr=False, compare=False)
    _shares: Shares | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        k = len(self.budgets)
        if self.drawn is None:
            self.drawn = np.zeros(k, np.int64)
        if self.taken is None:
            self.taken = np.zeros(k, np.int64)

    def derived(self) -> Shares:
        """The `Shares` of the current budgets, cached per budgets object."""
        if self._shares_of is not self.budgets:
            total = int(self.budgets.sum())
            slot = (self.g, self.num_partitions) if total >= self.num_partitions else (self.g % total, total)
            shares = partition_budgets(self.budgets, *slot)
            self._shares = Shares(*slot, shares, int(shares.sum()), self.budgets.tolist())
            self._shares_of = self.budgets
        return self._shares

    def switch(self, version: int, budgets: np.ndarray) -> None:
        """Start drawing under new budgets: a new pass from the current cursors, recorded."""
        self.version, self.budgets = int(version), budgets
        self.pass_index, self.slot = 0, 0
        self.history.append((int(version), self.blocks, budgets.tolist()))

    def state(self) -> dict:
        """The saved state: {"partition": [g, G], field: value, ...} in plain lists and ints."""
        saved = {f.name: _plain(getattr(self, f.name)) for f in fields(self) if "load" in f.metadata}
        return {"partition": [self.g, self.num_partitions], **saved}

    def restore(self, s: dict) -> None:
        """Continue from the saved state `s` (ValueError if it is another partition's)."""
        if [self.g, self.num_partitions] != list(s["partition"]):
            raise ValueError(
                f"checkpoint partition {s['partition']} != this worker's [{self.g}, {self.num_partitions}]: "
                "resume with the same world size and num_workers"
            )
        for f in fields(self):
            if "load" in f.metadata and (f.name in s or not f.metadata["optional"]):
                setattr(self, f.name, f.metadata["load"](s[f.name]))
