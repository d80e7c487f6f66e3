"""GripIterableDataset: frequencies, partitioning, budget updates, exact resume."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from grip_loop.collate import collate_blocks, token_clusters
from grip_loop.dataset import GripIterableDataset
from grip_loop.distributed import World
from grip_loop.schedule import partition_budgets, permute
from tests.prepared import EOS, decode_docs, make_prepared

SIZES = [40, 25, 1, 60, 0, 13]


@pytest.fixture
def prepared(tmp_path):
    make_prepared(tmp_path, SIZES, orders=("grip", "random"))
    return tmp_path


def take(ds, n):
    """The first n blocks, each with `token_cluster_ids`: its `cluster_spans` expanded."""
    return [{**b, "token_cluster_ids": token_clusters(b)} for b in itertools.islice(iter(ds), n)]


def docs_of(ds, n_docs, step=16):
    """Iterate until at least n_docs documents have started; return the first n_docs."""
    blocks = []
    it = iter(ds)
    while True:
        blocks += list(itertools.islice(it, step))
        docs = decode_docs(blocks)
        if len(docs) > n_docs:  # > : the last start may belong to a doc cut by the block end
            return docs[:n_docs]


def test_permute_is_a_bijection_for_many_sizes_and_keys():
    for n, key in itertools.product([1, 2, 3, 5, 64, 100, 1000, 4097], range(3)):
        assert sorted(permute(np.arange(n), n, key).tolist()) == list(range(n))
    assert permute(np.arange(50), 50, 0).tolist() != permute(np.arange(50), 50, 1).tolist()


@pytest.mark.parametrize("seed", range(3))
def test_one_pass_draws_each_cluster_exactly_its_budget(prepared, seed):
    budgets = np.array([10, 30, 1, 60, 0, 13])  # 30 > N_1 = 25: replay inside the pass
    ds = GripIterableDataset(prepared, budgets, seq_len=32, seed=seed)
    docs = docs_of(ds, int(budgets.sum()))
    by_cluster = {k: [p for c, p in docs if c == k] for k in range(len(SIZES))}
    for k, nk in enumerate(budgets):
        limit = min(nk, SIZES[k])
        assert len(by_cluster[k]) == nk
        # positions [0, n_k) of the order; wrap (replay) beyond N_k
        assert Counter(by_cluster[k]) == Counter(v % limit for v in range(nk)) if nk else not by_cluster[k]


def test_frequencies_follow_weights_over_many_passes(prepared):
    budgets = np.array([5, 20, 1, 3, 0, 11])
    ds = GripIterableDataset(prepared, budgets, seq_len=64, seed=3)
    docs = docs_of(ds, 40 * int(budgets.sum()))
    counts = np.bincount([c for c, _ in docs], minlength=len(SIZES))
    np.testing.assert_array_equal(counts, 40 * budgets)  # whole passes: exact


def test_uniform_default_and_order_selection(prepared):
    ds = GripIterableDataset(prepared, order="random", seq_len=16)
    assert ds.budgets.tolist() == SIZES
    docs = docs_of(ds, sum(SIZES))
    assert sorted(docs) == sorted((k, p) for k, n in enumerate(SIZES) for p in range(n))
    with pytest.raises(ValueError, match="diversity"):
        GripIterableDataset(prepared, order="diversity")


def test_deterministic_for_a_seed(prepared):
    a = take(GripIterableDataset(prepared, seq_len=24, seed=5), 30)
    b = take(GripIterableDataset(prepared, seq_len=24, seed=5), 30)
    c = take(GripIterableDataset(prepared, seq_len=24, seed=6), 30)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c, strict=True))


def test_block_fields(prepared):
    b = list(itertools.islice(iter(GripIterableDataset(prepared, seq_len=24)), 3))[1]
    assert list(b) == ["input_ids", "cluster_spans", "cluster_ids", "weights_version"]
    assert b["input_ids"].shape == (24,) and b["cluster_spans"].shape[1] == 2
    assert int(b["cluster_spans"][:, 1].sum()) == 24 and bool((b["cluster_spans"][:, 1] > 0).all())
    assert all(v.dtype == torch.int64 for v in b.values())
    assert "labels" not in b  # labels = input_ids (HF convention: the model shifts); no copy
    assert b["cluster_ids"].item() == torch.bincount(token_clusters(b)).argmax().item()


def test_two_ranks_two_workers_no_duplicates_no_gaps(prepared):
    budgets = np.array([17, 25, 1, 60, 0, 9])
    world, workers = 2, 2
    per_partition: dict[int, list] = {}
    for rank in range(world):
        ds = GripIterableDataset(prepared, budgets, seq_len=16, seed=1, world=World(rank, world))
        loader = DataLoader(ds, batch_size=None, num_workers=workers)
        blocks = {w: [] for w in range(workers)}
        for i, b in enumerate(itertools.islice(loader, 400)):
            blocks[i % workers].append(b)  # DataLoader alternates workers in order
        for w in range(workers):
            g = rank * workers + w
            n_pass = int(partition_budgets(budgets, g, world * workers).sum())
            docs = decode_docs(blocks[w])
            assert len(docs) > n_pass
            per_partition[g] = docs[:n_pass]
    union = Counter(d for docs in per_partition.values() for d in docs)
    expected = Counter((k, v % min(n, SIZES[k])) for k, n in enumerate(budgets) for v in range(n))
    assert union == expected


def test_budget_update_reaches_the_next_block_without_workers(prepared):
    ds = GripIterableDataset(prepared, seq_len=16, seed=0)
    it = iter(ds)
    before = [next(it) for _ in range(5)]
    assert {b["weights_version"].item() for b in before} == {0}
    v = ds.publish([0, 0, 0, 7, 0, 0])
    after = [next(it) for _ in range(20)]
    assert all(b["weights_version"].item() == v for b in after)
    # the partly used document may finish, then only cluster 3 is drawn
    tail = torch.cat([token_clusters(b) for b in after[2:]])
    assert set(tail.tolist()) == {3}
    assert ds.state_dict()["history"] == [[v, 5, [0, 0, 0, 7, 0, 0]]]


def test_budget_switch_continues_each_cluster_instead_of_restarting_it(prepared):
    # Republishing budgets (every refresh does) must not send clusters back to their first
    # documents: over one corpus-sized stretch with two switches, nearly every document is new.
    ds = GripIterableDataset(prepared, seq_len=16, seed=0)
    it = iter(ds)
    total, blocks = sum(SIZES), [next(it)]
    for switch in range(3):
        while len(decode_docs(blocks)) < (switch + 1) * total // 3:
            blocks.append(next(it))
        ds.publish(SIZES)
    docs = decode_docs(blocks)[:total]
    assert len(set(docs)) >= 0.85 * total, len(set(docs))


def test_budget_update_reaches_both_workers_within_one_batch(prepared):
    ds = GripIterableDataset(prepared, seq_len=8, seed=0)
    workers, prefetch = 2, 1
    loader = DataLoader(
        ds, batch_size=4, num_workers=workers, prefetch_factor=prefetch, collate_fn=collate_blocks
    )
    it = iter(loader)
    for _ in range(6):
        next(it)
    v = ds.publish([0, 0, 1, 0, 0, 0])
    versions = [next(it)["weights_version"] for _ in range(12)]
    # Batches already queued (prefetch) or being built when the table changed keep the old
    # version for at most one batch per worker beyond the queue; everything after is new.
    stale = sum(int((b != v).any()) for b in versions)
    assert stale <= workers * prefetch + workers
    assert all((b == v).all() for b in versions[workers * prefetch + workers :])


def _stream(blocks):
    return [b["input_ids"] for b in blocks]


@pytest.mark.parametrize("kill_at", [4, 9])
def test_resume_without_workers_is_exact(prepared, kill_at):
    ref = GripIterableDataset(prepared, seq_len=20, seed=2)
    it = iter(ref)
    full, state = [], None
    for i in range(16):
        if i == 3:
            ref.publish([20, 1, 1, 1, 0, 13])
        full.append(next(it))
        if i == kill_at:
            state = ref.state_dict()
    resumed = GripIterableDataset(prepared, seq_len=20, seed=2)
    resumed.load_state_dict(state)
    rest = take(resumed, 16 - kill_at - 1)
    assert all(torch.equal(a, b) for a, b in zip(_stream(full[kill_at + 1 :]), _stream(rest), strict=True))
    if kill_at > 3:
        assert resumed.version == 1 and rest[0]["weights_version"].item() == 1


def test_resume_with_stateful_dataloader_two_workers_is_exact(prepared):
    from torchdata.stateful_dataloader import StatefulDataLoader

    def loader(ds):
        return StatefulDataLoader(
            ds,
            batch_size=2,
            num_workers=2,
            prefetch_factor=1,
            snapshot_every_n_steps=1,
            collate_fn=collate_blocks,
        )

    ds = GripIterableDataset(prepared, seq_len=12, seed=4)
    dl = loader(ds)
    it = iter(dl)
    batches, state = [], None
    for i in range(24):
        if i == 1:
            ds.publish([3, 25, 1, 2, 0, 13])  # a weight change well before the kill
        batches.append(next(it)["input_ids"])
        if i == 12:
            state = dl.state_dict()
    ds2 = GripIterableDataset(prepared, seq_len=12, seed=4)
    ds2.publish([3, 25, 1, 2, 0, 13])  # the callback restores the table from its own state
    dl2 = loader(ds2)
    dl2.load_state_dict(state)
    rest = list(itertools.islice(iter(dl2), 11))
    assert all(torch.equal(a, b["input_ids"]) for a, b in zip(batches[13:], rest, strict=True))


def test_bad_arguments_and_mismatched_resume(prepared):
    with pytest.raises(ValueError, match="budgets"):
        GripIterableDataset(prepared, [1, 2, 3])
    with pytest.raises(ValueError, match="empty cluster"):
        GripIterableDataset(prepared, [1, 1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="seq_len"):
        GripIterableDataset(prepared, seq_len=0)
    ds = GripIterableDataset(prepared, seq_len=8)
    take(ds, 2)
    state = ds.state_dict()
    other = GripIterableDataset(prepared, seq_len=8, world=World(1, 2))
    other.load_state_dict(state)
    with pytest.raises(ValueError, match="same world size"):
        take(other, 1)
    with pytest.raises(ValueError, match="seed"):
        GripIterableDataset(prepared, seq_len=8, seed=9).load_state_dict(state)


# ----------------------------------------------------------------------------- naive reference
def _naive_stream(root, budgets, *, seed, seq_len, n_blocks, order="grip", replay=True):
    """The block stream of one partition (no workers) from first principles: every pass laid
    out whole, documents read with tarfile (`iter_shard`), all documents + EOS concatenated into
    one token stream and cut into blocks."""
    from grip_loop.manifest import load_manifest
    from grip_loop.schedule import pass_clusters
    from grip_loop.shards import iter_shard

    m = load_manifest(root)
    docs = [
        [d.tokens.astype(np.int64) for s in c.shards[order] for d in iter_shard(root / s.path, "uint16")]
        for c in m.clusters
    ]
    sizes = np.array([len(d) for d in docs])
    budgets = np.asarray(budgets, dtype=np.int64)
    tokens, owners = [], []
    drawn = np.zeros(len(sizes), np.int64)
    pass_index, need = 0, (n_blocks + 1) * seq_len
    while sum(map(len, tokens)) < need:
        key = int(np.random.SeedSequence([seed, 0, 0, 1, pass_index]).generate_state(1, dtype=np.uint64)[0])
        for k in pass_clusters(np.arange(int(budgets.sum())), budgets, key):
            position = int(drawn[k]) if not replay else int(drawn[k] % budgets[k]) % min(budgets[k], sizes[k])
            if not replay and position >= sizes[k]:
                return None  # exhausted: the dataset raises
            drawn[k] += 1
            doc = np.append(docs[k][position], EOS)
            tokens.append(doc)
            owners.append(np.full(len(doc), k))
        pass_index += 1
    stream, owner = np.concatenate(tokens), np.concatenate(owners)
    out = []
    for b in range(n_blocks):
        ids = stream[b * seq_len : (b + 1) * seq_len]
        tc = owner[b * seq_len : (b + 1) * seq_len]
        out.append((ids, tc, int(np.bincount(tc).argmax())))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("seq_len", [2, 7, 33, 200])
def test_blocks_match_a_naive_reference(prepared, seed, seq_len):
    budgets = [[40, 25, 1, 60, 0, 13], [90, 3, 1, 120, 0, 40], [5, 5, 1, 5, 0, 5], [3, 0, 0, 1, 0, 0]][seed]
    n_blocks = max(8, 3000 // seq_len)
    ref = _naive_stream(prepared, budgets, seed=seed, seq_len=seq_len, n_blocks=n_blocks)
    got = take(GripIterableDataset(prepared, budgets, seq_len=seq_len, seed=seed), n_blocks)
    for (ids, tc, major), b in zip(ref, got, strict=True):
        np.testing.assert_array_equal(b["input_ids"].numpy(), ids)
        np.testing.assert_array_equal(b["token_cluster_ids"].numpy(), tc)
        assert b["cluster_ids"].item() == major and b["weights_version"].item() == 0


@pytest.mark.parametrize("seed", [0, 5])
def test_no_replay_blocks_match_a_naive_reference(prepared, seed):
    budgets = [10, 10, 1, 10, 0, 10]
    ref = _naive_stream(prepared, budgets, seed=seed, seq_len=16, n_blocks=20, replay=False)
    got = take(GripIterableDataset(prepared, budgets, seq_len=16, seed=seed, replay=False), 20)
    for (ids, _, _), b in zip(ref, got, strict=True):
        np.testing.assert_array_equal(b["input_ids"].numpy(), ids)


def test_reader_keeps_at_most_max_open_files(prepared):
    from grip_loop.manifest import load_manifest
    from grip_loop.shards import ClusterReader, iter_shard

    c = load_manifest(prepared).clusters[3]  # 60 documents in shards of 7: 9 shards
    reader = ClusterReader(prepared, c.shards["grip"], "uint16", max_open=2)
    expected = [d.tokens for s in c.shards["grip"] for d in iter_shard(prepared / s.path, "uint16")]
    order = np.random.default_rng(0).permutation(len(expected))
    for p in [*order, *order[::-1]]:
        np.testing.assert_array_equal(reader.tokens(int(p)), expected[p])
        assert len(reader._fds) <= 2
    reader.close()
    assert not reader._fds


# ----------------------------------------------------------------------------- collate_blocks
def _random_blocks(rng, n, t, k=5):
    return [
        {
            "input_ids": torch.from_numpy(rng.integers(0, 2048, t)),
            "labels": torch.from_numpy(rng.integers(-100, 2048, t)),
            "token_cluster_ids": torch.from_numpy(rng.integers(0, k, t)),
            "cluster_ids": torch.tensor(int(rng.integers(k))),
            "weights_version": torch.tensor(int(rng.integers(9))),
        }
        for _ in range(n)
    ]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_collate_blocks_equals_default_collate_in_one_storage(seed):
    from torch.utils.data import default_collate

    rng = np.random.default_rng(seed)
    blocks = _random_blocks(rng, int(rng.integers(1, 9)), int(rng.integers(1, 300)))
    ref, got = default_collate(blocks), collate_blocks(blocks, pack=True)
    assert list(got) == list(ref)
    for key in ref:
        assert got[key].dtype == ref[key].dtype and got[key].shape == ref[key].shape
        assert got[key].is_contiguous() and torch.equal(got[key], ref[key])
    assert len({v.untyped_storage().data_ptr() for v in got.values()}) == 1
    # the fields do not overlap: writing one leaves the others intact
    got["labels"].fill_(-7)
    assert torch.equal(got["input_ids"], ref["input_ids"])


def test_collate_blocks_falls_back_to_default_collate():
    from torch.utils.data import default_collate

    mixed = [{"a": torch.zeros(3, dtype=torch.int64), "b": torch.ones(2)} for _ in range(4)]
    got, ref = collate_blocks(mixed, pack=True), default_collate(mixed)
    assert all(torch.equal(got[k], ref[k]) and got[k].dtype == ref[k].dtype for k in ref)
    pair = [torch.arange(3), torch.arange(3)]
    assert torch.equal(collate_blocks(pair, pack=True), torch.arange(3).repeat(2, 1))
    with pytest.raises(RuntimeError):  # ragged blocks are an error, as with default_collate
        collate_blocks([{"a": torch.zeros(3)}, {"a": torch.zeros(4)}], pack=True)
    # outside a worker nothing is handed over: plain default_collate (separate storages)
    blocks = _random_blocks(np.random.default_rng(0), 3, 10)
    plain = collate_blocks(blocks)
    assert len({v.untyped_storage().data_ptr() for v in plain.values()}) == len(plain)
    assert all(torch.equal(plain[k], v) for k, v in default_collate(blocks).items())


def _descriptors_passed(batch) -> int:
    """How many file descriptors pickling `batch` for another process passes (torch's reductions
    wrap each shared-memory storage's in a `multiprocessing.reduction.DupFd`)."""
    import io
    import multiprocessing.reduction as mpr
    from unittest import mock

    import torch.multiprocessing  # noqa: F401 - registers torch's reductions with ForkingPickler

    calls, real = [], mpr.DupFd

    def counting(fd):
        calls.append(fd)
        return real(fd)

    with mock.patch.object(mpr, "DupFd", counting):
        mpr.ForkingPickler(io.BytesIO(), 2).dump(batch)
    return len(calls)


def _piped_batch(blocks):
    """`collate_blocks` as a DataLoader worker runs it (get_worker_info() is set there)."""
    from unittest import mock

    with mock.patch("grip_loop.collate.get_worker_info", lambda: object()):
        return collate_blocks(blocks)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_workers_batch_goes_through_the_pipe_as_bytes(seed):
    """A worker's batch is a `PipedBatch`: pickled for the main process it passes no shared-memory
    descriptor (the same fields as plain tensors pass one, the control), and unpickles to the
    same keys, values, dtypes and shapes, contiguous, writable, in one buffer."""
    import copy
    import pickle

    from torch.utils.data import default_collate

    from grip_loop.collate import PipedBatch

    rng = np.random.default_rng(seed)
    blocks = _random_blocks(rng, int(rng.integers(1, 9)), int(rng.integers(1, 300)))
    batch, ref = _piped_batch(blocks), default_collate(blocks)
    assert type(batch) is PipedBatch and list(batch) == list(ref)
    assert _descriptors_passed(batch) == 0
    assert _descriptors_passed({k: v.clone().share_memory_() for k, v in batch.items()}) == len(batch)
    back = pickle.loads(pickle.dumps(batch))
    assert type(back) is PipedBatch and list(back) == list(ref)
    for k in ref:
        assert back[k].dtype == ref[k].dtype and back[k].shape == ref[k].shape
        assert back[k].is_contiguous() and torch.equal(back[k], ref[k])
    assert len({v.untyped_storage().data_ptr() for v in back.values()}) == 1
    back["labels"].fill_(-7)  # writable, and the fields do not overlap
    assert torch.equal(back["input_ids"], ref["input_ids"]) and (back["labels"] == -7).all()
    shallow, deep = copy.copy(batch), copy.deepcopy(batch)
    assert all(shallow[k].data_ptr() == batch[k].data_ptr() for k in batch)
    assert all(deep[k].data_ptr() != batch[k].data_ptr() and torch.equal(deep[k], batch[k]) for k in batch)
    # changed, it is sent as the plain dict it holds
    batch["labels"] = batch["labels"].clone()
    plain = pickle.loads(pickle.dumps(batch))
    assert type(plain) is dict and all(torch.equal(plain[k], batch[k]) for k in batch)
    del batch["labels"]
    assert type(pickle.loads(pickle.dumps(batch))) is dict
    assert type(pickle.loads(pickle.dumps(PipedBatch({"a": torch.zeros(2)})))) is dict  # rebuilt as a dict


def test_a_batch_over_the_pipe_limit_goes_through_shared_memory(monkeypatch):
    from torch.utils.data import default_collate

    from grip_loop import collate

    blocks = _random_blocks(np.random.default_rng(0), 4, 50)
    monkeypatch.setattr(collate, "PIPE_BYTES", 4 * 50 * 8 * 3)  # under the batch's bytes
    batch = _piped_batch(blocks)
    assert type(batch) is dict and all(v.is_shared() for v in batch.values())
    assert len({v.untyped_storage().data_ptr() for v in batch.values()}) == 1
    assert all(torch.equal(batch[k], v) for k, v in default_collate(blocks).items())


def test_a_piped_batch_moves_like_a_dict():
    """Lightning moves a batch with `apply_to_collection`, which rebuilds a mapping with its type:
    the result holds the same tensors and is sent, if ever, as a plain dict."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    blocks = _random_blocks(np.random.default_rng(1), 3, 20)
    batch = _piped_batch(blocks)
    moved = move_data_to_device(batch, torch.device("cpu"))
    assert isinstance(moved, dict) and list(moved) == list(batch)
    assert all(torch.equal(moved[k], batch[k]) for k in batch)


def _pad_naive(samples):
    """default_collate of the blocks with their spans padded to the longest by (0, 0) rows."""
    from torch.utils.data import default_collate

    rows = max(len(s["cluster_spans"]) for s in samples)
    pad = [torch.zeros(rows - len(s["cluster_spans"]), 2, dtype=torch.int64) for s in samples]
    return default_collate(
        [
            {**s, "cluster_spans": torch.cat([s["cluster_spans"], z])}
            for s, z in zip(samples, pad, strict=True)
        ]
    )


def test_collate_blocks_through_two_workers_matches_default_collate(prepared):
    def batches(collate):
        ds = GripIterableDataset(prepared, seq_len=16, seed=3)
        return list(itertools.islice(DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate), 10))

    from grip_loop.collate import PipedBatch

    for a, b in zip(batches(_pad_naive), batches(collate_blocks), strict=True):
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
        assert type(b) is PipedBatch  # through the workers' pipes, as bytes
        assert len({v.untyped_storage().data_ptr() for v in b.values()}) == 1


@pytest.mark.parametrize("pack", [False, True])
def test_batch_spans_expand_to_each_blocks_token_clusters(prepared, pack):
    from grip_loop.collate import cluster_token_counts

    blocks = list(itertools.islice(iter(GripIterableDataset(prepared, seq_len=16, seed=1)), 40))
    assert len({len(b["cluster_spans"]) for b in blocks}) > 1  # ragged: the padding is exercised
    for i in range(0, 40, 5):
        group = blocks[i : i + 5]
        batch = collate_blocks(group, pack=pack)
        want = torch.stack([token_clusters(b) for b in group])
        assert torch.equal(token_clusters(batch), want)
        assert (
            cluster_token_counts(batch["cluster_spans"], 6).tolist()
            == torch.bincount(want.reshape(-1), minlength=6).tolist()
        )
