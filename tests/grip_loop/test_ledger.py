"""The data ledger: its read model equals the dataset's reads, its counts survive a state
round trip, and its table and files say what was read."""

from __future__ import annotations

import numpy as np
import pytest

from grip_loop.collate import collate_blocks, token_clusters
from grip_loop.dataset import GripIterableDataset
from grip_loop.ledger import Ledger, format_ledger, positions_read
from tests.prepared import make_prepared

SIZES = [30, 12, 0, 25]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("ledger")
    make_prepared(root, SIZES, max_len=12, n_probe=3)
    return root


@pytest.mark.parametrize("seed", range(30))
def test_positions_read_matches_a_loop(seed):
    rng = np.random.default_rng(seed)
    size, n = int(rng.integers(1, 40)), int(rng.integers(1, 90))
    start, count = int(rng.integers(0, 200)), int(rng.integers(0, 400))
    want = np.zeros(size, dtype=np.int64)
    for i in range(start, start + count):
        want[(i % n) % min(n, size)] += 1
    np.testing.assert_array_equal(positions_read(start, count, n, size), want)


def feed(ds, ledger, it, blocks, batch=3):
    for _ in range(blocks // batch):
        b = collate_blocks([next(it) for _ in range(batch)])
        ledger.observe(token_clusters(b), b["input_ids"], b["weights_version"], ds.eos_id)


def actual_reads(draws, carry):
    """Per-document reads of the recorded draws, less the document still being read."""
    seen = [np.zeros(n, dtype=np.int64) for n in SIZES]
    done = draws[:-1] if carry is not None else draws
    for k, p in done:
        seen[k][p] += 1
    return np.concatenate(seen)


@pytest.mark.parametrize("switch", [False, True])
def test_ledger_reads_are_the_dataset_reads(prepared, switch, monkeypatch):
    ds = GripIterableDataset(prepared, budgets=[50, 5, 0, 20], seq_len=16, seed=3)
    draws = []
    orig = GripIterableDataset._next_draw

    def spy(self, p):
        k, pos = orig(self, p)
        draws.append((k, pos))
        return k, pos

    monkeypatch.setattr(GripIterableDataset, "_next_draw", spy)
    budgets = {ds.version: ds.budgets}
    led = Ledger(ds.sizes)
    it = iter(ds)
    feed(ds, led, it, 60)
    switches = 0
    if switch:
        budgets[ds.publish([10, 30, 0, 40])] = np.array([10, 30, 0, 40])
        feed(ds, led, it, 60)
        switches = 1
    led.flush(budgets.__getitem__)
    want = actual_reads(draws, ds._part.carry)
    # one partition: exact, but for a document drawn before a switch and finished after it
    assert np.abs(led.seen.astype(np.int64) - want).sum() <= 2 * switches
    assert led.draws.sum() == want.sum()
    assert led.seen.max() > 1  # cluster 0 (50 draws a pass over 30 documents) is replayed
    # tokens: every token of the consumed blocks, by cluster
    assert led.tokens.sum() == (120 if switch else 60) // 3 * 3 * 16
    rec = led.record(
        n=[10, 30, 0, 40],
        r=[1, 1, 1, 1],
        delta=None,
        gate=[True] * 4,
        capped=[False] * 4,
        projected=None,
        shrink=None,
    )
    assert rec["distinct"] == [int((s > 0).sum()) for s in np.split(led.seen, np.cumsum(SIZES)[:-1])]
    assert rec["rep_max"][0] == int(led.seen[:30].max()) and rec["docs"] == SIZES
    assert rec["rep_mean"][1] == pytest.approx(led.seen[30:42].sum() / 12)
    assert rec["rep_mean"][2] == 0.0 and rec["distinct"][2] == 0
    table = format_ledger(rec, ["a", "b", "c", "d"], step=7, event="end")
    assert "GRIP ledger at step 7 (end)" in table and len(table.splitlines()) == 2 + 4


def test_ledger_state_round_trip_and_saturation():
    led = Ledger([3, 2])
    led.pending = {1: np.array([[250_000.0, 5.0], [10.0, 20.0], [12.0, 18.0]])}
    led.flush(lambda v: np.array([3, 2]))
    assert led.seen.dtype == np.uint16 and led.seen[:3].tolist() == [65535, 65535, 65535]
    assert led.seen[3:].tolist() == [3, 2]
    led.pending = {2: np.ones((3, 2))}
    other = Ledger([3, 2])
    other.load_state_dict(led.state_dict())
    np.testing.assert_array_equal(other.seen, led.seen)
    assert other.draws.tolist() == led.draws.tolist() and other.pending.keys() == {2}
    with pytest.raises(ValueError, match="ledger: the checkpoint counts 5 documents"):
        Ledger([3, 3]).load_state_dict(led.state_dict())
