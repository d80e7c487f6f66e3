"""Offline replay of the GRIP budget rule: what budgets, shares and repetition a setting gives,
in seconds, without training.

The rule is not re-implemented: every publication calls the functions the training callback
calls (`modes.BudgetRule`: `base_budget`, `replay_step` = Eq. 7 + EMA, `allocation` = Eq. 8 +
floor + repetition guard, `repetition_guard`), and the reads are counted by the ledger's
model (`ledger.Ledger`). Only the probe is replaced, by one of:

* `RecordedProbe`: the Delta L_k and shrink a run recorded in its `grip_history.jsonl`. At the
  recorded refresh steps and with the recorded settings, the replay reproduces the recorded
  budgets exactly (`replay_matches`). At another cadence a refresh at step t uses the latest
  recorded probe at or before t (none before the first: neutral replay).
* `SyntheticProbe`: Delta L_k = a_k exp(-rate_k x_k), x_k the passes over cluster k's stream so
  far (what the model has seen of it: learnability saturates with exposure), or the step in
  thousands (`x: steps`). Amplitudes and rates per cluster (by id or name), from a file or drawn
  from a seed.

Between refreshes the run consumes `tokens_per_step` tokens a step split by the planned token
shares (n_k (mean length_k + 1), normalised): the expectation of what the dataset draws.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from grip_loop.ledger import Ledger
from grip_loop.manifest import Manifest, prepared_fingerprint
from grip_loop.modes import BudgetConfig, BudgetRule, get_mode


@dataclass
class SimConfig:
    """One simulated run. `budget` is the rule's settings (B, tau, T, alpha, tau_th, EMA, floor,
    max_repetition); steps x tokens_per_step is the run's token budget."""

    mode: str = "grip"
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    steps: int = 1000
    tokens_per_step: float = 2048.0
    every: int = 50  # refresh cadence (steps)
    first_after: int = 100  # no probe before this step
    refresh_steps: tuple | None = None  # explicit refresh steps (a recorded run's), overrides every
    run_tokens: float | None = None  # the guard's token budget; None = steps x tokens_per_step

    def __post_init__(self) -> None:
        get_mode(self.mode)
        for name, lo in (("steps", 1), ("every", 1), ("first_after", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < lo:
                raise ValueError(f"{name}: expected an integer >= {lo}, got {v!r}")
        t = self.tokens_per_step
        if isinstance(t, bool) or not isinstance(t, int | float) or not np.isfinite(t) or t <= 0:
            raise ValueError(f"tokens_per_step: expected a number > 0, got {t!r}")

    def schedule(self) -> list[int]:
        """Steps at which the rule publishes: 0 (initial budgets), then the refreshes."""
        if self.refresh_steps is not None:
            return [0, *[int(s) for s in self.refresh_steps]]
        mode = get_mode(self.mode)
        if mode.replay != "loss":
            return [0]
        first = [0] if self.first_after == 0 else []
        return [
            0,
            *first,
            *[s for s in range(self.every, self.steps + 1, self.every) if s >= self.first_after],
        ]


class RecordedProbe:
    """Delta L_k and shrink as a run recorded them (entries of its grip_history.jsonl)."""

    def __init__(self, history: list[dict]) -> None:
        self.probes = [(int(e["step"]), e) for e in history if "delta" in e]

    def steps(self) -> list[int]:
        return [s for s, _ in self.probes]

    def __call__(self, step: int, passes: np.ndarray, index: int | None = None):
        if index is not None:  # the index-th recorded probe (exact replay)
            e = self.probes[index][1]
        else:
            before = [e for s, e in self.probes if s <= step]
            if not before:
                return None, 1.0
            e = before[-1]
        delta = np.array([np.nan if d is None else d for d in e["delta"]], dtype=np.float64)
        return delta, float(e.get("shrink", 1.0))


@dataclass
class SyntheticProbe:
    """Delta L_k = amplitude_k exp(-rate_k x_k); x = passes over the stream so far, or steps/1000."""

    amplitude: np.ndarray
    rate: np.ndarray
    x: str = "passes"
    shrink: float = 1.0

    def __post_init__(self) -> None:
        if self.x not in ("passes", "steps"):
            raise ValueError(f"x: 'passes' or 'steps', got {self.x!r}")
        if not 0 <= self.shrink <= 1:
            raise ValueError(f"shrink: must be in [0, 1], got {self.shrink}")
        for name in ("amplitude", "rate"):
            v = np.asarray(getattr(self, name), dtype=np.float64)
            if not np.all(np.isfinite(v)) or np.any(v < 0):
                raise ValueError(f"{name}: must be finite and >= 0")

    def __call__(self, step: int, passes: np.ndarray, index: int | None = None):
        x = passes if self.x == "passes" else np.full(len(self.rate), step / 1000.0)
        return self.amplitude * np.exp(-self.rate * x), self.shrink

    @classmethod
    def from_spec(cls, spec: dict, manifest: Manifest, where: str) -> SyntheticProbe:
        """From {"default": {"amplitude", "rate"}, "clusters": {id or name: {...}}, "x", "shrink"}."""
        if not isinstance(spec, dict):
            raise ValueError(f"{where}: expected a mapping with 'default' and/or 'clusters'")
        unknown = set(spec) - {"default", "clusters", "x", "shrink"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}; known: default, clusters, x, shrink")
        default = {"amplitude": 0.05, "rate": 1.0, **(spec.get("default") or {})}
        amp = np.full(manifest.k, float(default["amplitude"]))
        rate = np.full(manifest.k, float(default["rate"]))
        by_name = {c.label: c.id for c in manifest.clusters}
        by_name.update({getattr(c, "name", None) or c.label: c.id for c in manifest.clusters})
        for key, v in (spec.get("clusters") or {}).items():
            k = int(key) if str(key).isdigit() else by_name.get(str(key))
            if k is None or not 0 <= k < manifest.k:
                raise ValueError(f"{where}: clusters.{key}: no such cluster id or name in the manifest")
            bad = set(v) - {"amplitude", "rate"}
            if bad:
                raise ValueError(
                    f"{where}: clusters.{key}: unknown keys {sorted(bad)}; known: amplitude, rate"
                )
            amp[k] = float(v.get("amplitude", amp[k]))
            rate[k] = float(v.get("rate", rate[k]))
        return cls(amplitude=amp, rate=rate, x=spec.get("x", "passes"), shrink=float(spec.get("shrink", 1.0)))

    @classmethod
    def random(cls, k: int, seed: int = 0) -> SyntheticProbe:
        """Amplitudes U(0.02, 0.12) nats, rates log-uniform in [0.2, 5] per pass."""
        rng = np.random.default_rng(seed)
        return cls(
            amplitude=rng.uniform(0.02, 0.12, size=k),
            rate=np.exp(rng.uniform(np.log(0.2), np.log(5), size=k)),
        )


@dataclass
class SimResult:
    steps: list[int]
    n: list[np.ndarray]
    r: list[np.ndarray]
    delta: list[np.ndarray | None]
    capped: list[np.ndarray]
    drift: list[float]
    infeasible: list[bool]
    ledger: dict  # the ledger record at the end
    b_total: int
    warning: str | None = None  # why the repetition guard was off (infeasible), if it was

    def shares(self) -> np.ndarray:
        return np.array([n / self.b_total for n in self.n])

    def summary(self) -> dict:
        d = np.array(self.drift[1:]) if len(self.drift) > 1 else np.zeros(1)
        final = self.shares()[-1]
        return {
            "refreshes": len(self.steps) - 1,
            "drift_mean": float(d.mean()),
            "drift_max": float(d.max()),
            "moved_final": float(0.5 * np.abs(final - self.shares()[0]).sum()),
            "max_share": float(final.max()),
            "rep_mean_max": float(max(self.ledger["rep_mean"])),
            "rep_max": int(max(self.ledger["rep_max"])),
            "capped_final": int(np.sum(self.capped[-1])),
            "ever_capped": int(np.any(np.array(self.capped), axis=0).sum()),
        }

    def to_json(self, names) -> dict:
        return {
            "names": list(names),
            "b_total": self.b_total,
            "refreshes": [
                {
                    "step": s,
                    "n": n.tolist(),
                    "r": r.tolist(),
                    "delta": None if d is None else [None if not np.isfinite(x) else float(x) for x in d],
                    "capped": np.flatnonzero(c).tolist(),
                    "drift": dr,
                    "infeasible": inf,
                }
                for s, n, r, d, c, dr, inf in zip(
                    self.steps,
                    self.n,
                    self.r,
                    self.delta,
                    self.capped,
                    self.drift,
                    self.infeasible,
                    strict=True,
                )
            ],
            "final_ledger": self.ledger,
            "summary": self.summary(),
            "warning": self.warning,
        }


def simulate(manifest: Manifest, cfg: SimConfig, probe, *, exact_probe_index: bool = False) -> SimResult:
    """Run the budget rule over `cfg.schedule()` with `probe` standing in for the RAP.

    `exact_probe_index`: refresh i (after the initial publication) uses the i-th recorded probe
    (a `RecordedProbe` replayed at its own steps)."""
    mode = get_mode(cfg.mode)
    run_tokens = cfg.run_tokens or float(cfg.steps) * float(cfg.tokens_per_step)
    # as in training: an infeasible guard is off for this run, and it says so (rule.guard_off)
    rule = BudgetRule.of(mode, manifest, cfg.budget, run_tokens)
    sizes, b_total = rule.sizes, rule.b_total
    doc_tokens = rule.mean_len + 1.0
    ledger = Ledger(sizes)
    stream_tokens = np.maximum(sizes * doc_tokens, 1e-300)

    out = SimResult([], [], [], [], [], [], [], {}, b_total)
    draws_real = np.zeros(len(sizes))  # expected documents drawn per cluster (real-valued)
    last_step, version = 0, 0
    schedule = cfg.schedule()

    def consume(until: int) -> None:
        nonlocal last_step
        if not out.n or until <= last_step:
            last_step = max(last_step, until)
            return
        n = out.n[-1]
        plan = n * doc_tokens
        toks = (until - last_step) * cfg.tokens_per_step * plan / plan.sum()
        before = np.floor(draws_real)
        draws_real[:] += toks / doc_tokens
        acc = ledger.pending.setdefault(version, np.zeros((3, len(sizes))))
        acc[0] += np.floor(draws_real) - before
        acc[1] += toks
        acc[2] += toks
        last_step = until

    budgets_by_version: dict[int, np.ndarray] = {}
    for i, step in enumerate(schedule):
        consume(step)
        ledger.flush(budgets_by_version.__getitem__)
        passes = ledger.tokens / stream_tokens
        delta, shrink = (None, 1.0)
        if i > 0 and mode.replay == "loss":
            delta, shrink = probe(step, passes, index=(i - 1) if exact_probe_index else None)
        if delta is None:
            r = rule.replay(prev_r=None if i == 0 else out.r[-1])
            if i > 0:  # no probe yet: the neutral rule again (no EMA: the callback publishes nothing)
                r = out.r[-1]
        else:
            r = rule.replay(delta=delta, shrink=shrink, prev_r=out.r[-1] if out.r else None)
        alloc = rule.allocate(r)
        prev = out.n[-1] if out.n else None
        version += 1
        budgets_by_version[version] = alloc.n
        out.steps.append(int(step))
        out.n.append(alloc.n)
        out.r.append(np.asarray(r, dtype=np.float64))
        out.delta.append(delta)
        out.capped.append(alloc.capped)
        out.drift.append(float(np.abs(alloc.n - prev).sum() / b_total) if prev is not None else 0.0)
        out.infeasible.append(bool(alloc.infeasible))
    out.warning = rule.guard_off
    consume(cfg.steps)
    ledger.flush(budgets_by_version.__getitem__)
    out.ledger = ledger.record(
        n=out.n[-1],
        r=out.r[-1],
        delta=out.delta[-1],
        gate=rule.gate(),
        capped=out.capped[-1],
        projected=rule.projected(out.n[-1], run_tokens),
        shrink=None,
    )
    return out


# ---------------------------------------------------------------------- replaying a recorded run
def check_history_corpus(history: list[dict], manifest: Manifest, history_path: Path, data: Path) -> None:
    """HistoryError-like ValueError when the history indexes another prepared corpus."""
    fp = prepared_fingerprint(manifest)
    for i, e in enumerate(history, 1):
        if len(e["n"]) != manifest.k:
            raise ValueError(
                f"{history_path}: record {i} has budgets for {len(e['n'])} clusters, but {data / 'manifest.json'} "
                f"has K={manifest.k}: the history is from another prepared corpus; pass the run's --data"
            )
        rec = (e.get("rule") or {}).get("corpus_fingerprint")
        if rec and rec != fp:
            raise ValueError(
                f"{history_path}: recorded on the prepared corpus with fingerprint {rec[:16]}..., but "
                f"{data / 'manifest.json'} has {fp[:16]}...: the history is from another corpus (or this "
                "one was prepared again); pass the run's --data"
            )


def replay_config(history: list[dict], rule: dict, overrides: dict) -> SimConfig:
    """The SimConfig that reproduces a recorded run: its budget settings and its refresh steps,
    with `overrides` (BudgetConfig fields, and steps / tokens_per_step / every / first_after)."""
    fields = {f.name for f in dataclasses.fields(BudgetConfig)}
    budget = {k: v for k, v in rule.items() if k in fields}
    if "max_repetition" not in rule:
        budget["max_repetition"] = None  # recorded before the guard existed
    budget.update({k: v for k, v in overrides.items() if k in fields})
    steps = int(
        overrides.get("steps") or rule.get("max_steps") or max(1, max(int(e["step"]) for e in history))
    )
    tps = float(overrides.get("tokens_per_step") or rule.get("tokens_per_step") or 2048.0)
    run_tokens = None
    if "steps" not in overrides and "tokens_per_step" not in overrides:
        run_tokens = rule.get("run_tokens")  # the recorded guard's budget, exactly
    refresh = None
    if "every" not in overrides and "first_after" not in overrides:
        refresh = tuple(int(e["step"]) for e in history[1:])
    return SimConfig(
        mode=rule.get("mode", "grip"),
        budget=BudgetConfig(**budget),
        steps=steps,
        tokens_per_step=float(tps),
        every=int(overrides.get("every") or rule.get("refresh_every_n_steps") or 50),
        first_after=int(
            overrides.get("first_after")
            if overrides.get("first_after") is not None
            else (rule.get("first_refresh_after_steps") or 100)
        ),
        refresh_steps=refresh,
        run_tokens=run_tokens,
    )


def replay_matches(history: list[dict], result: SimResult) -> list[int]:
    """Indices of the recorded publications whose budgets the replay does NOT reproduce."""
    bad = [i for i, (e, n) in enumerate(zip(history, result.n, strict=False)) if list(e["n"]) != n.tolist()]
    if len(history) != len(result.n):
        bad.append(min(len(history), len(result.n)))
    return bad


def plot_trajectories(result: SimResult, names, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = result.shares()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    k = shares.shape[1]
    for i in range(k):
        ax.step(result.steps, shares[:, i], where="post", label=names[i] if k <= 20 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("budget share n_k / B")
    ax.set_title(title)
    if k <= 20:
        ax.legend(fontsize=7, ncol=1 if k <= 10 else 2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_json(path: Path, doc) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)
