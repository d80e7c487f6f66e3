"""`grip probe`: one Rapid Adaptation Probe refresh offline, for diagnosis and tuning.

    grip probe --ckpt CKPT --data DIR [--json OUT] [--set rap.FIELD=VALUE ...] [--set budget.FIELD=VALUE ...]

CKPT is a Lightning checkpoint of `train.module.MoELM` (e.g. runs/quickstart/checkpoints/last.ckpt)
or a Hugging Face causal-LM folder (`grip export-hf`, a proxy). DIR is a corpus prepared by
`grip prepare`. Prints one row per cluster (name, size, Q_k, L_init, L_base, L_final, Delta L,
relative drop, r_k, n_k and the budget share before -> after this probe) and the probe's
split-half reliability; `--json` writes the same (schema in `grip_loop.probe_report`).
"before" is the mode's budget with neutral replay (Eq. 5); "after" is Eq. 7/8 with this probe,
shrunk by its reliability as the training callback would.

`--set` changes one field of the probe (`grip_loop.rap.RAPConfig`: eval_split, baseline, epochs,
steps, micro_batch, lr, reset_depth, metric, ...) or of the budget rule
(`grip_loop.modes.BudgetConfig`: alpha, quality_threshold, b_total, ...); values are YAML
(`--set rap.lr=3e-4 --set rap.eval_split=none`). The paper's literal protocol:
`--set rap.eval_split=none --set rap.baseline=init --set rap.steps=10 --set rap.micro_batch=null
--set rap.lr=3e-4 --set rap.min_docs=1`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from train.helpfmt import RawDefaultsFormatter


def parse_sets(items: list[str]) -> dict[str, dict]:
    """`["rap.lr=1e-3", "budget.alpha=1"]` -> {"rap": {"lr": 0.001}, "budget": {"alpha": 1}}."""
    from grip_loop.modes import BudgetConfig
    from grip_loop.rap import RAPConfig
    from train.overrides import parse_value

    known = {"rap": RAPConfig, "budget": BudgetConfig}
    out: dict[str, dict] = {"rap": {}, "budget": {}}
    for item in items:
        key, sep, raw = item.partition("=")
        group, _, name = key.partition(".")
        if not sep or group not in known or not name:
            raise ValueError(f"--set {item!r}: expected rap.FIELD=VALUE or budget.FIELD=VALUE")
        fields = {f.name for f in dataclasses.fields(known[group])}
        if name not in fields:
            raise ValueError(
                f"--set {item!r}: {group} has no field {name!r}; known: {', '.join(sorted(fields))}"
            )
        value = parse_value(raw)
        out[group][name] = tuple(value) if isinstance(value, list) else value
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="grip probe", description=__doc__, formatter_class=RawDefaultsFormatter)
    p.add_argument("--ckpt", required=True, help="Lightning checkpoint file or Hugging Face model folder")
    p.add_argument("--data", required=True, help="prepared corpus (the folder with manifest.json)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the table as JSON here")
    p.add_argument(
        "--set", action="append", default=[], metavar="GROUP.FIELD=VALUE", help="rap.* or budget.*"
    )
    p.add_argument("--mode", default="grip", help="sampler mode whose budget rule is shown (default: grip)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per probe window (default: 128)")
    p.add_argument("--docs", type=int, default=32, help="documents per role and cluster (default: 32)")
    p.add_argument("--refresh-index", type=int, default=0, help="which refresh's theta_init to draw")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:i]")
    # a user-fixable error (ValueError, FileNotFoundError) becomes one line and exit 2 in train.cli.main
    return run(p.parse_args(argv))


def run(a) -> int:
    import numpy as np

    from grip_loop.devices import resolve_device
    from grip_loop.manifest import load_manifest
    from grip_loop.modes import BudgetConfig, base_budget, budgets, get_mode, replay_for
    from grip_loop.probe_report import format_table, probe_json, probe_rows
    from grip_loop.probeset import check_model_fits, probe_set
    from grip_loop.rap import RAPConfig, rapid_adaptation_probe
    from train.cmd_export import load_causal_lm

    sets = parse_sets(a.set)
    rap_cfg = RAPConfig(**sets["rap"])
    budget_cfg = BudgetConfig(**sets["budget"])
    mode = get_mode(a.mode)
    data = Path(a.data)
    m = load_manifest(data)
    if rap_cfg.pad_id is None:
        rap_cfg = dataclasses.replace(rap_cfg, pad_id=int(m.tokenizer["eos_id"]))
    model = load_causal_lm(a.ckpt)
    check_model_fits(model, m, data, a.ckpt)
    if rap_cfg.reset_depth > model.config.num_hidden_layers:
        raise ValueError(
            f"rap.reset_depth: {rap_cfg.reset_depth} exceeds the {model.config.num_hidden_layers} decoder "
            f"layers of {a.ckpt}"
        )
    device = resolve_device(a.device)
    model = model.to(device)
    ps = probe_set(
        m, data, seq_len=a.seq_len, max_docs=a.docs, eval_split=rap_cfg.eval_split, seed=rap_cfg.seed
    )
    if not ps:
        raise ValueError(f"{data / 'manifest.json'}: no cluster has probe documents; re-run `grip prepare`")
    print(f"probing {len(ps)} of {m.k} clusters of {data} with {a.ckpt} on {device}", file=sys.stderr)
    res = rapid_adaptation_probe(
        model, ps, rap_cfg, refresh_index=a.refresh_index, num_clusters=m.k, progress=True
    )
    sizes = np.array(m.sizes)
    quality = np.array([c.quality for c in m.clusters])
    sigma = np.array([c.sigma for c in m.clusters])
    b_total = int(budget_cfg.b_total or sizes.sum())
    base = base_budget(mode, sizes, sigma, quality, budget_cfg)
    n_before = budgets(
        base, replay_for(mode, quality, budget_cfg), b_total, sizes=sizes, floor=budget_cfg.floor
    )
    shrink = res.shrink(rap_cfg.reliability_threshold)
    r = replay_for(mode, quality, budget_cfg, delta=res.delta, shrink=shrink)
    n_after = budgets(base, r, b_total, sizes=sizes, floor=budget_cfg.floor)
    rows = probe_rows(m, res, r, n_before, n_after)
    print(format_table(rows, res.reliability, shrink))
    print(
        f"probe: {res.seconds:.1f} s, {res.flops / 1e9:.1f} GFLOP; lr {np.nanmax(res.lr):.3g}",
        file=sys.stderr,
    )
    if a.json:
        out = Path(a.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        doc = probe_json(rows, res, shrink)
        doc.update(ckpt=str(a.ckpt), data=str(data), mode=a.mode, rap=dataclasses.asdict(rap_cfg))
        out.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    return 0
