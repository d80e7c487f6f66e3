"""`grip simulate`: replay the GRIP budget rule offline, in seconds, without training.

    grip simulate --data runs/quickstart/data --history runs/quickstart        # replay a recorded run
    grip simulate --data DIR --history RUN --set budget.alpha=1                # what alpha=1 would have done
    grip simulate --data DIR --synthetic random:0 --steps 2000 --tokens-per-step 2048
    grip simulate --data DIR --synthetic probe.yaml --sweep alpha=0,1,2,3

The probe is the only thing replaced: by the Delta L_k a run recorded (`--history`: a run folder
or its grip_history.jsonl) or by a synthetic model (`--synthetic FILE|random[:SEED]`: Delta L_k =
a_k exp(-rate_k x_k), x_k = passes over cluster k's stream so far; FILE is YAML/JSON
{default: {amplitude, rate}, clusters: {ID or NAME: {amplitude, rate}}, x: passes|steps,
shrink}). Budgets, replay multipliers, the repetition guard and the read counts come from the
functions training uses (grip_loop.simulate). Replaying a history with its own settings checks
that every recorded budget is reproduced exactly (exit status 1 if one is not).

Settings: `--set budget.FIELD=VALUE` (b_total, tau, temperature, alpha, quality_threshold, ema,
floor, max_repetition), `--steps`, `--tokens-per-step`, `--every`, `--first-after`; with a history
they default to the run's. `--sweep PARAM=v1,v2,...` (a budget field or steps, tokens_per_step,
every, first_after) runs one simulation per value and prints a table.

Writes to --out (default grip_simulate/): budget_trajectories.png, simulation.json (per refresh:
n, r, Delta L, capped clusters, drift; the final ledger), and sweep.json with --sweep.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

RUN_KEYS = ("steps", "tokens_per_step", "every", "first_after")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="grip simulate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", required=True, help="the prepared corpus (folder with manifest.json)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--history", help="a run folder or its grip_history.jsonl: replay its recorded probes")
    src.add_argument("--synthetic", help="a probe-model file (YAML/JSON), or random[:SEED]")
    p.add_argument("--mode", default=None, help="sampler mode (default: the run's, or grip)")
    p.add_argument("--set", action="append", default=[], metavar="budget.FIELD=VALUE", help="budget settings")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of the run (T)")
    p.add_argument("--tokens-per-step", type=float, default=None, help="tokens a step trains on")
    p.add_argument("--every", type=int, default=None, help="refresh cadence in steps")
    p.add_argument("--first-after", type=int, default=None, help="no probe before this step")
    p.add_argument("--sweep", default=None, metavar="PARAM=v1,v2,...", help="one simulation per value")
    p.add_argument("--out", default="grip_simulate", help="output folder (default: grip_simulate)")
    # a user-fixable error (ValueError, FileNotFoundError) becomes one line and exit 2 in train.cli.main
    return run(p.parse_args(argv))


def _budget_sets(items: list[str]) -> dict:
    from grip_loop.modes import BudgetConfig
    from train.overrides import parse_value

    fields = {f.name for f in dataclasses.fields(BudgetConfig)}
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        name = key[len("budget.") :] if key.startswith("budget.") else key
        if not sep or name not in fields:
            raise ValueError(
                f"--set {item!r}: expected budget.FIELD=VALUE with FIELD one of {', '.join(sorted(fields))}"
            )
        out[name] = parse_value(raw)
    return out


def _sweep(spec: str) -> tuple[str, list]:
    from grip_loop.modes import BudgetConfig
    from train.overrides import parse_value

    key, sep, raw = spec.partition("=")
    name = key[len("budget.") :] if key.startswith("budget.") else key.replace("-", "_")
    fields = {f.name for f in dataclasses.fields(BudgetConfig)}
    if not sep or (name not in fields and name not in RUN_KEYS) or not raw.strip():
        raise ValueError(
            f"--sweep {spec!r}: expected PARAM=v1,v2,... with PARAM a budget field ({', '.join(sorted(fields))}) "
            f"or one of {', '.join(RUN_KEYS)}"
        )
    return name, [parse_value(v) for v in raw.split(",")]


def _names(manifest) -> list[str]:
    return [getattr(c, "name", None) or c.label for c in manifest.clusters]


def run(a) -> int:
    from grip_loop.history import HISTORY, find_run_file, read_history, rule_of
    from grip_loop.manifest import load_manifest
    from grip_loop.modes import BudgetConfig
    from grip_loop.simulate import (
        RecordedProbe,
        SimConfig,
        SyntheticProbe,
        check_history_corpus,
        plot_trajectories,
        replay_config,
        replay_matches,
        simulate,
        write_json,
    )

    data = Path(a.data)
    manifest = load_manifest(data)
    names = _names(manifest)
    overrides = _budget_sets(a.set)
    run_over = {
        k: v
        for k, v in (
            ("steps", a.steps),
            ("tokens_per_step", a.tokens_per_step),
            ("every", a.every),
            ("first_after", a.first_after),
        )
        if v is not None
    }
    history = None
    if a.history is not None:
        path = find_run_file(a.history, HISTORY)
        if path is None:
            raise FileNotFoundError(f"{a.history}: no {HISTORY} here or below")
        history = read_history(path)
        check_history_corpus(history, manifest, path, data)
        rule = rule_of(history[0], path)
        if a.mode:
            rule["mode"] = a.mode
        probe = RecordedProbe(history)
        source = f"history {path}"
    else:
        spec = a.synthetic
        if spec.startswith("random"):
            _, _, seed = spec.partition(":")
            if seed and not seed.isdigit():
                raise ValueError(f"--synthetic {spec!r}: expected random or random:SEED (an integer)")
            probe = SyntheticProbe.random(manifest.k, int(seed or 0))
        else:
            f = Path(spec)
            if not f.is_file():
                raise FileNotFoundError(f"--synthetic {spec}: no such file (or use random[:SEED])")
            import yaml

            try:
                doc = yaml.safe_load(f.read_text())
            except yaml.YAMLError as exc:
                raise ValueError(f"{f}: not valid YAML/JSON ({exc})") from exc
            probe = SyntheticProbe.from_spec(doc, manifest, str(f))
        rule = {"mode": a.mode or "grip"}
        source = f"synthetic probe {spec}"

    def config(extra: dict) -> SimConfig:
        budget_over = {k: v for k, v in {**overrides, **extra}.items() if k not in RUN_KEYS}
        over_run = {**run_over, **{k: v for k, v in extra.items() if k in RUN_KEYS}}
        if history is not None:
            return replay_config(history, rule, {**budget_over, **over_run})
        try:
            budget = BudgetConfig(**budget_over)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"budget: {exc}") from exc
        return SimConfig(
            mode=rule["mode"],
            budget=budget,
            steps=int(over_run.get("steps", 1000)),
            tokens_per_step=float(over_run.get("tokens_per_step", 2048.0)),
            every=int(over_run.get("every", 50)),
            first_after=int(over_run.get("first_after", 100)),
        )

    exact = history is not None and not run_over
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.sweep is None:
        cfg = config({})
        res = simulate(manifest, cfg, probe, exact_probe_index=exact and cfg.refresh_steps is not None)
        print(
            f"simulated {source}: mode {cfg.mode}, B={res.b_total}, {cfg.steps} steps x {cfg.tokens_per_step:g} tokens"
        )
        print(_settings(cfg))
        if res.warning:
            print(f"grip simulate: warning: {res.warning}", file=sys.stderr)
        if history is not None and exact and not overrides:
            bad = replay_matches(history, res)
            ok = len(history) - len([i for i in bad if i < len(history)])
            print(
                f"replay: {ok}/{len(history)} recorded budgets reproduced exactly"
                + ("" if not bad else f"; differ at records {[i + 1 for i in bad]}")
            )
        print(_final_table(res, names))
        print(
            "drift per refresh: "
            + " ".join(f"{s}:{d:.4f}" for s, d in zip(res.steps[1:], res.drift[1:], strict=True))
        )
        write_json(
            out / "simulation.json", {"source": source, "settings": _settings_dict(cfg), **res.to_json(names)}
        )
        png = plot_trajectories(
            res, names, out / "budget_trajectories.png", f"GRIP budget share (simulated, {cfg.mode})"
        )
        print(f"wrote {out / 'simulation.json'} and {png}", file=sys.stderr)
        if history is not None and exact and not overrides and replay_matches(history, res):
            return 1
        return 0
    name, values = _sweep(a.sweep)
    rows = []
    for v in values:
        cfg = config({name: v})
        res = simulate(manifest, cfg, probe, exact_probe_index=exact and cfg.refresh_steps is not None)
        rows.append({name: v, **res.summary()})
        if res.warning:
            print(f"grip simulate: warning ({name}={v}): {res.warning}", file=sys.stderr)
    cols = list(rows[0])
    cells = [[str(r[name])] + [_fmt(r[c]) for c in cols[1:]] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print(f"sweep over {name} ({source})")
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    for row in cells:
        print("  ".join(x.rjust(w) for x, w in zip(row, widths, strict=True)))
    write_json(out / "sweep.json", {"source": source, "param": name, "rows": rows})
    print(f"wrote {out / 'sweep.json'}", file=sys.stderr)
    return 0


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _settings_dict(cfg) -> dict:
    return {
        "mode": cfg.mode,
        "budget": dataclasses.asdict(cfg.budget),
        "steps": cfg.steps,
        "tokens_per_step": cfg.tokens_per_step,
        "refresh_steps": cfg.schedule(),
        "run_tokens": cfg.run_tokens or cfg.steps * cfg.tokens_per_step,
    }


def _settings(cfg) -> str:
    b = cfg.budget
    return (
        f"alpha={b.alpha:g} tau_th={b.quality_threshold:g} tau={b.tau:g} T={b.temperature:g} ema={b.ema:g} "
        f"floor={b.floor:g} max_repetition={b.max_repetition} refreshes at {cfg.schedule()[1:]}"
    )


def _final_table(res, names) -> str:
    shares = res.shares()
    led = res.ledger
    width = max(4, *(len(n) for n in names))
    lines = [
        f"{'k':>3} {'name':<{width}} {'share0':>7} {'final':>7} {'n_k':>6} {'r_k':>5} {'passes':>6} "
        f"{'rep_max':>7} {'distinct':>8} {'docs':>6} {'capped':>6}"
    ]
    for k, name in enumerate(names):
        lines.append(
            f"{k:>3} {name:<{width}} {shares[0][k]:>7.4f} {shares[-1][k]:>7.4f} {int(res.n[-1][k]):>6} "
            f"{res.r[-1][k]:>5.2f} {led['rep_mean'][k]:>6.2f} {led['rep_max'][k]:>7} {led['distinct'][k]:>8} "
            f"{led['docs'][k]:>6} {'yes' if res.capped[-1][k] else '':>6}"
        )
    return "\n".join(lines)
