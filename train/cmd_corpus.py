"""`grip corpus`: build the embedded default code corpus from the installed sources
(the Python standard library, CPython's C headers, C/C++ headers of installed packages)."""

from __future__ import annotations

import argparse

from train.helpfmt import DefaultsFormatter


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(formatter_class=DefaultsFormatter, prog="grip corpus", description=__doc__)
    p.add_argument("--out", required=True, help="directory to copy the files into")
    p.add_argument("--max-files", type=int, default=3000, help="number of files to copy (default 3000)")
    p.add_argument(
        "--max-bytes", type=int, default=65536, help="skip files larger than this (default 64 KiB)"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    args = p.parse_args(argv)
    if args.max_files < 1:
        p.error("--max-files must be >= 1")
    from grip_loop.default_corpus import collect

    counts = collect(args.out, max_files=args.max_files, max_bytes=args.max_bytes, seed=args.seed)
    total = sum(counts.values())
    print(f"wrote {total} files to {args.out}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0 if total else 1
