"""The `grip` command line.

One subcommand per stage. Each lives in its own module under `train/` exposing
`main(argv: list[str]) -> int`; the table below maps the name to that module and a
one-line help. Modules are imported only when their subcommand runs, so `grip --help`
stays instant even though the stages pull in torch, faiss and transformers.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module with `main(argv) -> int`, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "env": ("train.cmd_env", "print versions and which optional GPU paths (faiss-gpu, megablocks) work"),
    "corpus": ("train.cmd_corpus", "copy the embedded default code corpus (installed sources) into a folder"),
    "prepare": (
        "train.cmd_prepare",
        "corpus -> tokenizer, embeddings, clusters, probe, quality, ordered shards",
    ),
    "inspect": (
        "train.cmd_inspect",
        "print a prepared corpus's manifest as a table and plot the length pathology",
    ),
    "probe": (
        "train.cmd_probe",
        "one Rapid Adaptation Probe refresh of a checkpoint on a prepared corpus: table and JSON",
    ),
    "attribute": (
        "train.cmd_attribute",
        "GRASP attribution: predicted utility (with LCB) of cluster budgets for a target set",
    ),
    "testbed": (
        "train.cmd_testbed",
        "write the controlled learnability testbed (a JSONL corpus with a known cluster ranking)",
    ),
    "rap-bench": (
        "train.cmd_rap_bench",
        "time one Rapid Adaptation Probe refresh on a tiny MoE (K clusters)",
    ),
    "export-hf": ("train.cmd_export", "convert a Lightning checkpoint to a Hugging Face model folder"),
    "eval": (
        "train.cmd_eval",
        "held-out loss/perplexity per language, HumanEval loss and pass@1 of a checkpoint",
    ),
    "ablate": (
        "train.cmd_ablate",
        "train and evaluate every sampler row of configs/ablation; results.md/.csv and a bar chart",
    ),
    "ledger": (
        "train.cmd_ledger",
        "a run's data ledger: documents and tokens read per cluster, repetition, and each budget decision",
    ),
    "simulate": (
        "train.cmd_simulate",
        "replay the budget rule offline (a recorded run or a synthetic probe): trajectories, sweeps",
    ),
    "train": (
        "train.cmd_train",
        "train a MoE LM with Lightning (LightningCLI: --config configs/train/*.yaml)",
    ),
}


def _parser() -> argparse.ArgumentParser:
    width = max(len(n) for n in COMMANDS)
    listing = "\n".join(f"  {n:<{width}}  {h}" for n, (_, h) in COMMANDS.items())
    p = argparse.ArgumentParser(
        prog="grip",
        description="GRIP closed-loop data sampler for LLM pretraining.",
        epilog=f"commands:\n{listing}\n\nRun `grip COMMAND --help` for the options of one command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND", help="one of the commands below")
    p.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return p


def user_error(exc: BaseException) -> bool:
    """Errors a user fixes by changing an argument, a config field or an input file: the project
    raises ValueError (ManifestError is one) or FileNotFoundError naming the field/file and the fix."""
    return isinstance(exc, (ValueError, FileNotFoundError, NotADirectoryError))


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user-fixable error (see `user_error`) prints one line,
    `grip COMMAND: error: ...`, and exits 2; GRIP_TRACEBACK=1 shows the traceback instead."""
    import os

    argv = sys.argv[1:] if argv is None else list(argv)
    ns = _parser().parse_args(argv[:1] if argv and not argv[0].startswith("-") else argv)
    module = importlib.import_module(COMMANDS[ns.command][0])
    try:
        return int(module.main(argv[1:]) or 0)
    except Exception as exc:
        if not user_error(exc) or os.environ.get("GRIP_TRACEBACK"):
            raise
        msg = " ".join(str(exc).split()) if "\n" not in str(exc).strip() else str(exc).strip()
        print(f"grip {ns.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
