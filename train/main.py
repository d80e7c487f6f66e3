"""LightningCLI entry: `grip train --config configs/train/cpu-tiny.yaml` (= `python -m train.main ...`).

The first argument may be a Lightning subcommand (fit, validate); without one, `fit` runs.
With no --config at all, the embedded default configs/train/cpu-tiny.yaml is used.
Weights & Biases runs offline unless WANDB_MODE says otherwise (sync later with `wandb sync`).
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "train" / "cpu-tiny.yaml"
SUBCOMMANDS = ("fit", "validate", "test", "predict")


def build_cli(argv: list[str], run: bool = True):
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from jsonargparse import set_parsing_settings
    from lightning.pytorch.cli import LightningCLI

    # `--help` shows each config dataclass field's attribute docstring (RAPConfig, BudgetConfig, ...)
    set_parsing_settings(docstring_parse_attribute_docstrings=True)

    from train.data import GripDataModule
    from train.module import MoELM

    argv = list(argv)
    if run and (not argv or argv[0] not in SUBCOMMANDS):
        argv = ["fit", *argv]
    if not any(a == "--config" or a.startswith("--config=") for a in argv) and "--help" not in argv:
        if not DEFAULT_CONFIG.is_file():
            raise SystemExit(f"no --config given and the default {DEFAULT_CONFIG} is missing")
        argv[1 if run else 0 : 1 if run else 0] = ["--config", str(DEFAULT_CONFIG)]
    return LightningCLI(
        MoELM,
        GripDataModule,
        args=argv,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


def main(argv: list[str] | None = None) -> int:
    import sys

    if argv is None:
        argv = sys.argv[1:]
    # LightningCLI warns when it gets both args= and a non-empty sys.argv; the args are ours now.
    sys.argv = sys.argv[:1]
    try:
        build_cli(argv)
    finally:
        # Tear the process group down before interpreter exit: a gloo group left alive can
        # abort the process at exit ("terminate called without an active exception").
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
