"""Distributed strategies by model size: DDP for small models, FSDP for 8B/16B.

`MoEFSDPStrategy` is Lightning's FSDPStrategy with the wrap policy fixed to the decoder block
classes of the HF MoE models, so a YAML config only names the class (jsonargparse cannot
express a set of classes). Each decoder layer (attention + all its experts) becomes one FSDP unit:
for moe-16b that is ~650M parameters per unit, gathered one layer at a time. Expert parallelism is
not used (every rank holds a shard of every expert); that is the cost of staying on plain FSDP.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import FSDPStrategy


def decoder_layer_classes() -> set[type]:
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeDecoderLayer
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeDecoderLayer

    return {Qwen3MoeDecoderLayer, Qwen2MoeDecoderLayer}


class MoEFSDPStrategy(FSDPStrategy):
    """FSDP wrapping every MoE decoder layer. Other arguments go to Lightning's FSDPStrategy.

    Args:
        sharding_strategy: "FULL_SHARD" (ZeRO-3), "SHARD_GRAD_OP" (ZeRO-2), "HYBRID_SHARD".
        state_dict_type: "sharded" (fast, one file per rank) or "full" (rank 0 gathers).
    """

    def __init__(
        self, sharding_strategy: str = "FULL_SHARD", state_dict_type: str = "sharded", **kwargs: Any
    ) -> None:
        super().__init__(
            auto_wrap_policy=decoder_layer_classes(),
            sharding_strategy=sharding_strategy,
            state_dict_type=state_dict_type,
            use_orig_params=True,
            **kwargs,
        )
