"""megablocks dMoE experts vs transformers' experts (needs CUDA + megablocks; skipped otherwise)."""

from __future__ import annotations

import pytest
import torch

from models import MODEL_CONFIGS, build_model
from tests.devices import requires_megablocks

pytestmark = [pytest.mark.gpu, requires_megablocks]


def test_megablocks_experts_match_hf():
    from models.megablocks_moe import use_megablocks

    cfg = MODEL_CONFIGS["tiny"].replace(vocab_size=256, num_layers=2)
    ref = build_model(cfg, seed=0, dtype=torch.bfloat16).cuda().eval()
    mb = build_model(cfg, seed=0, dtype=torch.bfloat16).cuda().eval()
    assert use_megablocks(mb) == cfg.num_layers
    x = torch.randint(0, 256, (2, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        a, b = ref(input_ids=x, output_router_logits=True), mb(input_ids=x, output_router_logits=True)
    torch.testing.assert_close(b.logits.float(), a.logits.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(b.aux_loss, a.aux_loss)
    # The checkpoint keeps transformers' names and layout.
    sd_ref, sd_mb = ref.state_dict(), mb.state_dict()
    assert sd_ref.keys() == sd_mb.keys()
    for k in sd_ref:
        torch.testing.assert_close(sd_mb[k], sd_ref[k])
    mb.load_state_dict(sd_ref)
