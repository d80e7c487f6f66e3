"""RAP cost: one refresh of the Rapid Adaptation Probe relative to the training between refreshes.

Default cadence (the quick start's): a refresh every 50 optimizer steps of 8 x 256 tokens, i.e.
102,400 trained tokens between refreshes; probe batches of 8 blocks x 128 tokens per cluster,
10 AdamW steps (`configs/train/cpu-tiny-grip.yaml`). For reset depth 0/1/2/4 and K clusters:

* FLOPs fraction = `RAPResult.flops / estimate_train_flops(model, 102,400)` (deterministic).
* wall fraction = probe seconds / (50 x the median wall time of a real training step of the same
  model: forward + backward + AdamW on 8 x 256 random tokens), both measured in this process.

Clusters run one after another on CPU (no vmap there), all probe batches have the same shape, so
probe time and FLOPs are linear in K: for large K x depth the probe is timed on `--max-timed`
clusters and scaled by K / timed (rows marked `extrapolated`). FLOPs are scaled the same way,
which is exact.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import emit, median, parser  # noqa: E402

CADENCE_STEPS, TRAIN_BATCH, TRAIN_SEQ = 50, 8, 256
PROBE_BLOCKS, PROBE_SEQ = 8, 128


def step_seconds(model, vocab: int, steps: int, device: str) -> float:
    """Median wall seconds of one real training step (forward, backward, AdamW)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    model.train()
    times = []
    for i in range(steps + 2):
        ids = torch.randint(1, vocab, (TRAIN_BATCH, TRAIN_SEQ), generator=g).to(device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= 2:  # first two: allocator / kernel warm-up
            times.append(time.perf_counter() - t0)
    return median(times)


def analytic_rows(name: str, vocab: int, clusters, depths, train_tokens: float, cadence: str) -> list[dict]:
    """FLOPs fraction of a refresh for a (large) config, on the meta device (no memory, no time):
    the same count as `rapid_adaptation_probe` (2 P_trunk T + (6 steps + 2) P_upper T per cluster)."""
    from grip_loop.rap import active_params, estimate_train_flops
    from models import build_model

    lm = build_model(name, vocab_size=vocab, device="meta")
    cfg = lm.config
    train = estimate_train_flops(lm, train_tokens)
    layers = lm.model.layers
    all_p = active_params(lm.model, cfg) - lm.model.embed_tokens.weight.numel()
    head = active_params(lm.lm_head, cfg)
    norm = active_params(lm.model.norm, cfg)
    tokens = PROBE_BLOCKS * PROBE_SEQ
    rows = []
    for depth in depths:
        blocks = sum(active_params(b, cfg) for b in list(layers)[len(layers) - depth :]) if depth else 0.0
        upper = head + (blocks + norm if depth else 0.0)
        trunk = all_p - (blocks + norm if depth else 0.0)
        per_cluster = 2 * trunk * tokens + (6 * 10 + 2) * upper * tokens
        for k in clusters:
            rows.append(
                {
                    "model": name,
                    "cadence": cadence,
                    "K": k,
                    "reset_depth": depth,
                    "probe_gflop": k * per_cluster / 1e9,
                    "flops_fraction": k * per_cluster / train,
                }
            )
    return rows


def main(argv=None) -> int:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="models.MODEL_CONFIGS name (or YAML) of the live model")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size (the quick start's tokenizer)")
    p.add_argument("--clusters", type=int, nargs="+", default=[16, 64, 256], help="cluster counts K")
    p.add_argument("--reset-depth", type=int, nargs="+", default=[0, 1, 2, 4], help="reset depths")
    p.add_argument("--max-timed", type=int, default=8, help="time at most this many clusters, scale to K")
    p.add_argument("--train-steps", type=int, default=8, help="timed training steps (median)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument(
        "--flops-models",
        nargs="*",
        default=["moe-8b", "moe-16b"],
        help="larger configs whose FLOPs fraction is computed on the meta device (no timing)",
    )
    p.add_argument("--flops-vocab", type=int, default=32768, help="vocabulary of the --flops-models")
    args = p.parse_args(argv)
    if args.quick:
        args.flops_models = []
        args.clusters, args.reset_depth, args.max_timed = [2], [0], 2
        args.train_steps, args.repeats = 1, 1

    from grip_loop.rap import RAPConfig, estimate_train_flops, rapid_adaptation_probe
    from models import build_model

    warnings.filterwarnings("ignore", message="There is a performance drop")
    model = build_model(args.model, vocab_size=args.vocab, seed=0, device=args.device)
    train_tokens = CADENCE_STEPS * TRAIN_BATCH * TRAIN_SEQ
    train_flops = estimate_train_flops(model, train_tokens)
    t_step = step_seconds(model, args.vocab, args.train_steps, args.device)
    t_train = CADENCE_STEPS * t_step
    g = torch.Generator().manual_seed(1)
    pool = [
        torch.randint(1, args.vocab, (PROBE_BLOCKS, PROBE_SEQ), generator=g).to(args.device)
        for _ in range(max(args.clusters))
    ]
    rows = []
    for depth in args.reset_depth:
        cfg = RAPConfig(reset_depth=depth)
        rapid_adaptation_probe(model, pool[:1], cfg)  # warm-up
        # Linear in K (same-shaped batches, one cluster after another on CPU): time each
        # distinct number of timed clusters once and scale to every K.
        cache: dict[int, tuple[float, float]] = {}
        for k in args.clusters:
            timed_k = min(k, args.max_timed)
            if timed_k not in cache:
                secs = []
                for r in range(args.repeats):
                    t0 = time.perf_counter()
                    res = rapid_adaptation_probe(model, pool[:timed_k], cfg, refresh_index=r)
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    secs.append(time.perf_counter() - t0)
                cache[timed_k] = (median(secs), res.flops)
            t_med, f_timed = cache[timed_k]
            scale = k / timed_k
            probe_s = t_med * scale
            flops = f_timed * scale
            rows.append(
                {
                    "K": k,
                    "reset_depth": depth,
                    "probe_s": probe_s,
                    "probe_gflop": flops / 1e9,
                    "flops_fraction": flops / train_flops,
                    "wall_fraction": probe_s / t_train,
                    "timed_clusters": timed_k,
                    "extrapolated": timed_k < k,
                }
            )
    big_tokens = (
        CADENCE_STEPS * 8 * 4 * 4096 * 32
    )  # configs/train/h800x8-8b.yaml: 8 GPUs x 4 x 4096 x 32 accum
    analytic = []
    for name in args.flops_models:
        for tok, label in ((train_tokens, "50 x 8x256"), (big_tokens, "50 x h800x8 batch (4.2M tok)")):
            analytic += analytic_rows(name, args.flops_vocab, args.clusters, args.reset_depth, tok, label)
    if analytic:
        from common import markdown

        print(markdown(analytic), file=sys.stderr)
    default = next((r for r in rows if r["reset_depth"] == 0 and r["K"] == 16), None)
    emit(
        "rap_cost",
        rows,
        args,
        columns=[
            "K",
            "reset_depth",
            "probe_s",
            "probe_gflop",
            "flops_fraction",
            "wall_fraction",
            "timed_clusters",
            "extrapolated",
        ],
        device=args.device,
        model=args.model,
        cadence={
            "refresh_every_steps": CADENCE_STEPS,
            "batch": TRAIN_BATCH,
            "seq_len": TRAIN_SEQ,
            "train_tokens_between_refreshes": train_tokens,
            "probe_blocks_per_cluster": PROBE_BLOCKS,
            "probe_seq_len": PROBE_SEQ,
            "probe_steps": 10,
        },
        train_step_s=t_step,
        analytic_large=analytic,
        train_gflop_between_refreshes=train_flops / 1e9,
        target={
            "default_K16_depth0_flops_fraction_le_0.005": (
                None if default is None else default["flops_fraction"] <= 0.005
            ),
            "default_K16_depth0_wall_fraction_le_0.005": (
                None if default is None else default["wall_fraction"] <= 0.005
            ),
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
