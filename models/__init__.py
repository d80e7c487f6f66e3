"""Fine-grained MoE decoder LMs (tiny for CPU, 8B/32 experts and 16B/64 experts)."""
