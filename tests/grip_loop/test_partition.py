"""PartitionState: saved from its dataclass fields, restored exactly (through JSON), older states."""

from __future__ import annotations

import itertools
import json
from dataclasses import fields

import numpy as np
import pytest

from grip_loop.dataset import GripIterableDataset
from grip_loop.partition import PartitionState, Shares
from grip_loop.schedule import partition_budgets
from tests.prepared import make_prepared

SIZES = [40, 25, 1, 60, 0, 13]


def test_every_field_but_the_identity_and_the_cache_is_saved():
    # a field added without `load` metadata would silently not be checkpointed
    unsaved = {f.name for f in fields(PartitionState) if "load" not in f.metadata}
    assert unsaved == {"g", "num_partitions", "_shares_of", "_shares"}
    p = PartitionState(g=1, num_partitions=3, version=2, budgets=np.array([4, 0, 5]))
    assert set(p.state()) == {"partition"} | {f.name for f in fields(p) if "load" in f.metadata}


@pytest.mark.parametrize("seed", range(3))
def test_state_round_trips_through_json_mid_stream(tmp_path, seed):
    make_prepared(tmp_path, SIZES)
    ds = GripIterableDataset(tmp_path, seq_len=int(7 + 40 * seed), seed=seed)
    it = iter(ds)
    for i in range(30 + 10 * seed):
        if i == 11:
            ds.publish([3, 9, 1, 0, 0, 2])
        next(it)
    p = ds._part
    q = PartitionState(
        g=p.g, num_partitions=p.num_partitions, version=0, budgets=np.ones(len(SIZES), np.int64)
    )
    q.restore(json.loads(json.dumps(p.state())))
    for f in fields(p):
        if f.compare:
            a, b = getattr(p, f.name), getattr(q, f.name)
            assert np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b, f.name
    assert q.derived().total == p.derived().total and q.derived().budgets == p.derived().budgets


def test_a_state_from_before_the_optional_fields_restores_with_fresh_values():
    p = PartitionState(g=0, num_partitions=1, version=3, budgets=np.array([2, 2]))
    old = {k: v for k, v in p.state().items() if k not in ("taken", "pinned", "pinned_until")}
    q = PartitionState(g=0, num_partitions=1, version=0, budgets=np.array([1, 1]))
    q.restore(old)
    assert q.version == 3 and q.taken.tolist() == [0, 0] and q.pinned == [] and q.pinned_until == 0
    with pytest.raises(KeyError):  # a required field missing is an error, not a silent default
        q.restore({k: v for k, v in old.items() if k != "drawn"})
    with pytest.raises(ValueError, match="same world size"):
        PartitionState(g=1, num_partitions=2, version=0, budgets=np.array([1, 1])).restore(old)


@pytest.mark.parametrize("g, big_g", itertools.product(range(4), [4]))
def test_shares_remap_the_spare_partitions(g, big_g):
    budgets = np.array([1, 0, 2])  # 3 budgeted documents, 4 partitions: partition 3 replays 0's
    s = PartitionState(g=g, num_partitions=big_g, version=0, budgets=budgets).derived()
    assert isinstance(s, Shares) and (s.slot, s.num_slots) == (g % 3, 3)
    assert s.shares.tolist() == partition_budgets(budgets, g % 3, 3).tolist() and s.total == s.shares.sum()
