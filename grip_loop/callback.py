"""GripCallback: the closed loop. Every `refresh_every_n_steps` (or less often, see below) it
probes the live model and re-publishes per-cluster budgets to the GRIP dataset on every rank.

    RAP on the live model -> Delta L_k -> r_k (Eq. 7) -> n_k^(t) (Eq. 8) -> dataset.publish

It is the only module of `grip_loop` that imports Lightning. The sampler mode (a row of the
paper's ablation table, see `grip_loop.modes`) lives here: at `setup` the callback sets
the dataset's selection order and publishes the mode's initial budgets; rows without loss
replay never probe.

Cadence and cost: a refresh costs the probe's FLOPs (`RAPResult.flops`, known before it runs:
`estimate_probe_flops`), roughly K x adaptation tokens x (6 epochs + 4) x the reset part's
parameters, whatever the training batch. With `max_probe_overhead` (default 0.005) the
callback keeps that under the given fraction of the training FLOPs between two refreshes: at
the first training batch (when its size is known) the interval becomes
max(refresh_every_n_steps, ceil(probe FLOPs / (max_probe_overhead x training FLOPs per step))).
At pretraining batch sizes that leaves `refresh_every_n_steps` as it is (docs/benchmarks.md,
section 3); on a tiny CPU model it stretches the interval to ~10^4-10^5 steps, so the CPU demo configs set
`max_probe_overhead: null` (a fixed cadence) and say what that costs. The interval is
deterministic (FLOP counts, not timings) and checkpointed.

First refresh: no probe runs before `first_refresh_after_steps` (default 100): the features
of an untrained trunk predict nothing, so a probe there is noise and budgets stay Eq. 5's
(neutral replay) until then. With `proxy` (a Hugging Face folder probed instead of the live
model, as the paper does with its proxies) the first probe runs before step 1.

Trust: every probe reports its split-half reliability (`RAPResult.reliability`: Spearman of
Delta L between two halves of the evaluation documents). Below `rap.reliability_threshold`
Eq. 7's deviations from neutral are shrunk in proportion (`RAPResult.shrink`,
`budget.replay_multiplier`); the history records both.

Failure policy: if the probe raises, or returns a non-finite value for a cluster that it
probed (clusters flagged for having too few documents are expected to be NaN and stay
neutral), the previous budgets stay in force, a warning is logged (`grip/rap_failed` = 1)
and training goes on.

Logged at each refresh (Lightning loggers: CSV always, W&B when configured): per-cluster
n_k, r_k, Delta L_k (and Q_k once), consumed vs planned token shares, the budget drift
||n^(t) - n^(t-1)||_1 / B, the probe's reliability and shrink, its learning rate, logit
ceiling and how much of it the largest drop used (`grip/ceiling_use`), RAP seconds and its
FLOPs as a fraction of the training FLOPs between refreshes. Rank 0 also appends every
refresh to `<log_dir>/grip_history.jsonl`, the probe's per-cluster table (the `grip probe`
columns, cluster names included) to `<log_dir>/grip_probe.csv` and to the log, and redraws
`<log_dir>/grip_budget_share.png` (one line per cluster, labelled with its name); W&B also
gets the table (`grip/probe_table`, a `wandb.Table` per refresh) and share / Delta L series
keyed by cluster name, and at the end of training the budget chart as a line series.

Ledger and repetition guard (`grip_loop.ledger`, `budget.max_repetition`): every history entry
carries the per-cluster ledger (documents, distinct documents read, tokens, reads per document,
planned vs consumed shares, and the decision: r_k, Delta L_k, gate, shrink, cap), rank 0 also
writes it to `<log_dir>/grip_ledger.csv` (rows per refresh and at the end) and
`<log_dir>/grip_ledger.json` (the latest, rewritten atomically: `grip ledger RUN_DIR` reads it
while the run goes on), W&B gets `grip/ledger_table`, and the end-of-training ledger is printed.
The guard caps, at every publication, the passes over each cluster's stream that the budgets
would give over the run's token budget (trainer.max_steps x tokens per step).

One run, one history: the files are opened at `on_train_start`, once Lightning has restored a
checkpoint (or not). A fresh run into a folder that already holds a `grip_history.jsonl` /
`grip_probe.csv` (or a ledger, `grip_ledger.csv` / `.json`) moves them aside (`*.prev`, with a
warning) and starts new ones: a run never appends to another run's history. A resumed run
rewrites them (atomically) to the checkpoint's history: lines the file holds beyond the checkpoint (a crash after the last checkpoint) are
dropped, and a run resumed into another folder gets the checkpoint's history written there.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

from grip_loop import ledger as ledger_mod
from grip_loop.budget import stream_passes
from grip_loop.collate import SPANS, cluster_token_counts, token_clusters
from grip_loop.dataset import GripIterableDataset
from grip_loop.ledger import Ledger
from grip_loop.manifest import ManifestError
from grip_loop.modes import (
    BudgetConfig,
    allocation,
    base_budget,
    get_mode,
    repetition_guard,
    repetition_infeasible,
    replay_step,
)
from grip_loop.probe_report import COLUMNS, format_table, probe_rows
from grip_loop.probeset import check_model_fits, probe_set
from grip_loop.rap import (
    ProbeBatch,
    RAPConfig,
    estimate_probe_flops,
    estimate_train_flops,
    full_params,
    rapid_adaptation_probe,
    refresh_interval,
)

log = logging.getLogger(__name__)


class GripCallback(L.Callback):
    """Refreshes GRIP budgets from the live model. See the module docstring.

    Args:
        mode: sampler mode / ablation row: random, static-budget, static-replay,
            loss-replay, diversity, grip.
        budget: Eq. 5/7/8 settings (B, tau, T, alpha, quality gate, optional EMA and floor).
        rap: Rapid Adaptation Probe settings (docs/rap.md): evaluation split, baseline, epochs,
            micro-batch, learning rate (auto), reset depth, reliability threshold.
        refresh_every_n_steps: probe cadence in optimizer steps (the shortest interval).
        max_probe_overhead: the most the probe may cost as a fraction of the training FLOPs
            between refreshes; the interval is stretched to respect it (see the module
            docstring). None = a fixed cadence of `refresh_every_n_steps`, whatever it costs.
        first_refresh_after_steps: no probe before this optimizer step: the features of an
            untrained trunk predict nothing, so its probe is noise (docs/rap.md). 0 = probe once
            before the first step as well. Budgets are Eq. 5's (neutral replay) until then.
        probe_seq_len: tokens per probe window.
        probe_docs: documents per role (adaptation, evaluation) and cluster, at most; one
            window each (`probe_windows_per_doc`). `grip prepare` provides 32 + 32 by default.
        probe_windows_per_doc: windows taken from each document longer than a window.
        proxy: a Hugging Face causal-LM folder (e.g. from `grip export-hf`) to probe instead of
            the live model, as the paper does with its proxies; its vocabulary must cover the
            prepared tokenizer's. With a proxy the first probe runs before the first step.
    """

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
        super().__init__()
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
        self._probe: dict[int, ProbeBatch] | None = None
        self._proxy = None
        self._log_dir: Path | None = None
        self.ledger: Ledger | None = None
        self._ledger_state: dict | None = None  # restored before setup made the ledger
        self.guard = None
        self.run_tokens: float | None = None
        self.max_steps: int | None = None
        self.tokens_per_step: float | None = None
        self._files_open = False  # rank 0 writes history files only after on_train_start
        self._pending: list[tuple[dict, list[dict] | None]] = []

    # ------------------------------------------------------------------ wiring
    @property
    def dataset(self) -> GripIterableDataset:
        if self._dataset is None:
            raise RuntimeError("GripCallback: not set up yet")
        return self._dataset

    def _find_dataset(self, trainer) -> GripIterableDataset:
        ds = getattr(trainer.datamodule, "dataset", None) if trainer.datamodule is not None else None
        if not isinstance(ds, GripIterableDataset):
            raise TypeError(
                "GripCallback needs the DataModule to expose a GripIterableDataset as `.dataset` "
                f"(got {type(ds).__name__}); use train.data.GripDataModule with a prepared corpus"
            )
        return ds

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        ds = self._find_dataset(trainer)
        self._dataset = ds
        self._log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # collective: every rank
        self._check_model(pl_module, ds)
        ds.set_order(self.mode.order)
        m = ds.manifest
        self.names = m.names
        self.sizes = np.array(m.sizes, dtype=np.int64)
        self.sigma = np.array([c.sigma for c in m.clusters])
        self.quality = np.array([c.quality for c in m.clusters])
        self.mean_len = np.array([c.mean_length for c in m.clusters], dtype=np.float64)
        self.b_total = int(self.budget_cfg.b_total or self.sizes.sum())
        self.base = base_budget(self.mode, self.sizes, self.sigma, self.quality, self.budget_cfg)
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
        self.max_steps, self.tokens_per_step = _run_length(trainer, ds)
        self.run_tokens = (
            self.max_steps * self.tokens_per_step if self.max_steps and self.tokens_per_step else None
        )
        self.guard = repetition_guard(self.budget_cfg, self.sizes, self.mean_len, self.run_tokens)
        if self.budget_cfg.max_repetition is not None and self.guard is None:
            log.warning(
                "grip: budget.max_repetition is set but the run's length is unknown (trainer.max_steps "
                "is not set): the repetition guard is off"
            )
        why = repetition_infeasible(self.guard)
        if why is not None:
            log.warning("grip: %s", why)
            self.guard = None
        if not self._restored:
            r = replay_step(self.mode, self.quality, self.budget_cfg)
            self._publish(trainer, r, res=None, rap=None, step=0)

    def _check_model(self, pl_module, ds: GripIterableDataset) -> None:
        """Fail at setup, before step 1, on what the first probe or batch would trip over.

        Read from the live model when it exists, else from the module's `model_config`
        (lazy_init / FSDP builds the model after setup)."""
        model = getattr(pl_module, "model", None)
        cfg = getattr(model, "config", None) or getattr(pl_module, "model_config", None)
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

    def _probe_model(self, pl_module):
        if self._proxy is not None:
            return self._proxy.to(pl_module.device)
        return getattr(pl_module, "model", pl_module)

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self._open_files(trainer)
        if self._restored and self.history:
            last = self.history[-1]
            self.dataset.publish(last["n"], version=last["version"])
        elif self.mode.replay == "loss" and (self.first_after == 0 or self._proxy is not None):
            self.refresh(trainer, pl_module)

    # ------------------------------------------------------------------ the loop
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if isinstance(batch, dict) and SPANS in batch:
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
            if v not in self.effective_steps:
                self.effective_steps[v] = int(trainer.global_step) - 1
                if trainer.is_global_zero:
                    log.info("grip: budget version %d in effect from step %d", v, trainer.global_step - 1)
        step = trainer.global_step
        if self.mode.replay != "loss":
            return
        tokens_per_step = self._tokens_per_step(batch, trainer)
        # the FLOPs-budgeted interval is fixed at the first batch (the probe's FLOPs are known
        # before it runs: estimate_probe_flops counts exactly what a probe will do)
        if self.interval is None:
            self._set_interval(trainer, pl_module, tokens_per_step)
        if step > 0 and step >= self.first_after and step % (self.interval or self.every) == 0:
            self.refresh(trainer, pl_module, tokens_per_step=tokens_per_step)

    def probe_flops(self, pl_module) -> float:
        """FLOPs of one probe of this run (collective under FSDP: parameters are gathered)."""
        if self._probe_flops is None:
            model = self._probe_model(pl_module)
            cfg = self._rap_config()
            with full_params(model):
                self._probe_flops = estimate_probe_flops(
                    model, self._probe, cfg, num_clusters=len(self.sizes)
                )
        return self._probe_flops

    def _set_interval(self, trainer, pl_module, tokens_per_step: float) -> None:
        """Stretch the cadence so that probe FLOPs <= max_probe_overhead x training FLOPs."""
        per_step = estimate_train_flops(getattr(pl_module, "model", pl_module), tokens_per_step)
        probe = self.probe_flops(pl_module)
        self.interval = refresh_interval(probe, per_step, self.every, self.max_overhead)
        for lg in trainer.loggers:
            lg.log_metrics({"grip/refresh_interval": float(self.interval)}, step=trainer.global_step)
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

    @staticmethod
    def _tokens_per_step(batch, trainer) -> float:
        ids = batch["input_ids"] if isinstance(batch, dict) else batch[0]
        return float(ids.numel() * trainer.world_size * trainer.accumulate_grad_batches)

    def _rap_config(self) -> RAPConfig:
        cfg = self.rap_cfg
        if cfg.pad_id is None:  # probe windows are right-padded with EOS
            cfg = dataclasses.replace(cfg, pad_id=self.dataset.eos_id)
        return cfg

    def refresh(self, trainer, pl_module, tokens_per_step: float | None = None) -> None:
        """Run the probe and publish new budgets (or keep the old ones if the probe fails)."""
        cfg = self._rap_config()
        model = self._probe_model(pl_module)
        t0 = time.perf_counter()
        if trainer.is_global_zero:
            log.info(
                "grip: probing %d clusters at step %d (%s)",
                len(self._probe),
                trainer.global_step,
                "proxy" if self._proxy is not None else "live model",
            )
        try:
            res = rapid_adaptation_probe(
                model,
                self._probe,
                cfg,
                refresh_index=self.refreshes,
                num_clusters=len(self.sizes),
                progress=trainer.is_global_zero,
            )
            probed = np.array([k in self._probe for k in range(len(self.sizes))]) & ~res.flagged
            if not np.all(np.isfinite(res.delta[probed])):
                bad = np.flatnonzero(~np.isfinite(res.delta) & probed).tolist()
                names = getattr(self, "names", None) or [f"cluster {k}" for k in range(len(self.sizes))]
                raise FloatingPointError(
                    f"non-finite Delta L for clusters {', '.join(f'{k} ({names[k]})' for k in bad)}"
                )
        except ManifestError:
            raise  # bad prepared data is not a transient probe failure: stop, naming the file
        except Exception as exc:  # the loop must survive a failing probe
            log.warning(
                "grip: RAP failed at step %d (%s); keeping the previous budgets", trainer.global_step, exc
            )
            for lg in trainer.loggers:
                lg.log_metrics({"grip/rap_failed": 1.0}, step=trainer.global_step)
            self.refreshes += 1
            return
        seconds = time.perf_counter() - t0
        frac = None
        if tokens_per_step:
            frac = res.cost_fraction(
                estimate_train_flops(
                    getattr(pl_module, "model", pl_module), tokens_per_step * (self.interval or self.every)
                )
            )
        shrink = res.shrink(cfg.reliability_threshold)
        prev_r = self.history[-1].get("r") if self.history else None
        r = replay_step(
            self.mode, self.quality, self.budget_cfg, delta=res.delta, shrink=shrink, prev_r=prev_r
        )
        self.refreshes += 1
        drop = res.loss_init - res.loss_final
        rap = {
            "seconds": seconds,
            "cost_fraction": frac,
            "reliability": _finite(res.reliability),
            "shrink": shrink,
            "lr": _finite(np.nanmax(res.lr)) if np.isfinite(res.lr).any() else None,
            "ceiling": _finite(np.nanmax(res.ceiling)) if np.isfinite(res.ceiling).any() else None,
            "ceiling_use": _finite(np.nanmax(drop / res.ceiling)) if np.isfinite(drop).any() else None,
        }
        self._publish(trainer, r, res=res, rap=rap, step=trainer.global_step)

    def _budgets_of(self, version: int) -> np.ndarray:
        for h in reversed(self.history):
            if h["version"] == version:
                return np.asarray(h["n"])
        return self.sizes  # version 0: the dataset's initial table (n_k = N_k)

    def _publish(self, trainer, r: np.ndarray, *, res, rap, step: int) -> None:
        alloc = allocation(
            self.base, r, self.b_total, sizes=self.sizes, floor=self.budget_cfg.floor, guard=self.guard
        )
        n, capped = alloc.n, alloc.capped
        strategy = getattr(trainer, "strategy", None)
        if strategy is not None and trainer.world_size > 1:  # one source of truth across ranks
            n, capped = strategy.broadcast((n.tolist(), capped.tolist()), src=0)
            n, capped = np.asarray(n, dtype=np.int64), np.asarray(capped, dtype=bool)
        if alloc.infeasible and trainer.is_global_zero:
            log.warning(
                "grip: step %d: no split keeps every cluster under budget.max_repetition=%g; budgets "
                "follow the cluster sizes (every cluster read about equally often)",
                step,
                self.budget_cfg.max_repetition,
            )
        prev = np.asarray(self.history[-1]["n"]) if self.history else None
        # the reads so far are counted under the budgets they were drawn with (before publishing)
        self.ledger.flush(self._budgets_of, world_size=getattr(trainer, "world_size", 1))
        version = self.dataset.publish(n)
        entry = {
            "step": int(step),
            "version": version,
            "n": n.tolist(),
            "r": np.asarray(r).tolist(),
            "drift": float(np.abs(n - prev).sum() / self.b_total) if prev is not None else 0.0,
            "capped": np.flatnonzero(capped).tolist(),
            "rule": self._rule(),
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
        entry["ledger"] = self._ledger_record(entry)
        self.history.append(entry)
        rows = None
        if res is not None:
            rows = probe_rows(self.dataset.manifest, res, r, prev if prev is not None else n, n)
        self._log(trainer, entry, rows)

    def _rule(self) -> dict:
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

    def _ledger_record(self, e: dict) -> dict:
        delta = e.get("delta")
        gate = (
            self.quality > self.budget_cfg.quality_threshold
            if self.mode.replay != "none"
            else np.zeros(len(self.sizes), dtype=bool)
        )
        capped = np.zeros(len(self.sizes), dtype=bool)
        capped[e.get("capped", [])] = True
        projected = (
            stream_passes(e["n"], self.sizes, self.mean_len + 1.0, self.run_tokens)
            if self.run_tokens
            else None
        )
        return self.ledger.record(
            n=e["n"],
            r=e["r"],
            delta=None if delta is None else np.asarray(delta, dtype=np.float64),
            gate=gate,
            capped=capped,
            projected=projected,
            shrink=e.get("shrink"),
        )

    # ------------------------------------------------------------------ logging
    def _log(self, trainer, e: dict, rows: list[dict] | None) -> None:
        metrics = {"grip/version": float(e["version"]), "grip/drift": e["drift"], "grip/rap_failed": 0.0}
        for k, (nk, rk) in enumerate(zip(e["n"], e["r"], strict=True)):
            metrics[f"grip/n/{k:03d}"] = float(nk)
            metrics[f"grip/r/{k:03d}"] = float(rk)
            if "delta" in e and np.isfinite(e["delta"][k]):
                metrics[f"grip/delta/{k:03d}"] = float(e["delta"][k])
        if self.consumed is not None and self.consumed.sum() > 0:
            share_c = self.consumed / self.consumed.sum()
            share_p = self.planned / self.planned.sum()
            for k in range(len(share_c)):
                metrics[f"grip/consumed_share/{k:03d}"] = float(share_c[k])
                metrics[f"grip/planned_share/{k:03d}"] = float(share_p[k])
        for key in ("seconds", "cost_fraction", "reliability", "shrink", "lr", "ceiling", "ceiling_use"):
            if e.get(key) is not None:
                metrics[f"grip/rap_{key}" if key in ("seconds", "cost_fraction", "lr") else f"grip/{key}"] = (
                    float(e[key])
                )
        if self.interval is not None:
            metrics["grip/refresh_interval"] = float(self.interval)
        if len(self.history) == 1:
            for k, q in enumerate(self.quality):
                metrics[f"grip/quality/{k:03d}"] = float(q)
        led = e.get("ledger")
        if led is not None:
            for k in range(len(self.sizes)):
                metrics[f"grip/rep_max/{k:03d}"] = float(led["rep_max"][k])
                metrics[f"grip/rep_mean/{k:03d}"] = float(led["rep_mean"][k])
                metrics[f"grip/distinct/{k:03d}"] = float(led["distinct"][k])
                metrics[f"grip/capped/{k:03d}"] = float(led["capped"][k])
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=e["step"])
            if type(lg).__name__ == "WandbLogger" and trainer.is_global_zero:
                self._log_wandb(lg, e, rows)
        if trainer.is_global_zero:
            self._write_files(trainer, e, rows)

    def _log_wandb(self, lg, e: dict, rows: list[dict] | None) -> None:
        """W&B only: the same series keyed by cluster name (readable chart legends) and the
        refresh's probe table."""
        import wandb

        b = float(sum(e["n"]))
        named = {f"grip/share_by_name/{name}": nk / b for name, nk in zip(self.names, e["n"], strict=True)}
        if "delta" in e:
            named.update(
                {
                    f"grip/delta_by_name/{name}": d
                    for name, d in zip(self.names, e["delta"], strict=True)
                    if np.isfinite(d)
                }
            )
        if e.get("ledger") is not None:
            named["grip/ledger_table"] = ledger_wandb_table(wandb, e["step"], self.names, e["ledger"])
        if rows is not None:
            named["grip/probe_table"] = wandb.Table(
                columns=["step", *COLUMNS], data=[[e["step"], *[row[c] for c in COLUMNS]] for row in rows]
            )
        lg.experiment.log({**named, "trainer/global_step": e["step"]})

    def log_dir(self, trainer) -> Path:
        # `trainer.log_dir` is a collective (it broadcasts rank 0's path), so it is resolved
        # once in `setup`, which every rank runs; calling it here, from rank-0-only code,
        # would leave the other ranks waiting at their next collective (a DDP deadlock).
        if self._log_dir is None:
            self._log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        self._log_dir.mkdir(parents=True, exist_ok=True)
        return self._log_dir

    HISTORY, PROBE_CSV = "grip_history.jsonl", "grip_probe.csv"

    def _open_files(self, trainer) -> None:
        """Start this run's history files (see the module docstring): a fresh run moves another
        run's files aside; a resumed run rewrites them to the checkpoint's history."""
        d = self.log_dir(trainer)
        hist, probe = d / self.HISTORY, d / self.PROBE_CSV
        ledger_csv, ledger_json = d / ledger_mod.LEDGER_CSV, d / ledger_mod.LEDGER_JSON
        pending, self._pending = self._pending, []
        self._files_open = True
        if not self._restored:
            moved = []
            for f in (hist, probe, ledger_csv, ledger_json):
                if f.exists():
                    f.replace(f.with_name(f.name + ".prev"))
                    moved.append(f.name)
            if moved:
                log.warning(
                    "grip: %s held a previous run's %s; moved to *.prev, this run starts new files "
                    "(resume with --ckpt_path to continue that run)",
                    d,
                    " and ".join(moved),
                )
            for e, rows in pending:
                self._write_files(trainer, e, rows)
            return
        # resumed: the file's first len(history) lines, where they match the checkpoint's
        # history (they carry the probe tables), else the checkpoint's entries themselves
        old = []
        if hist.exists():
            for line in hist.read_text().splitlines():
                try:
                    old.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a torn last line
        keep = []
        for i, h in enumerate(self.history):
            o = old[i] if i < len(old) else None
            same = o is not None and o.get("step") == h["step"] and o.get("version") == h["version"]
            keep.append(o if same else h)
        _atomic_write(hist, "".join(json.dumps(e) + "\n" for e in keep))
        if probe.exists():
            last = self.history[-1]["step"] if self.history else -1
            with open(probe, newline="") as fh:
                rows = list(csv.reader(fh))
            body = [
                r
                for r in rows[1:]
                if r and r[0].isdigit() and int(r[0]) <= last and int(r[1]) <= self.refreshes
            ]
            buf = io.StringIO()
            csv.writer(buf).writerows(rows[:1] + body)
            _atomic_write(probe, buf.getvalue())
        if ledger_csv.exists():  # the ledger's rows up to the checkpoint (refreshes, not an "end")
            last = self.history[-1]["step"] if self.history else -1
            with open(ledger_csv, newline="") as fh:
                rows = list(csv.reader(fh))
            body = [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= last and r[1] != "end"]
            buf = io.StringIO()
            csv.writer(buf).writerows(rows[:1] + body)
            _atomic_write(ledger_csv, buf.getvalue())
        if self.history:
            self.plot(d / "grip_budget_share.png")

    def _write_files(self, trainer, e: dict, rows: list[dict] | None) -> None:
        if not self._files_open:  # setup's initial publish: written once the run is known fresh
            self._pending.append((e, rows))
            return
        d = self.log_dir(trainer)
        # the file also gets the probe's per-cluster table (the checkpointed history stays lean)
        with open(d / self.HISTORY, "a") as fh:
            fh.write(json.dumps(e if rows is None else {**e, "probe": rows}) + "\n")
        if e.get("ledger") is not None:
            self._write_ledger(d, e["step"], "refresh", e["ledger"])
        if rows is not None:
            path = d / self.PROBE_CSV
            new = not path.exists()
            with open(path, "a", newline="") as fh:
                w = csv.writer(fh)
                if new:
                    w.writerow(["step", "refresh", *COLUMNS, "reliability", "shrink"])
                for row in rows:
                    w.writerow(
                        [e["step"], self.refreshes, *["" if row[c] is None else row[c] for c in COLUMNS]]
                        + ["" if e.get("reliability") is None else e["reliability"], e.get("shrink", "")]
                    )
            log.info(
                "grip: probe at step %d\n%s",
                e["step"],
                format_table(
                    rows, float("nan") if e.get("reliability") is None else e["reliability"], e["shrink"]
                ),
            )
        self.plot(d / "grip_budget_share.png")

    # at most this many clusters are drawn as lines (10 colours x 2 line styles, each told
    # apart); more become a heatmap, one row per cluster
    MAX_LINES = 20

    def plot(self, path: Path) -> None:
        """Budget share of each cluster over steps, labelled with cluster names. Up to MAX_LINES
        clusters: a step plot (budgets change at refreshes), y from 0, every line its own colour
        and style pair. More clusters: a heatmap (cluster x refresh). A run with no budget change
        yet (shorter than one refresh): the current shares as bars, saying when the first refresh
        comes."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [h["step"] for h in self.history]
        shares = np.array([np.asarray(h["n"]) / self.b_total for h in self.history])
        k = shares.shape[1]
        names = list(getattr(self, "names", None) or [f"cluster {i}" for i in range(k)])
        changed = len(self.history) > 1 and not all(h["n"] == self.history[0]["n"] for h in self.history)
        title = f"GRIP budget share per cluster ({self.mode_name})"
        if not changed:  # nothing to draw over time yet
            nxt = max(self.first_after, (self.interval or self.every))
            fig, ax = plt.subplots(figsize=(9, max(3.0, 0.25 * k + 1.2)))
            ax.barh(range(k), shares[-1], color="C0")
            ax.set_yticks(range(k), names, fontsize=7 if k > 20 else 9)
            ax.invert_yaxis()
            ax.set_xlim(0, max(float(shares[-1].max()) * 1.1, 1e-9))
            ax.set_xlabel("budget share n_k / B")
            why = "no probe in this mode" if self.mode.replay != "loss" else f"first refresh at step {nxt}"
            ax.set_title(f"{title}\nat step {steps[-1]}: budgets not changed yet ({why})", fontsize=10)
        elif k > self.MAX_LINES:
            fig, ax = plt.subplots(figsize=(10, max(3.5, 0.18 * k + 1.5)))
            im = ax.imshow(shares.T, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
            ax.set_yticks(range(k), names, fontsize=6)
            ticks = range(0, len(steps), max(1, len(steps) // 12))
            ax.set_xticks(list(ticks), [str(steps[i]) for i in ticks])
            ax.set_xlabel("refresh (at step)")
            fig.colorbar(im, ax=ax, label="budget share n_k / B")
            ax.set_title(title)
        else:
            fig, ax = plt.subplots(figsize=(10, 4.8))
            styles = ["-", "--"]
            for i in range(k):
                ax.step(
                    steps,
                    shares[:, i],
                    where="post",
                    label=names[i],
                    color=f"C{i % 10}",
                    linestyle=styles[(i // 10) % 2],
                    linewidth=1.4,
                )
            ax.set_ylim(0, float(shares.max()) * 1.1)  # from 0: a small drift looks small
            ax.set_xlabel("step")
            ax.set_ylabel("budget share n_k / B")
            ax.set_title(title)
            ax.legend(fontsize=7, ncol=1 if k <= 10 else 2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)

    def _write_ledger(self, d: Path, step: int, event: str, rec: dict) -> None:
        ledger_mod.append_csv(d / ledger_mod.LEDGER_CSV, step, event, self.names, rec)
        ledger_mod.write_json_atomic(
            d / ledger_mod.LEDGER_JSON,
            {
                "step": int(step),
                "event": event,
                "names": list(self.names),
                "max_repetition": self.budget_cfg.max_repetition,
                "run_tokens": self.run_tokens,
                "ledger": rec,
            },
        )

    def final_ledger(self, trainer) -> dict | None:
        """The ledger at the end of training (a collective under DDP: every rank calls it)."""
        if self.ledger is None or not self.history:
            return None
        self.ledger.flush(self._budgets_of, world_size=getattr(trainer, "world_size", 1))
        return self._ledger_record(self.history[-1])

    def on_train_end(self, trainer, pl_module) -> None:
        rec = self.final_ledger(trainer)
        if not trainer.is_global_zero or not self.history:
            return
        if rec is not None:
            self._write_ledger(self.log_dir(trainer), trainer.global_step, "end", rec)
            table = ledger_mod.format_ledger(
                rec,
                self.names,
                step=trainer.global_step,
                event="end of training",
                max_repetition=self.budget_cfg.max_repetition if self.guard is not None else None,
            )
            print(table, flush=True)
        for lg in trainer.loggers:
            if type(lg).__name__ != "WandbLogger":
                continue
            import wandb

            steps = [h["step"] for h in self.history]
            ys = [[h["n"][k] / self.b_total for h in self.history] for k in range(len(self.sizes))]
            lg.experiment.log(
                {
                    **(
                        {"grip/ledger_final": ledger_wandb_table(wandb, trainer.global_step, self.names, rec)}
                        if rec is not None
                        else {}
                    ),
                    "grip/budget_share": wandb.plot.line_series(
                        xs=steps,
                        ys=ys,
                        keys=list(self.names),
                        title="GRIP budget share per cluster",
                        xname="step",
                    ),
                    "grip/budget_share_png": wandb.Image(
                        str(self.log_dir(trainer) / "grip_budget_share.png")
                    ),
                }
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


def _run_length(trainer, ds) -> tuple[int | None, float | None]:
    """(max_steps, tokens per step = batch x seq_len x world size x accumulation); None if unknown."""
    steps = getattr(trainer, "max_steps", -1)
    batch = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
    tps = float(batch * ds.seq_len * trainer.world_size * trainer.accumulate_grad_batches) if batch else None
    return (int(steps) if steps and steps > 0 else None), tps


def ledger_wandb_table(wandb, step: int, names, rec: dict):
    cols = ["step", "cluster", "name", *ledger_mod.COLUMNS]
    data = [
        [step, k, names[k], *[row[c] for c in ledger_mod.COLUMNS]]
        for k, row in enumerate(ledger_mod.rows(rec))
    ]
    return wandb.Table(columns=cols, data=data)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


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
