"""torch.distributed for the offline stages: rank/world from torchrun's environment, barriers.

`grip prepare` is launched either as one process or as `torchrun --nproc_per_node N grip
prepare ...`. Tokenize (by document part) and embed (by block, >90% of the cost) are data-parallel; the other
stages run on rank 0 while the rest wait at a barrier. gloo on CPU, nccl when CUDA exists.
The barrier timeout is long (default 6 h) because rank 0 may train a tokenizer or run
k-means on a large corpus while the others wait.
"""

from __future__ import annotations

import datetime
import os


def rank_world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def init(timeout_hours: float = 6.0) -> tuple[int, int]:
    """Join the process group if launched by torchrun (idempotent); returns (rank, world)."""
    rank, world = rank_world()
    if world > 1:
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(local_rank())
            dist.init_process_group(backend, timeout=datetime.timedelta(hours=timeout_hours))
    return rank, world


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast(obj, src: int = 0):
    """Rank `src`'s `obj` on every rank (`obj` itself in a plain process)."""
    if rank_world()[1] <= 1:
        return obj
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
