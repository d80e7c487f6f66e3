"""The probe's model parts: the freshly initialised trainable "upper part" (last blocks, final
norm, LM head) and the frozen trunk's features it trains on, with transformers' causal mask
(`grip_loop.rap`)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from grip_loop.rap_config import IGNORE
from grip_loop.rap_cost import _local

# ----------------------------------------------------------------------------- the upper part


class _Upper(nn.Module):
    """The trainable copy: last blocks (maybe none), final norm (maybe none), LM head."""

    def __init__(self, blocks: list[nn.Module], norm: nn.Module | None, head: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm
        self.head = head

    def forward(self, h, position_embeddings, mask, position_ids):
        return self.head(self.features(h, position_embeddings, mask, position_ids))

    def features(self, h, position_embeddings, mask, position_ids):
        """The head's input: the reset blocks and the final norm applied to `h`."""
        for block in self.blocks:
            h = block(
                h,
                attention_mask=mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
            )
            if isinstance(h, tuple):  # older transformers return (hidden, ...)
                h = h[0]
        if self.norm is not None:
            h = self.norm(h)
        return h


def _seed_for(seed: int, refresh_index: int) -> int:
    return int(np.random.SeedSequence([seed, refresh_index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _reset_(upper: nn.Module, std: float, seed: int) -> None:
    """Draw theta_init into `upper` in place, from a CPU generator (device-independent)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    norm_params = {
        id(p) for m in upper.modules() if "norm" in type(m).__name__.lower() for p in m.parameters(False)
    }
    with torch.no_grad():
        for name, p in sorted(upper.named_parameters(), key=lambda kv: kv[0]):
            if id(p) in norm_params:
                value = torch.ones(p.shape) if name.endswith("weight") else torch.zeros(p.shape)
            elif name.endswith("bias"):
                value = torch.zeros(p.shape)
            else:
                value = torch.randn(p.shape, generator=gen) * std
            p.copy_(value.to(p.dtype))


def _build_upper(lm: nn.Module, depth: int, seed: int) -> _Upper:
    layers = lm.model.layers
    blocks = list(layers[len(layers) - depth :]) if depth else []
    norm = lm.model.norm if depth else None
    # One deepcopy call so all copied modules share one copied config (needed to switch the
    # copy's experts kernel without touching the live config).
    blocks, norm, head = copy.deepcopy((blocks, norm, lm.lm_head))
    upper = _Upper(blocks, norm, head)
    for m in upper.modules():  # training hooks / output recorders of the live model
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
        m._backward_hooks.clear()
    for name, p in list(upper.named_parameters()):
        full = _local(p.detach())
        owner = upper.get_submodule(name.rsplit(".", 1)[0]) if "." in name else upper
        setattr(owner, name.rsplit(".", 1)[-1], nn.Parameter(full.float().clone(), requires_grad=False))
    upper.eval()
    # The copy's own config (deepcopied with the blocks), so kernels can be switched for vmap.
    upper.config = next((m.config for m in upper.blocks.modules() if hasattr(m, "config")), None)
    _reset_(upper, float(getattr(lm.config, "initializer_range", 0.02)), seed)
    return upper


@contextlib.contextmanager
def _vmap_kernels(upper: _Upper) -> Iterator[None]:
    """Switch the copy to the only HF kernels vmap can batch: eager attention, batched_mm experts.

    (sdpa has no CPU batching rule and the grouped/eager experts loop over data-dependent
    expert sets.) Only the copy's config changes; the live model's config is a different object.
    """
    cfg = upper.config
    if cfg is None:
        yield
        return
    saved = (cfg._attn_implementation, getattr(cfg, "_experts_implementation", None))
    cfg._attn_implementation = "eager"
    if saved[1] is not None:
        cfg._experts_implementation = "batched_mm"
    try:
        yield
    finally:
        cfg._attn_implementation = saved[0]
        if saved[1] is not None:
            cfg._experts_implementation = saved[1]


# ----------------------------------------------------------------------------- trunk features


def causal_mask(config, inputs_embeds: torch.Tensor, position_ids: torch.Tensor):
    """transformers' causal mask for `config`'s attention kernel (None where the kernel is causal
    by itself). The cache argument was renamed (`past_key_values` -> `cache`) in transformers 5."""
    import inspect

    from transformers.masking_utils import create_causal_mask

    cache_arg = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
    return create_causal_mask(
        config=config,
        inputs_embeds=inputs_embeds,
        attention_mask=None,
        position_ids=position_ids,
        **{cache_arg: None},
    )


@dataclass
class _Features:
    h: torch.Tensor  # [n, T, d] float32, input to the upper part
    targets: torch.Tensor  # [n, T-1] long, IGNORE at pads
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    mask: torch.Tensor | None
    position_ids: torch.Tensor
    tokens: int  # counted target tokens


@torch.no_grad()
def _trunk(lm: nn.Module, ids: torch.Tensor, depth: int, pad_id: int | None) -> _Features:
    """Run the frozen lower part once; live modules are put in eval mode and restored."""
    inner = lm.model
    n_layers = len(inner.layers)
    lower = list(inner.layers[: n_layers - depth])
    modules = [inner.embed_tokens, *lower] + ([inner.norm] if depth == 0 else [])
    flags = [(m, m.training) for mod in modules for m in mod.modules()]
    try:
        for m, _ in flags:
            m.training = False
        h = inner.embed_tokens(ids)
        position_ids = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        pos_emb = inner.rotary_emb(h, position_ids) if hasattr(inner, "rotary_emb") else None
        mask = causal_mask(lm.config, h, position_ids)
        for block in lower:
            h = block(h, attention_mask=mask, position_ids=position_ids, position_embeddings=pos_emb)
            if isinstance(h, tuple):
                h = h[0]
        if depth == 0:
            h = inner.norm(h)
    finally:
        for m, flag in flags:
            m.training = flag
    targets = ids[:, 1:].clone()
    if pad_id is not None:
        targets[targets == pad_id] = IGNORE
    pos_emb = tuple(t.float() for t in pos_emb) if pos_emb is not None else None
    mask = mask if mask is None or mask.dtype == torch.bool else mask.float()
    return _Features(h.float(), targets, pos_emb, mask, position_ids, int((targets != IGNORE).sum()))
