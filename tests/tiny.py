"""The one tiny MoE the Lightning tests train: `MoELM(model="tiny", model_overrides=TINY)`.

Two layers of width 32, four experts (top 2): a CPU step takes milliseconds, and it still routes.
"""

TINY = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, num_experts=4, top_k=2)
