"""`grip export-hf CKPT OUT`: a Lightning checkpoint -> a Hugging Face model folder.

The folder (config.json, model.safetensors, generation_config.json and the prepared tokenizer:
tokenizer.json + tokenizer_config.json with `<|endoftext|>` as EOS and pad) loads with
`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`, so vLLM and
lm-eval-harness can use it. The tokenizer comes from the prepared corpus (`--data DIR`), by
default the one the checkpoint was trained on (its GripCallback records the corpus folder);
without one the export says so and writes the model alone. Works on single-file checkpoints (DDP / single device, or FSDP with
`state_dict_type: full`); a sharded FSDP checkpoint folder must first be consolidated with
`python -m lightning.pytorch.utilities.consolidate_checkpoint CKPT_DIR`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from train.helpfmt import DefaultsFormatter


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


def corpus_of_checkpoint(ckpt: str | Path) -> Path | None:
    """The prepared corpus folder a checkpoint was trained on (recorded by GripCallback), if any."""
    import torch

    state = torch.load(Path(ckpt), map_location="cpu", weights_only=False, mmap=True)
    for cb_state in (state.get("callbacks") or {}).values():
        if isinstance(cb_state, dict) and cb_state.get("corpus_root"):
            return Path(cb_state["corpus_root"])
    return None


def tokenizer_file(data: str | Path) -> Path:
    """The prepared corpus's tokenizer.json (the file its manifest names)."""
    from grip_loop.manifest import load_manifest

    m = load_manifest(data, check_files=False)
    return Path(data) / m.tokenizer.get("path", "tokenizer/tokenizer.json")


def hf_tokenizer(data: str | Path):
    """The prepared corpus's tokenizer (manifest.json -> tokenizer.json) as a Hugging Face fast
    tokenizer whose EOS (and pad) is the EOS the packer puts between documents."""
    from transformers import PreTrainedTokenizerFast

    from train.eval import load_tokenizer

    tok, eos = load_tokenizer(data)
    eos_text = tok.id_to_token(eos)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos_text,
        pad_token=eos_text,
        bos_token=eos_text,
        clean_up_tokenization_spaces=False,
    ), eos


def export_hf(ckpt: str | Path, out: str | Path, data: str | Path | None = None, warn=print) -> Path:
    """Write the Hugging Face folder of `ckpt`: model and, from the prepared corpus `data` (default:
    the one the checkpoint was trained on), its tokenizer. Returns `out`."""
    module = load_module(ckpt)
    out = Path(out)
    if data is None:
        data = corpus_of_checkpoint(ckpt)
        if data is not None and not (Path(data) / "manifest.json").is_file():
            data = None
    tok = eos = None
    if data is not None:
        tok, eos = hf_tokenizer(data)
        if tok.vocab_size > module.model_config.vocab_size:
            raise ValueError(
                f"{ckpt}: model vocab_size {module.model_config.vocab_size} < the tokenizer's {tok.vocab_size} "
                f"({data}); export with the prepared corpus the model was trained on (--data)"
            )
        cfg = module.model.config
        cfg.eos_token_id = cfg.pad_token_id = cfg.bos_token_id = eos
        gen = getattr(module.model, "generation_config", None)
        if gen is not None:
            gen.eos_token_id = gen.pad_token_id = gen.bos_token_id = eos
    module.save_hf(out)
    if tok is not None:
        import shutil

        tok.save_pretrained(str(out))
        # the prepared file itself, byte for byte: `grip probe` / a GripCallback proxy check that
        # a model folder's tokenizer.json is the corpus's (sha256); Hugging Face reads it the same
        shutil.copyfile(tokenizer_file(data), out / "tokenizer.json")
    else:
        warn(
            f"warning: {out} has no tokenizer (the checkpoint names no prepared corpus); "
            "pass --data DIR (the `grip prepare` folder) so AutoTokenizer.from_pretrained works"
        )
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        formatter_class=DefaultsFormatter, prog="grip export-hf", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("ckpt", help="Lightning checkpoint file, e.g. runs/cpu-tiny/checkpoints/last.ckpt")
    p.add_argument("out", help="output folder for the Hugging Face model (created)")
    p.add_argument(
        "--data",
        default=None,
        help="prepared corpus (grip prepare --out) whose tokenizer to export "
        "(default: the one the checkpoint was trained on)",
    )
    args = p.parse_args(argv)
    print(f"wrote {export_hf(args.ckpt, args.out, args.data)}")
    return 0
