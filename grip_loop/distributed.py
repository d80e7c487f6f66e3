"""torch.distributed for the offline stages: rank/world from torchrun's environment, barriers.

`grip prepare` is launched either as one process or as `torchrun --nproc_per_node N grip
prepare ...`. Tokenize (by document part), embed (by block), the k-means assignment (by block),
the orders of each cluster (by cluster) and shard writing (by unit) are data-parallel; the other stages run on rank 0 while
the rest wait. gloo on CPU, nccl when CUDA exists.
The barrier timeout is long (default 6 h) because rank 0 may train a tokenizer or run
k-means on a large corpus while the others wait.

`World` is the one place that says where this process sits: its rank among the world's
processes and its DataLoader worker among the rank's workers, and from them its partition
of a data stream (g = rank * num_workers + worker of G = world_size * num_workers). The GRIP
dataset, the synthetic training data and the probe ask it instead of torch.distributed.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from dataclasses import dataclass


def rank_world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


@dataclass(frozen=True)
class World:
    """A process's place: `rank` of `world_size` processes, DataLoader `worker` of `num_workers`
    (0 of 1 outside a worker process)."""

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"world: expected 0 <= rank < world_size, got rank={self.rank}, world_size={self.world_size}"
            )
        if not 0 <= self.worker < self.num_workers:
            raise ValueError(
                f"world: expected 0 <= worker < num_workers, got worker={self.worker}, num_workers={self.num_workers}"
            )

    @classmethod
    def current(cls, *, from_env: bool = True) -> World:
        """This process: rank and world size from torch.distributed when it is initialised,
        else (with `from_env`) from torchrun's RANK / WORLD_SIZE, else 0 of 1; the DataLoader
        worker from `get_worker_info()`."""
        import torch

        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
        elif from_env:
            rank, world = rank_world()
        else:
            rank, world = 0, 1
        return cls(rank, world).in_worker()

    def in_worker(self) -> World:
        """This world's rank, with the DataLoader worker of the calling process."""
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return dataclasses.replace(self, worker=wid, num_workers=nw)

    @property
    def partition(self) -> int:
        """g = rank * num_workers + worker: this process's partition of a data stream."""
        return self.rank * self.num_workers + self.worker

    @property
    def num_partitions(self) -> int:
        """G = world_size * num_workers partitions in all."""
        return self.world_size * self.num_workers


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


def all_gather(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank (`[obj]` in a plain process)."""
    if rank_world()[1] <= 1:
        return [obj]
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
