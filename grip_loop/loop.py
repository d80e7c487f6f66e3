"""The GRIP loop's state and arithmetic, without Lightning: what `GripCallback` (the Lightning
adapter in `grip_loop.callback`, whose module docstring describes the loop) keeps and computes.

`GripLoop` holds the checkpointed state (history, effective steps, consumed and planned tokens,
refresh count, interval, ledger), binds to the GRIP dataset (`bind`), counts what each batch
consumed (`account`), turns a probe result into r_k (`replay_from_probe`, `probe_summary`),
publishes budgets (`publish`) and writes the run's files (`grip_loop.loop_report`). Hooks,
loggers, ranks and broadcasts stay in the callback: methods here take plain values (step,
world size, a broadcast function).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch

from grip_loop import loop_report
from grip_loop.collate import SPANS, cluster_token_counts, token_clusters
from grip_loop.dataset import GripIterableDataset
from grip_loop.history import HISTORY
from grip_loop.ledger import Ledger
from grip_loop.modes import BudgetConfig, BudgetRule, get_mode
from grip_loop.probe_report import probe_rows
from grip_loop.probeset import check_model_fits, probe_set
from grip_loop.rap import (
    ProbeBatch,
    RAPConfig,
    estimate_probe_flops,
    estimate_train_flops,
    full_params,
    refresh_interval,
)

log = logging.getLogger("grip_loop.callback")  # the loop's messages keep the callback's logger


class GripLoop:
    """State and arithmetic of the closed loop; `GripCallback` documents the arguments."""

    HISTORY, PROBE_CSV = HISTORY, loop_report.PROBE_CSV
    MAX_LINES = loop_report.MAX_LINES

    def __init__(
        self,
        mode: str = "grip",
        budget: BudgetConfig | None = None,
        rap: RAPConfig | None = None,
        refresh_every_n_steps: int = 50,
        max_probe_overhead: float | None = 0.005,
        first_refresh_after_steps: int = 100,
        probe_seq_len: int = 128,
        probe_docs: int = 32,
        probe_windows_per_doc: int = 1,
        proxy: str | None = None,
    ) -> None:
        self.mode_name = mode
        self.mode = get_mode(mode)
        self.budget_cfg = budget or BudgetConfig()
        self.rap_cfg = rap or RAPConfig()
        for name, v, lo in (
            ("refresh_every_n_steps", refresh_every_n_steps, 1),
            ("first_refresh_after_steps", first_refresh_after_steps, 0),
            ("probe_seq_len", probe_seq_len, 2),
            ("probe_docs", probe_docs, 1),
            ("probe_windows_per_doc", probe_windows_per_doc, 1),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
        if max_probe_overhead is not None and not (0 < float(max_probe_overhead) <= 1):
            raise ValueError(
                f"max_probe_overhead: expected None or a number in (0, 1], got {max_probe_overhead!r}"
            )
        self.every = int(refresh_every_n_steps)
        self.first_after = int(first_refresh_after_steps)
        self.max_overhead = None if max_probe_overhead is None else float(max_probe_overhead)
        self.interval: int | None = None if self.max_overhead is not None else self.every
        self._probe_flops: float | None = None  # estimated before the first probe (deterministic)
        self.probe_seq_len, self.probe_docs = int(probe_seq_len), int(probe_docs)
        self.probe_windows_per_doc = int(probe_windows_per_doc)
        self.proxy_path = proxy
        # state (checkpointed)
        self.history: list[dict] = []
        self.effective_steps: dict[int, int] = {}
        self.consumed = None  # tokens consumed per cluster (this rank)
        self.planned = None  # tokens planned per cluster (this rank): sum_t w^(t) * tokens_t
        self.refreshes = 0
        self._restored = False
        self._dataset: GripIterableDataset | None = None
        self.rule: BudgetRule | None = None  # set by `bind`, with the corpus's numbers below
        self.guard = None  # the rule's repetition guard (None: off)
        self.names = None
        self._probe: dict[int, ProbeBatch] | None = None
        self._proxy = None
        self._log_dir: Path | None = None
        self.ledger: Ledger | None = None
        self._ledger_state: dict | None = None  # restored before setup made the ledger
        self.run_tokens: float | None = None
        self.max_steps: int | None = None
        self.tokens_per_step: float | None = None
        self._files_open = False  # rank 0 writes history files only after open_files
        self._pending: list[tuple[dict, list[dict] | None]] = []

    # ------------------------------------------------------------------ wiring
    @property
    def dataset(self) -> GripIterableDataset:
        if self._dataset is None:
            raise RuntimeError("GripCallback: not set up yet")
        return self._dataset

    # ------------------------------------------------------------------ setup
    def bind(self, ds: GripIterableDataset, max_steps: int | None, tokens_per_step: float | None) -> None:
        """Read the corpus's numbers, set the dataset's selection order, load the probe set (and
        proxy) and start or restore the token counts and the ledger."""
        self._dataset = ds
        ds.set_order(self.mode.order)
        m = ds.manifest
        self.names = m.names
        self.max_steps, self.tokens_per_step = max_steps, tokens_per_step
        self.run_tokens = max_steps * tokens_per_step if max_steps and tokens_per_step else None
        self.rule = rule = BudgetRule.of(self.mode, m, self.budget_cfg, self.run_tokens)
        self.sizes, self.sigma, self.quality, self.mean_len = (
            rule.sizes,
            rule.sigma,
            rule.quality,
            rule.mean_len,
        )
        self.b_total, self.base, self.guard = rule.b_total, rule.base, rule.guard
        if self.mode.replay == "loss":
            # fail before step 1 on a corpus without the probe's evaluation documents
            self._probe = probe_set(
                m,
                ds.root,
                seq_len=self.probe_seq_len,
                max_docs=self.probe_docs,
                windows_per_doc=self.probe_windows_per_doc,
                eval_split=self.rap_cfg.eval_split,
                seed=self.rap_cfg.seed,
            )
            if self.proxy_path is not None:
                self._proxy = load_proxy(self.proxy_path, ds)
        if self.consumed is None:
            self.consumed = np.zeros(len(self.sizes))
            self.planned = np.zeros(len(self.sizes))
        if self.ledger is None:
            self.ledger = Ledger(self.sizes)
            if self._ledger_state is not None:
                self.ledger.load_state_dict(self._ledger_state)
                self._ledger_state = None
        if self.budget_cfg.max_repetition is not None and self.run_tokens is None:
            log.warning(
                "grip: budget.max_repetition is set but the run's length is unknown (trainer.max_steps "
                "is not set): the repetition guard is off"
            )
        if self.rule.guard_off is not None:
            log.warning("grip: %s", self.rule.guard_off)

    def check_model(self, module, ds: GripIterableDataset) -> None:
        """Fail at setup, before step 1, on what the first probe or batch would trip over.

        Read from the live model when it exists, else from the module's `model_config`
        (lazy_init / FSDP builds the model after setup)."""
        model = getattr(module, "model", None)
        cfg = getattr(model, "config", None) or getattr(module, "model_config", None)
        vocab = getattr(cfg, "vocab_size", None)
        if vocab is not None and vocab < ds.vocab_size:
            raise ValueError(
                f"model.vocab_size ({vocab}) is smaller than the prepared tokenizer's "
                f"({ds.vocab_size}, {ds.root / 'manifest.json'}); set model.vocab_size >= {ds.vocab_size}"
            )
        layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "num_layers", None)
        if (
            self.mode.replay == "loss"
            and self.proxy_path is None
            and layers is not None
            and self.rap_cfg.reset_depth > layers
        ):
            raise ValueError(
                f"rap.reset_depth: {self.rap_cfg.reset_depth} exceeds the model's {layers} decoder "
                f"layers; set it to at most {layers} (0 = re-initialise the LM head only)"
            )

    def probe_model(self, module):
        """The model a probe adapts: the proxy (on the module's device) or the live model."""
        if self._proxy is not None:
            return self._proxy.to(module.device)
        return getattr(module, "model", module)

    # ------------------------------------------------------------------ accounting
    def account(self, batch: dict, step: int) -> int | None:
        """Count a batch's tokens per cluster, from its `cluster_spans` (consumed, planned, the
        ledger), and note the effective step of its budget version; returns that version when it
        is new, else None."""
        # tokens per cluster from the (cluster, tokens) spans: only they come to the host
        counts = cluster_token_counts(batch[SPANS], len(self.sizes))
        self.consumed += counts
        # budgets count documents; the plan in tokens weights them by mean length (+ EOS)
        plan = self.dataset.weights() * (self.mean_len + 1.0)
        self.planned += plan / plan.sum() * counts.sum()
        if self.ledger is not None:
            self.ledger.observe(
                token_clusters(batch),  # expanded where the batch is: the ledger needs each EOS's cluster
                batch["input_ids"],
                batch["weights_version"],
                self.dataset.eos_id,
                plan=plan / plan.sum() * counts.sum(),
            )
        # effective step of a budget version: the (0-based) optimizer step that trained on
        # the first batch drawn under it
        v = int(batch["weights_version"].max())
        if v in self.effective_steps:
            return None
        self.effective_steps[v] = int(step) - 1
        return v

    def due(self, step: int) -> bool:
        """Whether a probe runs after optimizer step `step` (loss-replay modes only)."""
        return step > 0 and step >= self.first_after and step % (self.interval or self.every) == 0

    # ------------------------------------------------------------------ cadence
    def probe_flops(self, module) -> float:
        """FLOPs of one probe of this run (collective under FSDP: parameters are gathered)."""
        if self._probe_flops is None:
            model = self.probe_model(module)
            cfg = self.rap_config()
            with full_params(model):
                self._probe_flops = estimate_probe_flops(
                    model, self._probe, cfg, num_clusters=len(self.sizes)
                )
        return self._probe_flops

    def set_interval(self, module, tokens_per_step: float) -> None:
        """Stretch the cadence so that probe FLOPs <= max_probe_overhead x training FLOPs."""
        per_step = estimate_train_flops(getattr(module, "model", module), tokens_per_step)
        probe = self.probe_flops(module)
        self.interval = refresh_interval(probe, per_step, self.every, self.max_overhead)
        if self.interval > self.every:
            log.info(
                "grip: a probe costs %.3g FLOPs = %.1f training steps; refreshing every %d steps "
                "(not %d) keeps it under max_probe_overhead=%g",
                probe,
                probe / per_step,
                self.interval,
                self.every,
                self.max_overhead,
            )

    def rap_config(self) -> RAPConfig:
        cfg = self.rap_cfg
        if cfg.pad_id is None:  # probe windows are right-padded with EOS
            cfg = dataclasses.replace(cfg, pad_id=self.dataset.eos_id)
        return cfg

    # ------------------------------------------------------------------ a probe's result
    def check_probe(self, res) -> None:
        """FloatingPointError naming the clusters when the probe returned a non-finite Delta L
        for a cluster it probed (flagged clusters, too small to probe, are NaN and stay neutral)."""
        probed = np.array([k in self._probe for k in range(len(self.sizes))]) & ~res.flagged
        if not np.all(np.isfinite(res.delta[probed])):
            bad = np.flatnonzero(~np.isfinite(res.delta) & probed).tolist()
            names = self.names or [f"cluster {k}" for k in range(len(self.sizes))]
            raise FloatingPointError(
                f"non-finite Delta L for clusters {', '.join(f'{k} ({names[k]})' for k in bad)}"
            )

    def replay_from_probe(self, res, shrink: float) -> np.ndarray:
        """r_k after a probe (Eq. 7 on Delta L_k, shrunk by its reliability, optional EMA)."""
        prev_r = self.history[-1].get("r") if self.history else None
        return self.rule.replay(delta=res.delta, shrink=shrink, prev_r=prev_r)

    @staticmethod
    def probe_summary(res, *, seconds: float, cost_fraction: float | None, shrink: float) -> dict:
        """What a history entry records of the probe: time, cost, reliability and shrink, learning
        rate, logit ceiling and how much of it the largest drop used."""
        drop = res.loss_init - res.loss_final
        return {
            "seconds": seconds,
            "cost_fraction": cost_fraction,
            "reliability": _finite(res.reliability),
            "shrink": shrink,
            "lr": _finite(np.nanmax(res.lr)) if np.isfinite(res.lr).any() else None,
            "ceiling": _finite(np.nanmax(res.ceiling)) if np.isfinite(res.ceiling).any() else None,
            "ceiling_use": _finite(np.nanmax(drop / res.ceiling)) if np.isfinite(drop).any() else None,
        }

    # ------------------------------------------------------------------ publishing
    def _budgets_of(self, version: int) -> np.ndarray:
        for h in reversed(self.history):
            if h["version"] == version:
                return np.asarray(h["n"])
        return self.sizes  # version 0: the dataset's initial table (n_k = N_k)

    def publish(
        self, r: np.ndarray, *, res, rap, step: int, world_size: int = 1, broadcast=None
    ) -> tuple[dict, list[dict] | None, bool]:
        """Allocate n_k from r_k, publish them to the dataset and append the history entry.
        `broadcast` (under several ranks) makes rank 0's integers everyone's. Returns the entry,
        the probe's per-cluster rows (None without a probe) and whether the repetition guard
        was infeasible at this publication."""
        alloc = self.rule.allocate(r)
        n, capped = alloc.n, alloc.capped
        if broadcast is not None:  # one source of truth across ranks
            n, capped = broadcast((n.tolist(), capped.tolist()))
            n, capped = np.asarray(n, dtype=np.int64), np.asarray(capped, dtype=bool)
        prev = np.asarray(self.history[-1]["n"]) if self.history else None
        # the reads so far are counted under the budgets they were drawn with (before publishing)
        self.ledger.flush(self._budgets_of, world_size=world_size)
        version = self.dataset.publish(n)
        entry = {
            "step": int(step),
            "version": version,
            "n": n.tolist(),
            "r": np.asarray(r).tolist(),
            "drift": float(np.abs(n - prev).sum() / self.b_total) if prev is not None else 0.0,
            "capped": np.flatnonzero(capped).tolist(),
            "rule": self.rule_record(),
        }
        if res is not None:
            entry.update(
                delta=res.delta.tolist(),
                delta_abs=res.delta_abs.tolist(),
                loss_init=res.loss_init.tolist(),
                loss_final=res.loss_final.tolist(),
                loss_base=res.loss_base.tolist(),
                flagged=np.flatnonzero(res.flagged).tolist(),
            )
        if rap is not None:
            entry.update(rap)
        entry["ledger"] = self.ledger_record(entry)
        self.history.append(entry)
        rows = None
        if res is not None:
            rows = probe_rows(self.dataset.manifest, res, r, prev if prev is not None else n, n)
        return entry, rows, bool(alloc.infeasible)

    def rule_record(self) -> dict:
        """What a replay of this publication needs (`grip simulate`): the budget rule's settings,
        B, the run's token budget and the corpus it indexes."""
        return {
            "mode": self.mode_name,
            **dataclasses.asdict(self.budget_cfg),
            "b_total_resolved": self.b_total,
            "run_tokens": self.run_tokens,
            "max_steps": self.max_steps,
            "tokens_per_step": self.tokens_per_step,
            "refresh_every_n_steps": self.interval or self.every,
            "first_refresh_after_steps": self.first_after,
            "reliability_threshold": self.rap_cfg.reliability_threshold,
            "corpus_fingerprint": self.dataset.fingerprint,
        }

    def ledger_record(self, e: dict) -> dict:
        delta = e.get("delta")
        capped = np.zeros(len(self.sizes), dtype=bool)
        capped[e.get("capped", [])] = True
        return self.ledger.record(
            n=e["n"],
            r=e["r"],
            delta=None if delta is None else np.asarray(delta, dtype=np.float64),
            gate=self.rule.gate(),
            capped=capped,
            projected=self.rule.projected(e["n"], self.run_tokens),
            shrink=e.get("shrink"),
        )

    def final_ledger(self, world_size: int = 1) -> dict | None:
        """The ledger at the end of training (a collective under DDP: every rank calls it)."""
        if self.ledger is None or not self.history:
            return None
        self.ledger.flush(self._budgets_of, world_size=world_size)
        return self.ledger_record(self.history[-1])

    # ------------------------------------------------------------------ the run's files (rank 0)
    def open_files(self, d: Path) -> None:
        """Start this run's history files in `d` (see the callback's module docstring): a fresh
        run moves another run's files aside; a resumed run rewrites them to the checkpoint's
        history. Publications made before (setup's) are written now."""
        pending, self._pending = self._pending, []
        self._files_open = True
        if not self._restored:
            loop_report.start_fresh(d)
            for e, rows in pending:
                self.write_files(d, e, rows)
            return
        loop_report.rewrite_to_checkpoint(d, self.history, self.refreshes)
        if self.history:
            self.plot(d / loop_report.BUDGET_PNG)

    def write_files(self, d: Path, e: dict, rows: list[dict] | None) -> None:
        loop_report.append_refresh(d, e, rows, self.refreshes)
        if e.get("ledger") is not None:
            self.write_ledger(d, e["step"], "refresh", e["ledger"])
        self.plot(d / loop_report.BUDGET_PNG)

    def write_ledger(self, d: Path, step: int, event: str, rec: dict) -> None:
        loop_report.write_ledger(
            d,
            step,
            event,
            self.names,
            rec,
            max_repetition=self.budget_cfg.max_repetition,
            run_tokens=self.run_tokens,
        )

    def plot(self, path: Path) -> None:
        """The budget-share chart of this run's history (`loop_report.plot_budget_share`)."""
        nxt = max(self.first_after, (self.interval or self.every))
        why = "no probe in this mode" if self.mode.replay != "loss" else f"first refresh at step {nxt}"
        loop_report.plot_budget_share(
            path,
            self.history,
            self.b_total,
            self.names,
            title=f"GRIP budget share per cluster ({self.mode_name})",
            not_changed_why=why,
        )

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return {
            **(self._dataset.corpus_state() if self._dataset is not None else {}),
            "mode": self.mode_name,
            "history": self.history,
            "effective_steps": {str(k): v for k, v in self.effective_steps.items()},
            "consumed": None if self.consumed is None else self.consumed.tolist(),
            "planned": None if self.planned is None else self.planned.tolist(),
            "refreshes": self.refreshes,
            "interval": self.interval,
            "probe_flops": self._probe_flops,
            "ledger": None if self.ledger is None else self.ledger.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        # Bound to the prepared corpus (its fingerprint): budgets, history and token counts
        # index clusters of that corpus. Lightning runs `setup` (which finds the dataset) first.
        if self._dataset is not None and not self._dataset.check_resume(state):
            log.warning("grip: checkpoint from another prepared corpus (allowed): budgets start afresh")
            return
        if state.get("mode") != self.mode_name:
            raise ValueError(
                f"checkpoint was written in mode {state.get('mode')!r}, this run uses {self.mode_name!r}"
            )
        self.history = list(state["history"])
        self.effective_steps = {int(k): int(v) for k, v in state["effective_steps"].items()}
        self.consumed = None if state["consumed"] is None else np.asarray(state["consumed"], dtype=np.float64)
        self.planned = None if state["planned"] is None else np.asarray(state["planned"], dtype=np.float64)
        self.refreshes = int(state["refreshes"])
        if self.max_overhead is not None:  # a fixed cadence stays what this run's config says
            self.interval = state.get("interval")
        self._probe_flops = state.get("probe_flops")
        if state.get("ledger") is not None:  # checkpoints from before the ledger start it at zero
            if self.ledger is None:
                self._ledger_state = state["ledger"]
            else:
                self.ledger.load_state_dict(state["ledger"])
        self._restored = True
        if self._dataset is not None and self.history:
            last = self.history[-1]
            self._dataset.publish(last["n"], version=last["version"])


def _finite(x) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


def load_proxy(path: str, ds: GripIterableDataset):
    """The proxy model for `GripCallback(proxy=...)`: a Hugging Face causal-LM folder whose
    vocabulary covers the prepared tokenizer (and whose tokenizer.json, when it has one, is the
    prepared one). Errors name the folder, the manifest and the fix."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"proxy: {folder} is not a Hugging Face model folder (no config.json); write one with "
            "`grip export-hf CKPT OUT` or point proxy at a causal LM saved with save_pretrained"
        )
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    check_model_fits(model, ds.manifest, ds.root, folder)
    return model
