"""Which optional accelerated paths this process can use.

CPU is always the default. A GPU path is taken only when the hardware *and* the optional
extra are present; each check is cheap and never raises.
"""

from __future__ import annotations

import functools


@functools.cache
def cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False
    return bool(torch.cuda.is_available())


@functools.cache
def faiss_gpu_available() -> bool:
    """True when the installed faiss has GPU kernels (faiss-gpu) and sees a GPU."""
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss-cpu is a hard dependency
        return False
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return bool(get_num_gpus and get_num_gpus() > 0)


@functools.cache
def megablocks_available() -> bool:
    """megablocks builds and imports only with CUDA; absent everywhere else."""
    if not cuda_available():
        return False
    try:
        import megablocks  # noqa: F401
    except Exception:
        return False
    return True


def resolve_device(spec: str) -> str:
    """A device option's value as a torch device string: "auto" is cuda:LOCAL_RANK (this
    process's GPU under torchrun, GPU 0 otherwise) when CUDA exists, else "cpu"; any other
    value ("cpu", "cuda", "cuda:1") is returned as given."""
    if spec != "auto":
        return spec
    from grip_loop.distributed import local_rank

    return f"cuda:{local_rank()}" if cuda_available() else "cpu"
