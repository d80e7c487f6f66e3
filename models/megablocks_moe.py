"""Optional megablocks dMoE backend for the routed experts (CUDA only).

What is swapped: only the expert computation (`layer.mlp.experts`) of each MoE block. The HF
router (`layer.mlp.gate`) stays, so routing, the router logits that transformers records and the
load-balancing aux loss are unchanged; megablocks' dropless grouped GEMM (`mlp_impl="grouped"`)
replaces transformers' per-expert loop. Checkpoints stay Hugging Face compatible: state_dict hooks
present the weights under transformers' names and layout (`gate_up_proj` (E, 2I, d),
`down_proj` (E, d, I)) and convert back on load.

Cost: weights live in megablocks' layout (w1, v1, w2: (E*I, d)), so a state_dict call copies
them (once per checkpoint). Expert parallelism is off (every rank holds all experts / FSDP shards
them). Parity with transformers' experts is tested in tests/models/test_megablocks.py (gpu).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _megablocks_mlp(num_experts: int, hidden: int, ffn: int, top_k: int, norm_topk: bool, dtype, device):
    import torch.nn.functional as F
    from megablocks.layers.arguments import Arguments
    from megablocks.layers.dmoe import ParallelDroplessMLP

    args = Arguments(
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        moe_num_experts=num_experts,
        moe_top_k=top_k,
        mlp_type="glu",
        mlp_impl="grouped",
        activation_fn=F.silu,
        moe_normalize_expert_weights=1 if norm_topk else None,
        moe_loss_weight=0.0,  # the HF router's aux loss is used instead
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        device=device,
        return_bias=False,
        bias=False,
    )
    return ParallelDroplessMLP(args)


class MegablocksExperts(nn.Module):
    """Drop-in for transformers' `*MoeExperts`: forward(hidden, top_k_index, top_k_weights)."""

    def __init__(self, hf_experts: nn.Module, top_k: int, norm_topk: bool) -> None:
        super().__init__()
        gate_up, down = hf_experts.gate_up_proj, hf_experts.down_proj
        e, two_i, d = gate_up.shape
        self.num_experts, self.intermediate_dim, self.hidden_dim = e, two_i // 2, d
        self.mlp = _megablocks_mlp(e, d, two_i // 2, top_k, norm_topk, gate_up.dtype, gate_up.device)
        with torch.no_grad():
            self._load_hf(gate_up, down)
        self._register_state_dict_hook(_to_hf_hook)
        self._register_load_state_dict_pre_hook(_from_hf_hook, with_module=True)

    def _load_hf(self, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        i, d = self.intermediate_dim, self.hidden_dim
        w = self.mlp.mlp
        w.w1.copy_(gate_up[:, :i, :].reshape(-1, d))
        w.v1.copy_(gate_up[:, i:, :].reshape(-1, d))
        w.w2.copy_(down.transpose(1, 2).reshape(-1, d))

    def hf_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up_proj, down_proj) in transformers' layout."""
        e, i, d = self.num_experts, self.intermediate_dim, self.hidden_dim
        w = self.mlp.mlp
        gate_up = torch.cat([w.w1.view(e, i, d), w.v1.view(e, i, d)], dim=1)
        down = w.w2.view(e, i, d).transpose(1, 2)
        return gate_up, down

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        x = hidden_states.unsqueeze(0)  # megablocks expects (seq, batch, hidden); any leading dims work
        weights = top_k_weights.to(hidden_states.dtype)
        out = self.mlp(x, weights, weights.reshape(-1), top_k_index.reshape(-1))
        out = out[0] if isinstance(out, tuple) else out
        return out.view_as(hidden_states)


def _to_hf_hook(module: MegablocksExperts, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state if k.startswith(prefix + "mlp.")]:
        del state[key]
    gate_up, down = module.hf_weights()
    state[prefix + "gate_up_proj"] = gate_up.detach().contiguous()
    state[prefix + "down_proj"] = down.detach().contiguous()


def _from_hf_hook(module: MegablocksExperts, state: dict[str, Any], prefix: str, *args: Any) -> None:
    if prefix + "gate_up_proj" in state:
        gate_up = state.pop(prefix + "gate_up_proj")
        down = state.pop(prefix + "down_proj")
        with torch.no_grad():
            module._load_hf(gate_up.to(module.mlp.mlp.w1.device), down.to(module.mlp.mlp.w1.device))
        for name, p in module.mlp.named_parameters():
            state[prefix + "mlp." + name] = p.detach().clone()


def use_megablocks(model: nn.Module) -> int:
    """Swap every MoE block's experts for megablocks' in place; returns how many were swapped."""
    cfg = model.config
    swapped = 0
    for layer in model.model.layers:
        block = layer.mlp
        if hasattr(block, "experts") and hasattr(block, "gate"):
            block.experts = MegablocksExperts(block.experts, cfg.num_experts_per_tok, cfg.norm_topk_prob)
            swapped += 1
    return swapped
