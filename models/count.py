"""Total and active parameter counts, from the instantiated model and from a closed form.

Counting rule (stated once, used everywhere, tested both ways):
    total  = every distinct parameter tensor (tied embeddings counted once);
    active = total - routed experts + top_k / num_experts * routed experts,
i.e. embeddings + attention + norms + routers + the top-k routed experts + shared experts +
shared-expert gate + head. Embeddings count as active (most MoE papers, DeepSeek-V2 included,
do); the MFU estimate uses the same `active` (it overstates FLOPs by the embedding lookup,
2 * vocab * hidden per token, under 10% for the named sizes; see docs/models.md).

`python -m models.count moe-8b` builds on the meta device (no memory) and prints both counts.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from models.config import MODEL_CONFIGS, MoEConfig, resolve_config

# Parameter-name fragments of the routed experts in transformers' MoE classes (3D fused tensors),
# and of the megablocks backend's copies.
_ROUTED = (".mlp.experts.",)


@dataclass(frozen=True)
class ParamCount:
    total: int
    active: int
    routed: int
    """Parameters of all routed experts (the part of which only top_k / num_experts runs)."""

    def __str__(self) -> str:
        return (
            f"total {self.total / 1e9:.3f}B  active {self.active / 1e9:.3f}B  routed {self.routed / 1e9:.3f}B"
        )


def count_parameters(model, cfg: MoEConfig) -> ParamCount:
    """Count from the module tree (works on the meta device)."""
    total = routed = 0
    for name, p in model.named_parameters():  # named_parameters skips tied duplicates
        n = p.numel()
        total += n
        if any(frag in f".{name}" for frag in _ROUTED):
            routed += n
    # Each routed tensor holds num_experts equal slices; a token touches top_k of them.
    active = total - routed + routed * cfg.top_k // cfg.num_experts
    return ParamCount(total=total, active=active, routed=routed)


def count_closed_form(cfg: MoEConfig) -> ParamCount:
    """The same counts from the config alone (no bias anywhere; RMSNorm has one weight vector)."""
    d, hd = cfg.hidden_size, cfg.head_dim
    attn = d * cfg.num_heads * hd * 2 + d * cfg.num_kv_heads * hd * 2  # q, o + k, v
    if cfg.arch == "qwen3_moe":
        attn += 2 * hd  # per-head q_norm / k_norm
    norms = 2 * d
    router = cfg.num_experts * d
    shared = 3 * d * cfg.shared_expert_size + d if cfg.shared_expert_size else 0  # MLP + sigmoid gate
    routed_layer = 3 * d * cfg.expert_size * cfg.num_experts
    embed = cfg.vocab_size * d * (1 if cfg.tie_word_embeddings else 2) + d  # + final norm
    fixed = embed + cfg.num_layers * (attn + norms + router + shared)
    routed = cfg.num_layers * routed_layer
    return ParamCount(
        total=fixed + routed,
        active=fixed + routed * cfg.top_k // cfg.num_experts,
        routed=routed,
    )


def count_meta(name_or_config, **overrides) -> ParamCount:
    """Build on the meta device and count (no memory, a second or two for 16B)."""
    from models import build_model

    cfg = resolve_config(name_or_config, **overrides)
    return count_parameters(build_model(cfg, device="meta"), cfg)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.count", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help=f"one of {sorted(MODEL_CONFIGS)} or a configs/model/*.yaml path")
    p.add_argument("--vocab-size", type=int, default=None, help="override the config's vocabulary size")
    args = p.parse_args(argv)
    cfg = resolve_config(args.model, vocab_size=args.vocab_size)
    meta = count_meta(cfg)
    closed = count_closed_form(cfg)
    print(f"model   {args.model} ({cfg.arch}, {cfg.num_experts} experts, top-{cfg.top_k})")
    print(f"total   {meta.total:,} ({meta.total / 1e9:.3f}B)")
    print(f"active  {meta.active:,} ({meta.active / 1e9:.3f}B)")
    print(f"routed  {meta.routed:,}")
    if (meta.total, meta.active) != (closed.total, closed.active):
        print(f"WARNING closed form disagrees: {closed}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
