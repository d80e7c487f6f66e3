"""Fine-grained MoE decoder LMs (tiny for CPU, 8B/32 experts and 16B/64 experts, ~1.4B active).

`build_model` returns a plain transformers `PreTrainedModel` (Qwen3MoeForCausalLM, or
Qwen2MoeForCausalLM with shared experts): decoder blocks at `model.model.layers`, final norm at
`model.model.norm`, head at `model.lm_head`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.config import MODEL_CONFIGS, MoEConfig, resolve_config
from models.count import ParamCount, count_closed_form, count_parameters

__all__ = [
    "MODEL_CONFIGS",
    "MoEConfig",
    "ParamCount",
    "build_model",
    "count_closed_form",
    "count_parameters",
    "resolve_config",
]


def build_model(
    name_or_config: str | Path | dict | MoEConfig = "tiny",
    *,
    vocab_size: int | None = None,
    device: Any = None,
    dtype: Any = None,
    seed: int | None = None,
    experts_backend: str = "hf",
    **overrides: Any,
):
    """Instantiate a MoE causal LM.

    Args:
        name_or_config: a name in MODEL_CONFIGS, a YAML path, a dict of MoEConfig fields or a MoEConfig.
        vocab_size: overrides the config's vocabulary (take it from the tokenizer).
        device: "meta" builds without memory (parameter counting, FSDP deferred init).
        dtype: parameter dtype (default float32).
        seed: seeds torch before initialisation so two builds are identical.
        experts_backend: "hf" (transformers' experts, any device) or "megablocks" (CUDA only,
            see models.megablocks_moe); "auto" picks megablocks when it imports.
        overrides: any other MoEConfig field.
    """
    import torch
    from transformers import AutoModelForCausalLM

    cfg = resolve_config(name_or_config, vocab_size=vocab_size, **overrides)
    if seed is not None:
        torch.manual_seed(seed)
    hf_cfg = cfg.to_hf()
    with torch.device(device) if device is not None else _null():
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype or torch.float32)
    if experts_backend not in ("hf", "megablocks", "auto"):
        raise ValueError(f"experts_backend must be 'hf', 'megablocks' or 'auto', got {experts_backend!r}")
    if experts_backend != "hf":
        from grip_loop.devices import megablocks_available

        if megablocks_available():
            from models.megablocks_moe import use_megablocks

            use_megablocks(model)
        elif experts_backend == "megablocks":
            raise ValueError("experts_backend='megablocks' needs CUDA and `pip install megablocks`; use 'hf'")
    return model


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
