"""Per-cluster loss summed over 2 gloo ranks that saw different clusters == naive pooled means."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

# Rank r sees clusters {0, 1+r}; rank 1 also sees cluster 4, so the tensors' lengths differ.
DATA = {
    0: ([0, 1, 0, -1], [2.0, 3.0, 4.0, 9.0], [1.0, 2.0, 1.0, 1.0]),
    1: ([2, 0, 4, 2], [5.0, 6.0, 7.0, 1.0], [2.0, 3.0, 1.0, 1.0]),
}


def _worker(rank: int, world: int) -> dict:
    from train.module import MoELM

    m = MoELM(model_overrides={"num_layers": 1, "hidden_size": 32, "head_dim": 8, "expert_size": 16})
    cids, s, c = DATA[rank]
    m._accumulate_clusters(torch.tensor(cids), torch.tensor(s), torch.tensor(c))
    m._flush_clusters()
    out = m.cluster_loss
    m._flush_clusters()  # nothing new on either rank: previous means are kept, no deadlock
    assert m.cluster_loss == out
    dist.barrier()  # both ranks done with collectives before gloo is torn down
    return out


@pytest.mark.slow
def test_cluster_loss_is_pooled_over_ranks(tmp_path):
    from tests.ranks import run_ranks

    results = dict(enumerate(run_ranks(_worker, 2, tmp_path)))
    sums: dict[int, list[float]] = {}
    for cids, s, c in DATA.values():
        for k, a, b in zip(cids, s, c, strict=True):
            if k >= 0:
                sums.setdefault(k, [0.0, 0.0])
                sums[k][0] += a
                sums[k][1] += b
    naive = {k: a / b for k, (a, b) in sums.items()}
    for rank in (0, 1):
        assert results[rank].keys() == naive.keys()
        for k in naive:
            assert results[rank][k] == pytest.approx(naive[k])
