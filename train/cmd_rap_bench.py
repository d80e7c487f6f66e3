"""`grip rap-bench`: wall time and FLOP cost of one RAP refresh on one of the project's models.

Builds a randomly initialised model from `models.MODEL_CONFIGS` (default `tiny`; `moe-8b`
on a GPU; no download), draws K clusters of random token windows (`--docs` adaptation and
`--docs` evaluation windows each) and times `rapid_adaptation_probe` with the default probe
settings (median over repeats, after one warm-up). The cost fraction assumes `--train-tokens`
trained tokens between two refreshes.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

from train.helpfmt import DefaultsFormatter


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(formatter_class=DefaultsFormatter, prog="grip rap-bench", description=__doc__)
    p.add_argument("--clusters", type=int, nargs="+", default=[8, 64], help="cluster counts K to time")
    p.add_argument("--docs", type=int, default=32, help="adaptation (and evaluation) windows per cluster")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per probe window (T)")
    p.add_argument("--model", default="tiny", help="a models.MODEL_CONFIGS name or configs/model/*.yaml")
    p.add_argument("--vocab", type=int, default=512, help="vocabulary size of the model")
    p.add_argument("--reset-depth", type=int, nargs="+", default=[0, 2], help="reset depths to time")
    p.add_argument("--epochs", type=int, default=10, help="passes over the adaptation windows")
    p.add_argument("--no-vmap", action="store_true", help="probe clusters one after another")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument(
        "--train-tokens",
        type=float,
        default=1e9,
        help="trained tokens between refreshes (for the cost fraction)",
    )
    args = p.parse_args(argv)

    import torch

    from grip_loop.rap import ProbeBatch, RAPConfig, estimate_train_flops, rapid_adaptation_probe

    warnings.filterwarnings("ignore", message="There is a performance drop")
    from models import build_model

    model = build_model(args.model, vocab_size=args.vocab, device=args.device, seed=0)
    train_flops = estimate_train_flops(model, args.train_tokens)
    print(f"device={args.device} threads={torch.get_num_threads()} docs={args.docs} T={args.seq_len}")
    print(f"{'K':>4} {'depth':>5} {'vmap':>5} {'seconds':>8} {'GFLOP':>8} {'cost_frac':>10}")
    for depth in args.reset_depth:
        for k in args.clusters:
            g = torch.Generator().manual_seed(k)
            batches = [
                ProbeBatch(
                    *torch.randint(0, args.vocab, (2, args.docs, args.seq_len), generator=g).to(args.device)
                )
                for _ in range(k)
            ]
            cfg = RAPConfig(reset_depth=depth, epochs=args.epochs, min_docs=1, vmap=not args.no_vmap)
            rapid_adaptation_probe(model, batches[:2], cfg)  # warm-up
            times = []
            for r in range(args.repeats):
                t0 = time.perf_counter()
                res = rapid_adaptation_probe(model, batches, cfg, refresh_index=r)
                times.append(time.perf_counter() - t0)
            print(
                f"{k:>4} {depth:>5} {str(cfg.vmap):>5} {statistics.median(times):>8.3f} "
                f"{res.flops / 1e9:>8.2f} {res.cost_fraction(train_flops):>10.2e}"
            )
    return 0
