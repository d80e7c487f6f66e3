"""`grip eval`: held-out loss/perplexity per language, HumanEval loss and (optionally) pass@1.

Examples:
    grip eval --ckpt runs/quickstart/checkpoints/last.ckpt --data runs/quickstart/data --out runs/quickstart/eval
    grip eval --ckpt CKPT --data PREPARED --pass-at-1 --limit 20 --out DIR
"""

from __future__ import annotations

import argparse

from train.helpfmt import DefaultsFormatter


def add_eval_arguments(p: argparse.ArgumentParser, d) -> None:
    """The evaluation options `grip eval` and `grip ablate` share (defaults from EvalConfig `d`)."""
    p.add_argument(
        "--pass-at-1", action="store_true", help="greedy generation + execution of the tests (pass@1)"
    )
    p.add_argument(
        "--limit", type=int, default=d.limit, help="first N HumanEval problems for pass@1 (default all)"
    )
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="generation length limit")
    p.add_argument(
        "--seq-len", type=int, default=d.seq_len, help="scoring window in tokens (default %(default)s)"
    )
    p.add_argument(
        "--max-tokens-per-lang",
        type=int,
        default=d.max_tokens_per_lang,
        help="score at most this many held-out tokens per language (default %(default)s)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def eval_config(a: argparse.Namespace, **more):
    """EvalConfig from the options of `add_eval_arguments`, plus `more` fields."""
    from train.eval import EvalConfig

    return EvalConfig(
        seq_len=a.seq_len,
        max_tokens_per_lang=a.max_tokens_per_lang,
        pass_at_1=a.pass_at_1,
        limit=a.limit,
        max_new_tokens=a.max_new_tokens,
        progress=not a.no_progress,
        **more,
    )


def main(argv: list[str]) -> int:
    from train.eval import EvalConfig

    d = EvalConfig()
    p = argparse.ArgumentParser(
        formatter_class=DefaultsFormatter, prog="grip eval", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--ckpt", required=True, help="Lightning checkpoint (e.g. RUN/checkpoints/last.ckpt)")
    p.add_argument(
        "--data", required=True, help="the prepared corpus the model was trained on (grip prepare --out)"
    )
    p.add_argument("--out", required=True, help="output folder: eval.json, eval.md, hf/ (the exported model)")
    p.add_argument(
        "--humaneval",
        action=argparse.BooleanOptionalAction,
        default=d.humaneval,
        help="score HumanEval prompt + canonical solution (default on)",
    )
    add_eval_arguments(p, d)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="windows per forward pass")
    p.add_argument("--exec-timeout", type=float, default=d.exec_timeout, help="seconds per test program")
    p.add_argument(
        "--exec-memory-mb", type=int, default=d.exec_memory_mb, help="address-space limit per test program"
    )
    p.add_argument(
        "--exec-isolation",
        choices=("auto", "strict", "off"),
        default=d.exec_isolation,
        help="sandbox of the test programs: auto (every layer the kernel allows, warn about the rest), "
        "strict (refuse to run without all of them), off (limits only)",
    )
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda[:i]")
    a = p.parse_args(argv)
    from train.eval import evaluate, markdown_table

    cfg = eval_config(
        a,
        batch_size=a.batch_size,
        humaneval=a.humaneval,
        exec_timeout=a.exec_timeout,
        exec_memory_mb=a.exec_memory_mb,
        exec_isolation=a.exec_isolation,
        device=a.device,
    )
    r = evaluate(a.ckpt, a.data, a.out, cfg)
    print(markdown_table(r), end="")
    print(f"wrote {a.out}/eval.json and {a.out}/eval.md ({r['seconds']} s)")
    return 0
