"""The multi-rank test helper fails fast, with the rank's traceback, instead of hanging."""

from __future__ import annotations

import time

import pytest


def _rank_one_raises(rank: int, world: int) -> int:
    import torch.distributed as dist

    if rank == 1:
        raise ValueError("rank one fell over")
    dist.barrier()  # rank 0 waits here for a rank that will never come
    return rank


def _both_fine(rank: int, world: int) -> int:
    import torch
    import torch.distributed as dist

    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    return int(t.item())


@pytest.mark.slow
def test_results_come_back_by_rank_and_a_failing_rank_fails_the_test_at_once(tmp_path):
    from tests.ranks import run_ranks

    assert run_ranks(_both_fine, 2, tmp_path) == [3, 3]
    t0 = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"(?s)rank 1 raised.*rank one fell over"):
        run_ranks(_rank_one_raises, 2, tmp_path, timeout_s=120)
    assert time.monotonic() - t0 < 60  # not the collective's 120 s timeout
