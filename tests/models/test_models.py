"""Model registry, parameter counts (meta device vs closed form), HF round trip, routing."""

from __future__ import annotations

import pytest
import torch
import yaml

from models import MODEL_CONFIGS, MoEConfig, build_model, count_closed_form, count_parameters
from models.config import resolve_config
from models.count import count_meta
from models.count import main as count_main


def small(**kw) -> MoEConfig:
    return MODEL_CONFIGS["tiny"].replace(vocab_size=256, num_layers=2, **kw)


@pytest.mark.parametrize(
    "name, total, active",
    [("moe-8b", 8e9, 1.4e9), ("moe-16b", 16e9, 1.4e9)],
)
def test_big_configs_within_bounds(name, total, active):
    cfg = MODEL_CONFIGS[name]
    meta = count_meta(name)
    assert abs(meta.total / total - 1) <= 0.03, meta
    assert abs(meta.active / active - 1) <= 0.05, meta
    assert meta == count_closed_form(cfg)
    assert cfg.num_experts == {"moe-8b": 32, "moe-16b": 64}[name]


@pytest.mark.parametrize(
    "changes",
    [{}, {"shared_expert_size": 96}, {"tie_word_embeddings": True}, {"num_experts": 16, "top_k": 4}],
)
def test_counting_rule_matches_closed_form_and_naive_sum(changes):
    cfg = small(**changes)
    model = build_model(cfg, device="meta")
    meta = count_parameters(model, cfg)
    assert meta == count_closed_form(cfg)
    # Naive reference: per-module sums, experts scaled by top_k / num_experts.
    naive_total = sum(p.numel() for p in model.parameters())
    experts = sum(
        p.numel()
        for n, p in model.named_parameters()
        if ".experts.gate_up_proj" in n or ".experts.down_proj" in n
    )
    assert meta.total == naive_total
    assert meta.active == naive_total - experts + experts * cfg.top_k // cfg.num_experts
    assert meta.routed == experts


def test_shared_experts_switch_to_qwen2_moe():
    model = build_model(small(shared_expert_size=96), device="meta")
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    assert model.model.layers[0].mlp.shared_expert.gate_proj.out_features == 96
    assert type(build_model(small(), device="meta")).__name__ == "Qwen3MoeForCausalLM"


def test_interface_layout():
    model = build_model("tiny", vocab_size=300, device="meta")
    assert model.config.vocab_size == 300
    assert len(model.model.layers) == MODEL_CONFIGS["tiny"].num_layers
    assert model.model.norm.weight.shape == (128,)
    assert model.lm_head.out_features == 300


def test_yaml_mirrors_registry():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs" / "model"
    for name, cfg in MODEL_CONFIGS.items():
        path = root / f"{name}.yaml"
        assert MoEConfig.from_yaml(path) == cfg, path
        assert resolve_config(f"configs/model/{name}.yaml") == cfg
    assert sorted(p.stem for p in root.glob("*.yaml")) == sorted(MODEL_CONFIGS)


def test_config_validation_names_field(tmp_path):
    with pytest.raises(ValueError, match="num_kv_heads"):
        MoEConfig(num_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig(num_experts=4, top_k=5)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"hidden": 3}))
    with pytest.raises(ValueError, match="unknown MoEConfig field"):
        resolve_config(str(bad))
    with pytest.raises(ValueError, match="unknown model"):
        resolve_config("moe-9000b")


def test_seeded_build_is_deterministic_and_hf_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    a = build_model(small(), seed=3)
    b = build_model(small(), seed=3)
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), na
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    a.eval()
    a.save_pretrained(tmp_path / "hf")
    c = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=x).logits, c(input_ids=x).logits)


def test_routing_uses_top_k_experts_and_aux_loss_is_balanced_at_uniform():
    cfg = small()
    model = build_model(cfg, seed=0).eval()
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(input_ids=x, output_router_logits=True)
    assert len(out.router_logits) == cfg.num_layers
    assert out.router_logits[0].shape == (2 * 32, cfg.num_experts)
    # Switch aux loss is num_experts * sum_e f_e P_e >= ~1; equals top_k at perfect balance.
    assert out.aux_loss.item() >= 0.5 * cfg.top_k
    # Reference for one MoE block: dense loop over tokens with the same router.
    block = model.model.layers[0].mlp
    h = torch.randn(5, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fast = block(h[None])[0]
        probs = torch.softmax(h @ block.gate.weight.T, -1)
        w, idx = probs.topk(cfg.top_k, -1)
        w = w / w.sum(-1, keepdim=True)
        ref = torch.zeros_like(h)
        for t in range(5):
            for j in range(cfg.top_k):
                e = idx[t, j]
                gate, up = (block.experts.gate_up_proj[e] @ h[t]).chunk(2)
                ref[t] += w[t, j] * (block.experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)


def test_count_cli(capsys):
    assert count_main(["moe-8b"]) == 0
    out = capsys.readouterr().out
    expected = count_closed_form(MODEL_CONFIGS["moe-8b"])
    assert f"total   {expected.total:,}" in out
    assert f"active  {expected.active:,}" in out
