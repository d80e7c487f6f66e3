"""`grip ablate`: train every sampler row (configs/ablation/*.yaml), evaluate, tabulate, plot.

Examples:
    grip ablate --rows configs/ablation --out runs/ablation
    grip ablate --rows configs/ablation --out runs/ablation-3seeds --seeds 0 1 2
    grip ablate --rows configs/ablation --out /tmp/a --only 1-random 6-grip --set trainer.max_steps=20
"""

from __future__ import annotations

import argparse

from train.helpfmt import DefaultsFormatter


def main(argv: list[str]) -> int:
    from train.cmd_eval import add_eval_arguments, eval_config
    from train.eval import EvalConfig

    d = EvalConfig()
    p = argparse.ArgumentParser(
        formatter_class=DefaultsFormatter, prog="grip ablate", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--rows", default="configs/ablation", help="folder of row YAMLs (or one YAML)")
    p.add_argument("--out", required=True, help="output folder: one sub-folder per row, results.{md,csv,png}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (each row runs once per seed)")
    p.add_argument("--only", nargs="+", default=[], help="run only these rows (file stems, e.g. 6-grip)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override applied to every row, value parsed as YAML (repeatable)",
    )
    p.add_argument("--nproc", type=int, default=1, help="processes per row (torchrun on this node)")
    add_eval_arguments(p, d)  # how each row's last checkpoint is evaluated (as `grip eval`)
    a = p.parse_args(argv)
    from train.ablate import AblateConfig, results_markdown, run

    cfg = AblateConfig(
        rows=a.rows,
        out=a.out,
        seeds=a.seeds,
        overrides=a.overrides,
        only=a.only,
        nproc=a.nproc,
        eval=eval_config(a),
    )
    results = run(cfg)
    print(results_markdown(results), end="")
    print(f"wrote {a.out}/results.md, results.csv, results.png")
    return 0
