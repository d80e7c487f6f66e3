"""GripCallback: the closed loop. Every `refresh_every_n_steps` (or less often, see below) it
probes the live model and re-publishes per-cluster budgets to the GRIP dataset on every rank.

    RAP on the live model -> Delta L_k -> r_k (Eq. 7) -> n_k^(t) (Eq. 8) -> dataset.publish

It is the only module of `grip_loop` that imports Lightning, and a thin adapter: the loop's
state and arithmetic are `grip_loop.loop.GripLoop` (which GripCallback extends), its metrics,
W&B payloads and files `grip_loop.loop_report`, the budget rule `grip_loop.modes.BudgetRule`.
The sampler mode (a row of the paper's ablation table, see `grip_loop.modes`) is applied at
`setup`: the callback sets the dataset's selection order and publishes the mode's initial
budgets; rows without loss replay never probe.

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

import logging
import time
from pathlib import Path

import lightning as L
import numpy as np

from grip_loop import ledger as ledger_mod
from grip_loop import loop_report
from grip_loop.collate import SPANS
from grip_loop.dataset import GripIterableDataset
from grip_loop.loop import GripLoop, load_proxy
from grip_loop.loop_report import ledger_wandb_table
from grip_loop.manifest import ManifestError
from grip_loop.rap import estimate_train_flops, rapid_adaptation_probe

__all__ = ["GripCallback", "ledger_wandb_table", "load_proxy"]

log = logging.getLogger(__name__)


class GripCallback(GripLoop, L.Callback):
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

    # The constructor (the arguments above) is GripLoop's; LightningCLI reads its signature.

    # ------------------------------------------------------------------ wiring
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
        self.check_model(pl_module, ds)
        self.bind(ds, *_run_length(trainer, ds))
        if not self._restored:
            self._publish(trainer, self.rule.replay(), res=None, rap=None, step=0)

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.open_files(self.log_dir(trainer))
        if self._restored and self.history:
            last = self.history[-1]
            self.dataset.publish(last["n"], version=last["version"])
        elif self.mode.replay == "loss" and (self.first_after == 0 or self._proxy is not None):
            self.refresh(trainer, pl_module)

    # ------------------------------------------------------------------ the loop
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if isinstance(batch, dict) and SPANS in batch:
            v = self.account(batch, trainer.global_step)
            if v is not None and trainer.is_global_zero:
                log.info("grip: budget version %d in effect from step %d", v, trainer.global_step - 1)
        step = trainer.global_step
        if self.mode.replay != "loss":
            return
        tokens_per_step = self._tokens_per_step(batch, trainer)
        # the FLOPs-budgeted interval is fixed at the first batch (the probe's FLOPs are known
        # before it runs: estimate_probe_flops counts exactly what a probe will do)
        if self.interval is None:
            self.set_interval(pl_module, tokens_per_step)
            for lg in trainer.loggers:
                lg.log_metrics({"grip/refresh_interval": float(self.interval)}, step=trainer.global_step)
        if self.due(step):
            self.refresh(trainer, pl_module, tokens_per_step=tokens_per_step)

    @staticmethod
    def _tokens_per_step(batch, trainer) -> float:
        ids = batch["input_ids"] if isinstance(batch, dict) else batch[0]
        return float(ids.numel() * trainer.world_size * trainer.accumulate_grad_batches)

    def refresh(self, trainer, pl_module, tokens_per_step: float | None = None) -> None:
        """Run the probe and publish new budgets (or keep the old ones if the probe fails)."""
        cfg = self.rap_config()
        model = self.probe_model(pl_module)
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
            self.check_probe(res)
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
        r = self.replay_from_probe(res, shrink)
        self.refreshes += 1
        rap = self.probe_summary(res, seconds=seconds, cost_fraction=frac, shrink=shrink)
        self._publish(trainer, r, res=res, rap=rap, step=trainer.global_step)

    def _publish(self, trainer, r: np.ndarray, *, res, rap, step: int) -> None:
        strategy = getattr(trainer, "strategy", None)
        broadcast = None
        if strategy is not None and trainer.world_size > 1:
            broadcast = lambda obj: strategy.broadcast(obj, src=0)  # noqa: E731
        entry, rows, infeasible = self.publish(
            r,
            res=res,
            rap=rap,
            step=step,
            world_size=getattr(trainer, "world_size", 1),
            broadcast=broadcast,
        )
        if infeasible and trainer.is_global_zero:
            log.warning(
                "grip: step %d: no split keeps every cluster under budget.max_repetition=%g; budgets "
                "follow the cluster sizes (every cluster read about equally often)",
                step,
                self.budget_cfg.max_repetition,
            )
        self._log(trainer, entry, rows)

    # ------------------------------------------------------------------ logging
    def _log(self, trainer, e: dict, rows: list[dict] | None) -> None:
        metrics = loop_report.refresh_metrics(
            e,
            consumed=self.consumed,
            planned=self.planned,
            interval=self.interval,
            quality=self.quality if len(self.history) == 1 else None,
        )
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=e["step"])
            if type(lg).__name__ == "WandbLogger" and trainer.is_global_zero:
                import wandb

                lg.experiment.log(loop_report.wandb_refresh_payload(wandb, self.names, e, rows))
        if trainer.is_global_zero:
            if self._files_open:
                self.write_files(self.log_dir(trainer), e, rows)
            else:  # setup's initial publish: open_files writes it (the folder waits for on_train_start)
                self._pending.append((e, rows))

    def log_dir(self, trainer) -> Path:
        # `trainer.log_dir` is a collective (it broadcasts rank 0's path), so it is resolved
        # once in `setup`, which every rank runs; calling it here, from rank-0-only code,
        # would leave the other ranks waiting at their next collective (a DDP deadlock).
        if self._log_dir is None:
            self._log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        self._log_dir.mkdir(parents=True, exist_ok=True)
        return self._log_dir

    def on_train_end(self, trainer, pl_module) -> None:
        rec = self.final_ledger(world_size=getattr(trainer, "world_size", 1))
        if not trainer.is_global_zero or not self.history:
            return
        if rec is not None:
            self.write_ledger(self.log_dir(trainer), trainer.global_step, "end", rec)
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

            png = self.log_dir(trainer) / loop_report.BUDGET_PNG
            lg.experiment.log(
                loop_report.wandb_end_payload(
                    wandb, self.history, self.b_total, self.names, rec, trainer.global_step, png
                )
            )

    # checkpointing: GripLoop's state_dict / load_state_dict (first in the MRO, before
    # L.Callback's) are what Lightning saves and restores


def _run_length(trainer, ds) -> tuple[int | None, float | None]:
    """(max_steps, tokens per step = batch x seq_len x world size x accumulation); None if unknown."""
    steps = getattr(trainer, "max_steps", -1)
    batch = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
    tps = float(batch * ds.seq_len * trainer.world_size * trainer.accumulate_grad_batches) if batch else None
    return (int(steps) if steps and steps > 0 else None), tps
