"""The LightningModule: next-token loss + router load-balancing loss on a Hugging Face MoE LM.

Choices and their costs:
- The loss is computed here (not by `model(labels=...)`) so per-token losses are available for
  per-cluster logging; it is the same shifted cross-entropy HF computes (labels aligned with
  input_ids, -100 ignored). Cost: the (B, T, V) logits are materialised once in fp32 for the
  loss, as HF does anyway.
- Per-cluster loss is accumulated as two tensors (token-loss sum, token count) indexed by
  cluster id and flushed every `trainer.log_every_n_steps` steps as `train/loss_cluster_<k>`,
  instead of logging K keys every step. `self.cluster_loss` holds the last flushed means.
- Throughput is measured between consecutive batch starts (includes data loading, optimizer and
  logging): tokens/s per device and over all devices, step time, and
  MFU = 6 * active_params * tokens_per_s_per_device / peak_flops (peak per device from the config,
  default 989e12 = H100/H800 dense bf16). 6N counts forward + backward matmuls of the active
  parameters and ignores attention's T^2 term (about 6% at T=4096, d=2048, 24 layers).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from models import MoEConfig, build_model, count_closed_form, resolve_config


class MoELM(L.LightningModule):
    """Next-token training of a fine-grained MoE LM.

    Args:
        model: a name in models.MODEL_CONFIGS, a configs/model/*.yaml path, or a dict of fields.
        vocab_size: overrides the model config's vocabulary (set it to the tokenizer's size).
        model_overrides: other MoEConfig fields to change (e.g. {num_layers: 2}).
        lr: peak AdamW learning rate, reached after `warmup_steps`.
        min_lr_ratio: the cosine decays to lr * min_lr_ratio at the last step (trainer.max_steps).
        warmup_steps: linear warmup from 0.
        weight_decay: AdamW decoupled weight decay (not applied to norms, biases and embeddings).
        betas: AdamW betas.
        activation_checkpointing: recompute each decoder block in backward (memory for ~30% compute).
        lazy_init: build the model in `configure_model` (for FSDP: the strategy's context is active)
            instead of in __init__; `self.model` is None until then.
        peak_flops: per-device peak FLOP/s for the MFU estimate.
        seed: seeds the model initialisation.
        experts_backend: "hf", "megablocks" or "auto" (see models.build_model).
    """

    def __init__(
        self,
        model: str | dict[str, Any] = "tiny",
        vocab_size: int | None = None,
        model_overrides: dict[str, Any] | None = None,
        lr: float = 3e-4,
        min_lr_ratio: float = 0.1,
        warmup_steps: int = 100,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        activation_checkpointing: bool = False,
        lazy_init: bool = False,
        peak_flops: float = 989e12,
        seed: int = 0,
        experts_backend: str = "hf",
    ) -> None:
        super().__init__()
        for name, v in (("lr", lr), ("min_lr_ratio", min_lr_ratio), ("weight_decay", weight_decay)):
            if not math.isfinite(v):  # NaN passes every comparison below: check it first
                raise ValueError(f"MoELM.{name} must be a finite number, got {v}")
        if len(betas) != 2 or not all(math.isfinite(b) and 0 <= b < 1 for b in betas):
            raise ValueError(f"MoELM.betas must be two finite numbers in [0, 1), got {betas}")
        if lr <= 0:
            raise ValueError(f"MoELM.lr must be > 0, got {lr}")
        if not 0 <= min_lr_ratio <= 1:
            raise ValueError(f"MoELM.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if weight_decay < 0:
            raise ValueError(f"MoELM.weight_decay must be >= 0, got {weight_decay}")
        if warmup_steps < 0:
            raise ValueError(f"MoELM.warmup_steps must be >= 0, got {warmup_steps}")
        if not (math.isfinite(peak_flops) and peak_flops > 0):
            raise ValueError(f"MoELM.peak_flops must be a finite number > 0, got {peak_flops}")
        self.save_hyperparameters()
        self.model_config: MoEConfig = resolve_config(model, vocab_size=vocab_size, **(model_overrides or {}))
        self.active_params = count_closed_form(self.model_config).active
        self.model = None if lazy_init else self._build()
        self.cluster_loss: dict[int, float] = {}
        self._cl_sum = torch.zeros(0, dtype=torch.float64)
        self._cl_cnt = torch.zeros(0, dtype=torch.float64)
        self._t_last: float | None = None
        self._tokens_since = 0
        self._steps_since = 0

    def setup(self, stage: str) -> None:
        if stage == "fit" and self._trainer is not None:
            check_trainer_trains(self.trainer)

    # -- model ---------------------------------------------------------------------------------
    def _build(self):
        model = build_model(
            self.model_config, seed=self.hparams.seed, experts_backend=self.hparams.experts_backend
        )
        if self.hparams.activation_checkpointing:
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return model

    def configure_model(self) -> None:
        if self.model is None:
            self.model = self._build()

    def forward(self, input_ids: torch.Tensor):
        return self.model(input_ids=input_ids, output_router_logits=True, use_cache=False)

    # -- loss ----------------------------------------------------------------------------------
    @staticmethod
    def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position next-token loss (B, T-1) and its mask, HF shift convention."""
        shift_logits = logits[:, :-1].float()
        shift_labels = labels[:, 1:]
        mask = shift_labels != -100
        loss = F.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)),
            shift_labels.reshape(-1).clamp_min(0),
            reduction="none",
        ).view_as(shift_labels)
        return loss * mask, mask

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        input_ids = batch["input_ids"]
        labels = batch.get("labels", input_ids)  # absent = the inputs (HF convention: we shift)
        if input_ids.dim() != 2 or input_ids.size(1) < 2:
            raise ValueError(
                f"batch input_ids of shape {tuple(input_ids.shape)}: a block needs at least 2 tokens "
                "(T tokens give T-1 next-token targets; with 1 the loss is 0.0 and nothing is learned); "
                "set the dataset's seq_len (data.dataset.init_args.seq_len) to 2 or more"
            )
        if input_ids.max() >= self.model_config.vocab_size or input_ids.min() < 0:
            self._raise_token_range(input_ids)
        out = self(input_ids)
        tok_loss, mask = self.token_losses(out.logits, labels)
        n_tok = mask.sum().clamp_min(1)
        lm_loss = tok_loss.sum() / n_tok
        aux = out.aux_loss if out.aux_loss is not None else torch.zeros((), device=lm_loss.device)
        loss = lm_loss + self.model_config.router_aux_loss_coef * aux
        bs = input_ids.size(0)
        self.log("train/loss", lm_loss, prog_bar=True, batch_size=bs)
        self.log("train/aux_loss", aux, batch_size=bs)
        self.log("train/total_loss", loss, batch_size=bs)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=bs)
        if "cluster_ids" in batch:
            self._accumulate_clusters(batch["cluster_ids"], tok_loss.sum(1).detach(), mask.sum(1))
        self._tokens_since += int(input_ids.numel())
        self._steps_since += 1
        return loss

    def _raise_token_range(self, input_ids: torch.Tensor) -> None:
        """A token id the model cannot embed: say whether the data or the configuration is wrong.
        A GripIterableDataset knows the vocabulary of the tokenizer that made its shards."""
        v = self.model_config.vocab_size
        bad = int(input_ids.min()) if input_ids.min() < 0 else int(input_ids.max())
        dm = self.trainer.datamodule if self._trainer is not None else None
        tok_vocab = getattr(getattr(dm, "dataset", None), "vocab_size", None)
        if bad < 0 or (tok_vocab is not None and bad >= tok_vocab):
            raise ValueError(
                f"batch has token id {bad}, outside the vocabulary of the tokenizer that made the data "
                f"({tok_vocab} tokens): the data is damaged, not model.vocab_size; re-run `grip prepare` on it"
            )
        if tok_vocab is not None:
            raise ValueError(
                f"batch has token id {bad} >= model vocab_size {v}; the data's tokenizer has {tok_vocab} "
                f"tokens: set model.vocab_size >= {tok_vocab}"
            )
        raise ValueError(
            f"batch has token id {bad} >= model vocab_size {v}; set model.vocab_size to the size of the "
            f"tokenizer that made the data (if that tokenizer has at most {v} tokens, the data is damaged)"
        )

    # -- per-cluster loss ------------------------------------------------------------------------
    def _accumulate_clusters(self, cids: torch.Tensor, loss_sum: torch.Tensor, count: torch.Tensor) -> None:
        cids = cids.view(-1).long().cpu()
        keep = cids >= 0
        if not keep.any():
            return
        cids = cids[keep]
        k = int(cids.max()) + 1
        if k > self._cl_sum.numel():
            self._cl_sum = F.pad(self._cl_sum, (0, k - self._cl_sum.numel()))
            self._cl_cnt = F.pad(self._cl_cnt, (0, k - self._cl_cnt.numel()))
        self._cl_sum.index_add_(0, cids, loss_sum.cpu().double()[keep])
        self._cl_cnt.index_add_(0, cids, count.cpu().double()[keep])

    def _flush_clusters(self) -> None:
        s, c = self._cl_sum, self._cl_cnt
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Ranks may have seen different cluster ids: agree on the length, then sum.
            k = torch.tensor([s.numel()], device=self.device)
            torch.distributed.all_reduce(k, op=torch.distributed.ReduceOp.MAX)
            k = int(k.item())
            both = torch.stack([F.pad(s, (0, k - s.numel())), F.pad(c, (0, k - c.numel()))]).to(self.device)
            torch.distributed.all_reduce(both)
            s, c = both[0].cpu(), both[1].cpu()
        self._cl_sum = torch.zeros(0, dtype=torch.float64)
        self._cl_cnt = torch.zeros(0, dtype=torch.float64)
        if not bool((c > 0).any()):
            return  # nothing seen on any rank since the last flush: keep the previous means
        self.cluster_loss = {i: float(s[i] / c[i]) for i in range(s.numel()) if c[i] > 0}
        if self.cluster_loss:
            metrics = {f"train/loss_cluster_{i}": v for i, v in self.cluster_loss.items()}
            for logger in self.loggers:
                logger.log_metrics(metrics, step=self.global_step)

    # -- throughput ----------------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        every = max(1, self.trainer.log_every_n_steps)
        if self._t_last is not None and self.global_step % every == 0 and self.global_step > 0:
            dt = now - self._t_last
            steps = max(1, self._steps_since)
            tps = self._tokens_since / dt
            world = self.trainer.world_size
            metrics = {
                "perf/step_time_s": dt / steps,
                "perf/tokens_per_s": tps * world,
                "perf/tokens_per_s_per_device": tps,
                "perf/mfu": 6.0 * self.active_params * tps / self.hparams.peak_flops,
            }
            for logger in self.loggers:
                logger.log_metrics(metrics, step=self.global_step)
            self._flush_clusters()
            self._t_last, self._tokens_since, self._steps_since = now, 0, 0
        elif self._t_last is None:
            self._t_last, self._tokens_since, self._steps_since = now, 0, 0

    def on_train_end(self) -> None:
        # Unconditional: under DDP every rank must enter the collective, whatever it has seen.
        self._flush_clusters()

    # -- optimisation --------------------------------------------------------------------------
    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            # Norm weights, biases and embeddings are not decayed (GPT-3 / Llama practice).
            (no_decay if p.ndim < 2 or "embed_tokens" in name else decay).append(p)
        opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.hparams.lr,
            betas=tuple(self.hparams.betas),
            fused=self.device.type == "cuda",
        )
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else None
        if total is None:
            total = int(self.trainer.estimated_stepping_batches)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: lr_lambda(step, self.hparams.warmup_steps, total, self.hparams.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- export --------------------------------------------------------------------------------
    def save_hf(self, path: str | Path) -> None:
        """Write a Hugging Face checkpoint folder (config.json + safetensors) of the live model."""
        self.model.save_pretrained(str(path))


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine to min_ratio at `total` steps (flat afterwards)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def check_trainer_trains(trainer) -> None:
    """ValueError naming the trainer option when `trainer.fit` would run no optimizer step:
    Lightning accepts these settings and ends the run at once with status 0."""
    if trainer.max_steps == 0:
        raise ValueError(
            "trainer.max_steps: 0 runs no training step; set it to the number of optimizer steps "
            "(>= 1), or -1 to train until max_epochs"
        )
    if trainer.max_epochs == 0:
        raise ValueError("trainer.max_epochs: 0 runs no training step; set it >= 1 (or -1 for no limit)")
    limit = trainer.limit_train_batches
    if limit is not None and not isinstance(limit, bool) and limit == 0:
        raise ValueError("trainer.limit_train_batches: 0 runs no training batch; remove it or set it > 0")
