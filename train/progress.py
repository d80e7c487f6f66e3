"""What a training run shows while it runs (added by train.main unless the config has its own).

- On a terminal: Lightning's bar, described as "step" (Lightning's "Epoch 0/-2" means an epoch
  count of -1, i.e. unlimited, which runs bounded by max_steps always have).
- Not on a terminal (a log file, a job scheduler, CI): no bar (it writes carriage returns a log
  cannot show), but one line about every 5% of `max_steps` and at the end, through the
  `train.progress` logger: step, loss, seconds per step, elapsed and an estimate of what is left.
- The model summary: parameters and size, without Lightning's FLOPs column, which reads 0 for a
  model without `example_input_array` (the FLOPs a run costs are in `perf/mfu` and `grip/rap_*`).
"""

from __future__ import annotations

import logging
import sys
import time

import lightning as L
from lightning.pytorch.callbacks import ModelSummary, ProgressBar

log = logging.getLogger(__name__)


def on_a_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


class LogProgress(L.Callback):
    """One line per ~`fraction` of max_steps (or every `every` steps), and one at the end."""

    def __init__(self, fraction: float = 0.05, every: int | None = None, stream=None) -> None:
        self.fraction, self.every, self.stream = fraction, every, stream
        self._t0: float | None = None
        self._step0 = 0

    def _interval(self, trainer) -> int:
        if self.every:
            return self.every
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else 0
        return max(1, round(total * self.fraction)) if total else max(1, 10 * trainer.log_every_n_steps)

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0, self._step0 = time.perf_counter(), trainer.global_step
        if trainer.is_global_zero:
            total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
            self._emit(f"train: from step {trainer.global_step}" + (f" to {total}" if total else ""))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or step == 0 or step % self._interval(trainer):
            return
        self._line(trainer, step)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and trainer.global_step % self._interval(trainer):
            self._line(trainer, trainer.global_step)

    def _line(self, trainer, step: int) -> None:
        elapsed = time.perf_counter() - (self._t0 or time.perf_counter())
        done = max(1, step - self._step0)
        per = elapsed / done
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        loss = trainer.callback_metrics.get("train/loss")
        parts = [f"step {step}" + (f"/{total}" if total else "")]
        if loss is not None:
            parts.append(f"loss {float(loss):.4f}")
        parts.append(f"{per:.2f} s/step")
        parts.append(f"elapsed {_hms(elapsed)}")
        if total:
            parts.append(f"left ~{_hms(per * max(0, total - step))}")
        self._emit("train: " + ", ".join(parts))

    def _emit(self, line: str) -> None:
        print(line, file=self.stream or sys.stdout, flush=True)


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class ParamSummary(ModelSummary):
    """Lightning's model summary without the FLOPs column and total (0 without an example input)."""

    @staticmethod
    def summarize(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                  total_flops, **kwargs) -> None:  # fmt: skip
        from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count

        rows = list(zip(*(values for _, values in summary_data), strict=True))
        names = [name for name, _ in summary_data]
        keep = [i for i, n in enumerate(names) if n in ("Name", "Type", "Params")]
        for row in rows:
            log.info("model: %s", "  ".join(str(row[i]) for i in keep))
        log.info(
            "model: %s parameters (%s trainable), %.1f MB",
            get_human_readable_count(int(total_parameters)),
            get_human_readable_count(int(trainable_parameters)),
            model_size,
        )


def step_progress_bar() -> ProgressBar:
    """Lightning's bar (rich when installed, else tqdm) described as "step" for step-bounded runs."""
    try:
        from lightning.pytorch.callbacks import RichProgressBar

        RichProgressBar()  # raises when rich is missing
    except (ImportError, ModuleNotFoundError):
        from lightning.pytorch.callbacks import TQDMProgressBar

        return TQDMProgressBar()

    class StepRichProgressBar(RichProgressBar):
        def _get_train_description(self, current_epoch: int) -> str:
            if self.trainer.max_epochs is not None and self.trainer.max_epochs < 0:
                return f"{'train':{len(self.validation_description)}}"
            return super()._get_train_description(current_epoch)

    return StepRichProgressBar()


def progress_callbacks(trainer_config: dict, existing: list) -> list[L.Callback]:
    """The callbacks train.main adds (none of a kind the config already has); may switch the
    Trainer's bar off (`trainer_config["enable_progress_bar"]`) when stdout is not a terminal."""
    out: list[L.Callback] = []
    kinds = [type(c) for c in existing]
    has = lambda base: any(issubclass(k, base) for k in kinds)  # noqa: E731
    if trainer_config.get("enable_model_summary", True) is not False and not has(ModelSummary):
        out.append(ParamSummary())
    if trainer_config.get("enable_progress_bar", True) is not False and not has(ProgressBar):
        if on_a_terminal():
            out.append(step_progress_bar())
        else:
            trainer_config["enable_progress_bar"] = False
    if not has(LogProgress) and not on_a_terminal():
        out.append(LogProgress())
    return out
