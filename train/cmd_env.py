"""`grip env`: what this machine can run (versions, CUDA, optional GPU extras)."""

from __future__ import annotations

import argparse
import importlib
import platform

from train.helpfmt import DefaultsFormatter


def _version(name: str) -> str:
    try:
        mod = importlib.import_module(name)
    # An optional extra may be absent or fail to import (megablocks without CUDA).
    except Exception as exc:
        return f"unavailable ({type(exc).__name__})"
    return str(getattr(mod, "__version__", "installed"))


def main(argv: list[str]) -> int:
    argparse.ArgumentParser(
        formatter_class=DefaultsFormatter, prog="grip env", description=__doc__
    ).parse_args(argv)
    from grip_loop.devices import cuda_available, faiss_gpu_available

    print(f"python       {platform.python_version()}")
    for name in (
        "grip_loop",
        "torch",
        "lightning",
        "transformers",
        "tokenizers",
        "numpy",
        "faiss",
        "webdataset",
        "wandb",
    ):
        print(f"{name:<12} {_version(name)}")
    print(f"cuda         {cuda_available()}")
    print(f"faiss-gpu    {faiss_gpu_available()}")
    print(f"megablocks   {_version('megablocks')}")
    return 0
