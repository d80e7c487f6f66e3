"""GripCallback: the closed loop. Every `refresh_every_n_steps` (or less often, see below) it
probes the live model and re-publishes per-cluster budgets to the GRIP dataset on every rank.

    RAP on the live model -> Delta L_k -> r_k (Eq. 7) -> n_k^(t) (Eq. 8) -> dataset.publish

It is the only module of `grip_loop` that imports Lightning. The sampler mode (a row of the
paper's ablation table, see `grip_loop.modes`) lives here: at `setup` the callback sets
the dataset's selection order and publishes the mode's initial budgets; rows without loss
replay never probe.

Cadence and cost: a refresh costs the probe's FLOPs (`RAPResult.flops`), roughly
K x probe tokens x (steps + 1) x the reset part's parameters, whatever the training batch. With
`max_probe_overhead` (default 0.005) the callback keeps that under the given fraction of the
training FLOPs between two refreshes: after the first probe whose training batch size is known,
the interval becomes max(refresh_every_n_steps, ceil(probe FLOPs / (max_probe_overhead x
training FLOPs per step))). At pretraining batch sizes that leaves `refresh_every_n_steps` as
it is (docs/benchmarks.md: <= 0.3% at 50 steps for moe-8b/16b with K <= 256); on a tiny CPU
model it stretches the interval to ~10^4 steps, so the CPU demo configs set
`max_probe_overhead: null` (a fixed cadence) and say what that costs. The interval is
deterministic (FLOP counts, not timings) and checkpointed.

Failure policy: if the probe raises, or returns a non-finite value for a cluster that has
probe data, the previous budgets stay in force, a warning is logged (`grip/rap_failed` = 1)
and training goes on.

Logged at each refresh (Lightning loggers: CSV always, W&B when configured): per-cluster
n_k, r_k, Delta L_k (and Q_k once), consumed vs planned token shares, the budget drift
||n^(t) - n^(t-1)||_1 / B, RAP seconds and its FLOPs as a fraction of the training FLOPs
between refreshes. Rank 0 also appends every refresh to `<log_dir>/grip_history.jsonl` and
redraws `<log_dir>/grip_budget_share.png` (one line per cluster: share of the budget over
steps); at the end of training the same chart goes to W&B as a line series.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

from grip_loop.dataset import GripIterableDataset
from grip_loop.modes import BudgetConfig, base_budget, budgets, get_mode, replay_for
from grip_loop.rap import RAPConfig, estimate_train_flops, rapid_adaptation_probe, refresh_interval
from grip_loop.shards import iter_shard

log = logging.getLogger(__name__)


def probe_blocks(dataset: GripIterableDataset, seq_len: int, max_blocks: int) -> dict[int, torch.Tensor]:
    """Each cluster's probe documents (from the manifest's probe shards), packed with EOS into
    at most `max_blocks` blocks of `seq_len` tokens; the last block is right-padded with EOS."""
    out: dict[int, torch.Tensor] = {}
    eos, dtype = dataset.eos_id, dataset.token_dtype
    for c in dataset.manifest.clusters:
        toks: list[np.ndarray] = []
        have = 0
        for s in c.probe_shards:
            for doc in iter_shard(dataset.root / s.path, dtype, with_text=False):
                toks += [doc.tokens.astype(np.int64), np.array([eos])]
                have += len(doc.tokens) + 1
                if have >= seq_len * max_blocks:
                    break
        if not have:
            continue
        flat = np.concatenate(toks)[: seq_len * max_blocks]
        n = -(-len(flat) // seq_len)
        padded = np.full(n * seq_len, eos, dtype=np.int64)
        padded[: len(flat)] = flat
        out[c.id] = torch.from_numpy(padded.reshape(n, seq_len))
    return out


class GripCallback(L.Callback):
    """Refreshes GRIP budgets from the live model. See the module docstring.

    Args:
        mode: sampler mode / ablation row: random, static-budget, static-replay,
            loss-replay, diversity, grip.
        budget: Eq. 5/7/8 settings (B, tau, T, alpha, quality gate, optional EMA and floor).
        rap: Rapid Adaptation Probe settings (reset depth, steps, lr, seed).
        refresh_every_n_steps: probe cadence in optimizer steps (the shortest interval).
        max_probe_overhead: the most the probe may cost as a fraction of the training FLOPs
            between refreshes; the interval is stretched to respect it (see the module
            docstring). None = a fixed cadence of `refresh_every_n_steps`, whatever it costs.
        refresh_at_start: probe once before the first step (otherwise the loss-replay rows
            start from the neutral multiplier).
        probe_seq_len: tokens per probe block.
        probe_max_blocks: probe blocks per cluster (the probe docs are cut to fit).
    """

    def __init__(
        self,
        mode: str = "grip",
        budget: BudgetConfig | None = None,
        rap: RAPConfig | None = None,
        refresh_every_n_steps: int = 50,
        max_probe_overhead: float | None = 0.005,
        refresh_at_start: bool = True,
        probe_seq_len: int = 128,
        probe_max_blocks: int = 4,
    ) -> None:
        super().__init__()
        self.mode_name = mode
        self.mode = get_mode(mode)
        self.budget_cfg = budget or BudgetConfig()
        self.rap_cfg = rap or RAPConfig()
        if refresh_every_n_steps < 1:
            raise ValueError(f"refresh_every_n_steps: must be >= 1, got {refresh_every_n_steps}")
        if probe_seq_len < 2 or probe_max_blocks < 1:
            raise ValueError("probe_seq_len must be >= 2 and probe_max_blocks >= 1")
        if max_probe_overhead is not None and not (0 < float(max_probe_overhead) <= 1):
            raise ValueError(
                f"max_probe_overhead: expected None or a number in (0, 1], got {max_probe_overhead!r}"
            )
        self.every = int(refresh_every_n_steps)
        self.max_overhead = None if max_probe_overhead is None else float(max_probe_overhead)
        self.interval: int | None = None if self.max_overhead is not None else self.every
        self._probe_flops: float | None = None  # of the last successful probe (deterministic)
        self.at_start = bool(refresh_at_start)
        self.probe_seq_len, self.probe_max_blocks = int(probe_seq_len), int(probe_max_blocks)
        # state (checkpointed)
        self.history: list[dict] = []
        self.effective_steps: dict[int, int] = {}
        self.consumed = None  # tokens consumed per cluster (this rank)
        self.planned = None  # tokens planned per cluster (this rank): sum_t w^(t) * tokens_t
        self.refreshes = 0
        self._restored = False
        self._dataset: GripIterableDataset | None = None
        self._probe: dict[int, torch.Tensor] | None = None
        self._log_dir: Path | None = None

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
        self.sizes = np.array(m.sizes, dtype=np.int64)
        self.sigma = np.array([c.sigma for c in m.clusters])
        self.quality = np.array([c.quality for c in m.clusters])
        self.mean_len = np.array([c.mean_length for c in m.clusters], dtype=np.float64)
        self.b_total = int(self.budget_cfg.b_total or self.sizes.sum())
        self.base = base_budget(self.mode, self.sizes, self.sigma, self.quality, self.budget_cfg)
        if self.consumed is None:
            self.consumed = np.zeros(len(self.sizes))
            self.planned = np.zeros(len(self.sizes))
        if not self._restored:
            r = replay_for(self.mode, self.quality, self.budget_cfg)
            self._publish(trainer, r, delta=None, rap=None, step=0)

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
        if self.mode.replay == "loss" and layers is not None and self.rap_cfg.reset_depth > layers:
            raise ValueError(
                f"rap.reset_depth: {self.rap_cfg.reset_depth} exceeds the model's {layers} decoder "
                f"layers; set it to at most {layers} (0 = re-initialise the LM head only)"
            )

    def on_train_start(self, trainer, pl_module) -> None:
        if self._restored and self.history:
            last = self.history[-1]
            self.dataset.publish(last["n"], version=last["version"])
        elif self.at_start and self.mode.replay == "loss":
            self.refresh(trainer, pl_module)

    # ------------------------------------------------------------------ the loop
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if isinstance(batch, dict) and "token_cluster_ids" in batch:
            tc = batch["token_cluster_ids"].reshape(-1).to("cpu")
            counts = torch.bincount(tc, minlength=len(self.sizes)).numpy()
            self.consumed += counts
            # budgets count documents; the plan in tokens weights them by mean length (+ EOS)
            plan = self.dataset.weights() * (self.mean_len + 1.0)
            self.planned += plan / plan.sum() * counts.sum()
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
        # the interval is fixed at the first batch after a successful probe (the one at the
        # start, or the first scheduled one when there is none at the start)
        if self.interval is None and self._probe_flops is not None:
            self._set_interval(trainer, pl_module, tokens_per_step)
        if step > 0 and step % (self.interval or self.every) == 0:
            self.refresh(trainer, pl_module, tokens_per_step=tokens_per_step)

    def _set_interval(self, trainer, pl_module, tokens_per_step: float) -> None:
        """Stretch the cadence so that probe FLOPs <= max_probe_overhead x training FLOPs."""
        per_step = estimate_train_flops(getattr(pl_module, "model", pl_module), tokens_per_step)
        self.interval = refresh_interval(self._probe_flops, per_step, self.every, self.max_overhead)
        for lg in trainer.loggers:
            lg.log_metrics({"grip/refresh_interval": float(self.interval)}, step=trainer.global_step)
        if self.interval > self.every:
            log.info(
                "grip: a probe costs %.3g FLOPs = %.1f training steps; refreshing every %d steps "
                "(not %d) keeps it under max_probe_overhead=%g",
                self._probe_flops,
                self._probe_flops / per_step,
                self.interval,
                self.every,
                self.max_overhead,
            )

    @staticmethod
    def _tokens_per_step(batch, trainer) -> float:
        ids = batch["input_ids"] if isinstance(batch, dict) else batch[0]
        return float(ids.numel() * trainer.world_size * trainer.accumulate_grad_batches)

    def refresh(self, trainer, pl_module, tokens_per_step: float | None = None) -> None:
        """Run the probe and publish new budgets (or keep the old ones if the probe fails)."""
        if self._probe is None:
            self._probe = probe_blocks(self.dataset, self.probe_seq_len, self.probe_max_blocks)
        cfg = self.rap_cfg
        if cfg.pad_id is None:
            cfg = RAPConfig(**{**cfg.__dict__, "pad_id": self.dataset.eos_id})
        model = getattr(pl_module, "model", pl_module)
        t0 = time.perf_counter()
        try:
            res = rapid_adaptation_probe(
                model, self._probe, cfg, refresh_index=self.refreshes, num_clusters=len(self.sizes)
            )
            probed = np.array([k in self._probe for k in range(len(self.sizes))])
            if not np.all(np.isfinite(res.delta[probed])):
                raise FloatingPointError(
                    f"non-finite Delta L for clusters {np.flatnonzero(~np.isfinite(res.delta) & probed).tolist()}"
                )
        except Exception as exc:  # the loop must survive a failing probe
            log.warning(
                "grip: RAP failed at step %d (%s); keeping the previous budgets", trainer.global_step, exc
            )
            for lg in trainer.loggers:
                lg.log_metrics({"grip/rap_failed": 1.0}, step=trainer.global_step)
            self.refreshes += 1
            return
        seconds = time.perf_counter() - t0
        self._probe_flops = res.flops
        frac = None
        if tokens_per_step:
            frac = res.cost_fraction(
                estimate_train_flops(model, tokens_per_step * (self.interval or self.every))
            )
        r = replay_for(self.mode, self.quality, self.budget_cfg, delta=res.delta)
        if self.budget_cfg.ema > 0 and self.history and self.history[-1].get("r") is not None:
            r = self.budget_cfg.ema * np.asarray(self.history[-1]["r"]) + (1 - self.budget_cfg.ema) * r
        self.refreshes += 1
        self._publish(
            trainer, r, delta=res, rap={"seconds": seconds, "cost_fraction": frac}, step=trainer.global_step
        )

    def _publish(self, trainer, r: np.ndarray, *, delta, rap, step: int) -> None:
        n = budgets(self.base, r, self.b_total, sizes=self.sizes, floor=self.budget_cfg.floor)
        strategy = getattr(trainer, "strategy", None)
        if strategy is not None and trainer.world_size > 1:  # one source of truth across ranks
            n = np.asarray(strategy.broadcast(n.tolist(), src=0), dtype=np.int64)
        prev = np.asarray(self.history[-1]["n"]) if self.history else None
        version = self.dataset.publish(n)
        entry = {
            "step": int(step),
            "version": version,
            "n": n.tolist(),
            "r": np.asarray(r).tolist(),
            "drift": float(np.abs(n - prev).sum() / self.b_total) if prev is not None else 0.0,
        }
        if delta is not None:
            entry.update(
                delta=delta.delta.tolist(),
                delta_abs=delta.delta_abs.tolist(),
                loss_init=delta.loss_init.tolist(),
            )
        if rap is not None:
            entry.update(rap)
        self.history.append(entry)
        self._log(trainer, entry)

    # ------------------------------------------------------------------ logging
    def _log(self, trainer, e: dict) -> None:
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
        if e.get("seconds") is not None:
            metrics["grip/rap_seconds"] = float(e["seconds"])
        if e.get("cost_fraction") is not None:
            metrics["grip/rap_cost_fraction"] = float(e["cost_fraction"])
        if self.interval is not None:
            metrics["grip/refresh_interval"] = float(self.interval)
        if len(self.history) == 1:
            for k, q in enumerate(self.quality):
                metrics[f"grip/quality/{k:03d}"] = float(q)
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=e["step"])
        if trainer.is_global_zero:
            self._write_files(trainer, e)

    def log_dir(self, trainer) -> Path:
        # `trainer.log_dir` is a collective (it broadcasts rank 0's path), so it is resolved
        # once in `setup`, which every rank runs; calling it here, from rank-0-only code,
        # would leave the other ranks waiting at their next collective (a DDP deadlock).
        if self._log_dir is None:
            self._log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        self._log_dir.mkdir(parents=True, exist_ok=True)
        return self._log_dir

    def _write_files(self, trainer, e: dict) -> None:
        d = self.log_dir(trainer)
        with open(d / "grip_history.jsonl", "a") as fh:
            fh.write(json.dumps(e) + "\n")
        self.plot(d / "grip_budget_share.png")

    def plot(self, path: Path) -> None:
        """Budget share of each cluster over steps (a step plot: budgets change at refreshes)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [h["step"] for h in self.history]
        shares = np.array([np.asarray(h["n"]) / self.b_total for h in self.history])
        fig, ax = plt.subplots(figsize=(9, 4.5))
        for k in range(shares.shape[1]):
            ax.step(
                steps, shares[:, k], where="post", label=f"cluster {k}" if shares.shape[1] <= 16 else None
            )
        ax.set_xlabel("step")
        ax.set_ylabel("budget share n_k / B")
        ax.set_title(f"GRIP budget drift ({self.mode_name})")
        if shares.shape[1] <= 20:
            ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)

    def on_train_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or not self.history:
            return
        for lg in trainer.loggers:
            if type(lg).__name__ != "WandbLogger":
                continue
            import wandb

            steps = [h["step"] for h in self.history]
            ys = [[h["n"][k] / self.b_total for h in self.history] for k in range(len(self.sizes))]
            lg.experiment.log(
                {
                    "grip/budget_share": wandb.plot.line_series(
                        xs=steps,
                        ys=ys,
                        keys=[f"cluster {k}" for k in range(len(ys))],
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
            "mode": self.mode_name,
            "history": self.history,
            "effective_steps": {str(k): v for k, v in self.effective_steps.items()},
            "consumed": None if self.consumed is None else self.consumed.tolist(),
            "planned": None if self.planned is None else self.planned.tolist(),
            "refreshes": self.refreshes,
            "interval": self.interval,
            "probe_flops": self._probe_flops,
        }

    def load_state_dict(self, state: dict) -> None:
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
        self._restored = True
        if self._dataset is not None and self.history:
            last = self.history[-1]
            self._dataset.publish(last["n"], version=last["version"])
