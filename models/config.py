"""Model configs: one dataclass for every fine-grained MoE size, mapped onto transformers' classes.

Design choice: the model *is* a Hugging Face `PreTrainedModel` (Qwen3-MoE, or Qwen2-MoE when
shared experts are asked for), so `save_pretrained` output loads in vLLM and eval harnesses with
no conversion. The cost: we inherit transformers' layer layout (expert weights fused as 3D
tensors, softmax-then-top-k routing, no DeepSeek-V2 MLA attention) and cannot add features the
HF class does not have without breaking that compatibility.

Why Qwen2-MoE for shared experts: Qwen3-MoE has none; Qwen2-MoE has one always-on shared MLP
(DeepSeek-V2's "shared experts", merged into one wide MLP) behind a sigmoid gate.

Sizes of the named configs (vocab 32768, closed form in `models.count`):

    name      layers  d     heads/kv  experts  top-k  expert ffn  total     active
    tiny      4       128   4/2       8        2      128         3.87M     2.69M   (vocab 8192)
    moe-8b    24      2048  16/8      32       4      1600        7.99B     1.38B
    moe-16b   24      2048  16/8      64       4      1664        16.14B    1.42B

The two large configs share everything but the expert count and width: 8B -> 16B doubles the
experts while top-4 keeps ~1.4B active (the paper: "increasing the total expert capacity while
keeping the number of activated parameters per token fixed").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class MoEConfig:
    """A fine-grained MoE decoder LM. Field names are ours; `to_hf()` maps them to transformers'."""

    vocab_size: int = 32768
    """Tokenizer size. Embedding and head rows; counts in the table above assume 32768."""
    hidden_size: int = 2048
    num_layers: int = 24
    num_heads: int = 16
    num_kv_heads: int = 8
    """Grouped-query attention: key/value heads shared by num_heads / num_kv_heads query heads."""
    head_dim: int = 128
    num_experts: int = 32
    top_k: int = 4
    """Routed experts per token."""
    expert_size: int = 1600
    """Intermediate (ffn) width of one routed expert (SwiGLU: 3 * hidden * expert_size weights)."""
    shared_expert_size: int = 0
    """Width of the always-on shared expert MLP; > 0 switches to Qwen2-MoE (DeepSeek-V2 style)."""
    norm_topk_prob: bool = True
    """Renormalise the top-k routing weights to sum to 1 (DeepSeek-V2 / Qwen3 release setting)."""
    router_aux_loss_coef: float = 0.01
    """Weight of the Switch-style load-balancing loss added to the next-token loss."""
    max_position_embeddings: int = 4096
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    eos_token_id: int = 0
    pad_token_id: int | None = None
    hf_overrides: dict[str, Any] = field(default_factory=dict)
    """Extra transformers config fields (e.g. {"_attn_implementation": "sdpa"}); applied last."""

    def __post_init__(self) -> None:
        positive = (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "num_experts",
            "top_k",
            "expert_size",
            "max_position_embeddings",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"MoEConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"MoEConfig.num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}"
            )
        if self.top_k > self.num_experts:
            raise ValueError(f"MoEConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.shared_expert_size < 0:
            raise ValueError(f"MoEConfig.shared_expert_size must be >= 0, got {self.shared_expert_size}")
        if self.router_aux_loss_coef < 0:
            raise ValueError(f"MoEConfig.router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")
        if not 0 <= self.eos_token_id < self.vocab_size:
            raise ValueError(f"MoEConfig.eos_token_id={self.eos_token_id} outside [0, vocab_size)")

    @property
    def arch(self) -> str:
        """transformers model_type this config builds."""
        return "qwen2_moe" if self.shared_expert_size > 0 else "qwen3_moe"

    def replace(self, **changes: Any) -> MoEConfig:
        return dataclasses.replace(self, **changes)

    def to_hf(self):
        """The transformers config (Qwen3MoeConfig or Qwen2MoeConfig) for this model."""
        common = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            num_experts=self.num_experts,
            num_experts_per_tok=self.top_k,
            moe_intermediate_size=self.expert_size,
            # Only used by dense layers; every layer is sparse here (decoder_sparse_step=1).
            intermediate_size=self.expert_size * self.top_k,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=self.norm_topk_prob,
            router_aux_loss_coef=self.router_aux_loss_coef,
            output_router_logits=True,
            max_position_embeddings=self.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            rms_norm_eps=self.rms_norm_eps,
            initializer_range=self.initializer_range,
            tie_word_embeddings=self.tie_word_embeddings,
            eos_token_id=self.eos_token_id,
            bos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            use_cache=False,
        )
        if self.arch == "qwen2_moe":
            from transformers import Qwen2MoeConfig

            cfg = Qwen2MoeConfig(
                **common, shared_expert_intermediate_size=self.shared_expert_size, qkv_bias=False
            )
        else:
            from transformers import Qwen3MoeConfig

            cfg = Qwen3MoeConfig(**common, attention_bias=False)
        for key, value in self.hf_overrides.items():
            setattr(cfg, key, value)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> MoEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown MoEConfig field(s) {unknown}; valid fields: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> MoEConfig:
        import yaml

        path = Path(path)
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of MoEConfig fields, got {type(data).__name__}")
        return cls.from_dict(data, source=str(path))


_REPO_ROOT = Path(__file__).resolve().parent.parent

# The registry of named sizes. configs/model/<name>.yaml mirror these (a test keeps them equal).
MODEL_CONFIGS: dict[str, MoEConfig] = {
    "tiny": MoEConfig(
        vocab_size=8192,
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        num_experts=8,
        top_k=2,
        expert_size=128,
        max_position_embeddings=1024,
        rope_theta=10_000.0,
    ),
    "moe-8b": MoEConfig(num_experts=32, top_k=4, expert_size=1600),
    "moe-16b": MoEConfig(num_experts=64, top_k=4, expert_size=1664),
}


def resolve_config(name_or_config: str | Path | dict | MoEConfig, **overrides: Any) -> MoEConfig:
    """A registry name, a YAML path, a dict of fields or a MoEConfig -> MoEConfig (+ overrides).

    Overrides whose value is None are ignored, so callers can pass `vocab_size=None` through.
    """
    if isinstance(name_or_config, MoEConfig):
        cfg = name_or_config
    elif isinstance(name_or_config, dict):
        cfg = MoEConfig.from_dict(name_or_config)
    elif isinstance(name_or_config, str | Path) and str(name_or_config) in MODEL_CONFIGS:
        cfg = MODEL_CONFIGS[str(name_or_config)]
    elif isinstance(name_or_config, str | Path) and str(name_or_config).endswith((".yaml", ".yml")):
        path = Path(name_or_config)
        # Relative paths resolve against the working directory first, then the repository root,
        # so `model: configs/model/tiny.yaml` works from anywhere.
        if not path.is_file() and not path.is_absolute() and (_REPO_ROOT / path).is_file():
            path = _REPO_ROOT / path
        if not path.is_file():
            raise ValueError(f"model config file {name_or_config} does not exist (nor under {_REPO_ROOT})")
        cfg = MoEConfig.from_yaml(path)
    else:
        raise ValueError(
            f"unknown model {name_or_config!r}: use one of {sorted(MODEL_CONFIGS)}, a .yaml path, "
            "a dict of MoEConfig fields or a MoEConfig"
        )
    changes = {k: v for k, v in overrides.items() if v is not None}
    return cfg.replace(**changes) if changes else cfg
