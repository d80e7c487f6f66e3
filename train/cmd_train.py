"""`grip train`: train a MoE LM with Lightning (LightningCLI; all flags are Lightning's).

Examples:
    grip train --config configs/train/cpu-tiny.yaml
    grip train --config configs/train/cpu-tiny.yaml --trainer.max_steps 50 --data.batch_size 4
    torchrun --nproc_per_node 8 -m train.main --config configs/train/h800x8-8b-grip.yaml
"""

from __future__ import annotations


def main(argv: list[str]) -> int:
    import sys

    from train.main import main as cli_main

    sys.argv[:1] = ["grip train"]  # LightningCLI names itself after argv[0] in --help

    return cli_main(argv)
