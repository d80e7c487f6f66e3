"""`grip export-hf CKPT OUT`: a Lightning checkpoint -> a Hugging Face model folder.

The folder (config.json + model.safetensors) loads with `AutoModelForCausalLM.from_pretrained`,
vLLM and lm-eval-harness. Works on single-file checkpoints (DDP / single device, or FSDP with
`state_dict_type: full`); a sharded FSDP checkpoint folder must first be consolidated with
`python -m lightning.pytorch.utilities.consolidate_checkpoint CKPT_DIR`.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def load_module(ckpt: str | Path):
    """The `train.module.MoELM` of a single-file Lightning checkpoint, weights loaded, on CPU."""
    import torch

    from train.module import MoELM

    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise ValueError(f"{ckpt}: not a checkpoint file (consolidate sharded FSDP checkpoints first)")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    if "hyper_parameters" not in state or "state_dict" not in state:
        raise ValueError(f"{ckpt}: not a Lightning checkpoint of train.module.MoELM")
    import inspect

    # LightningCLI adds bookkeeping keys (e.g. `_instantiator`) to the saved hyper-parameters
    known = set(inspect.signature(MoELM.__init__).parameters) - {"self"}
    hp = {k: v for k, v in state["hyper_parameters"].items() if k in known}
    hp.update(lazy_init=False, experts_backend="hf")
    module = MoELM(**hp)
    module.load_state_dict(state["state_dict"])
    return module


def load_causal_lm(path: str | Path):
    """A Hugging Face causal LM from a Lightning checkpoint file (`train.module.MoELM`) or a
    Hugging Face model folder (`grip export-hf`, any `AutoModelForCausalLM`), on CPU, eval mode."""
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path}: a folder without config.json is not a Hugging Face model folder")
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(path)).eval()
    if not path.is_file():
        raise ValueError(f"{path}: no such checkpoint file or Hugging Face model folder")
    return load_module(path).model.eval()


def export_hf(ckpt: str | Path, out: str | Path) -> Path:
    module = load_module(ckpt)
    out = Path(out)
    module.save_hf(out)
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="grip export-hf", description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="Lightning checkpoint file, e.g. runs/cpu-tiny/checkpoints/last.ckpt")
    p.add_argument("out", help="output folder for the Hugging Face model (created)")
    args = p.parse_args(argv)
    print(f"wrote {export_hf(args.ckpt, args.out)}")
    return 0
