"""`grip testbed --out DIR`: the controlled learnability testbed (`grip_loop.testbed`).

Writes DIR/corpus.jsonl (one `group` per cluster: repeated code, real code, code with 10/30/60%
of its identifier, string and comment characters randomised, random characters) and
DIR/truth.json (the true learnability rank of each group), from the installed Python standard
library. Then prepare it with one cluster per group and train/probe on it:

    grip prepare --corpus DIR/corpus.jsonl --out DIR/data --config configs/prepare/testbed.yaml
    python benchmarks/probe_quality.py --testbed DIR      # Spearman vs truth, reliability, budgets
"""

from __future__ import annotations

import argparse

from train.helpfmt import RawDefaultsFormatter


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="grip testbed", description=__doc__, formatter_class=RawDefaultsFormatter
    )
    p.add_argument("--out", required=True, help="output folder (corpus.jsonl, truth.json)")
    p.add_argument("--docs-per-group", type=int, default=160, help="documents per group (default: 160)")
    p.add_argument("--doc-chars", type=int, default=1500, help="about this many characters per document")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    from grip_loop.testbed import build_testbed

    try:
        truth = build_testbed(a.out, docs_per_group=a.docs_per_group, doc_chars=a.doc_chars, seed=a.seed)
    except ValueError as exc:
        p.error(str(exc))
    ranks = ", ".join(f"{g} ({r})" for g, r in sorted(truth["rank"].items(), key=lambda kv: kv[1]))
    print(f"wrote {a.out}/corpus.jsonl and truth.json: groups by true learnability rank: {ranks}")
    print(
        f"next: grip prepare --corpus {a.out}/corpus.jsonl --out {a.out}/data --config configs/prepare/testbed.yaml"
    )
    return 0
