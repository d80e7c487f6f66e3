"""The Rapid Adaptation Probe's settings, inputs and outcome: `RAPConfig` (validated), `ProbeBatch`,
`RAPResult`, and the Spearman correlation behind its split-half reliability (`grip_loop.rap`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from grip_loop._checks import check_choice, check_int, check_number

IGNORE = -100
EVAL_SPLITS = ("split", "none")
BASELINES = ("null", "unigram", "init")


@dataclass(kw_only=True)
class RAPConfig:
    """Settings of the Rapid Adaptation Probe. The defaults are the measured protocol of
    docs/rap.md; `RAPConfig.literal()` is the paper's literal text (Sec. 3.2)."""

    reset_depth: int = 0
    """0 = LM head only; N = the last N decoder blocks + the final norm + the head."""
    eval_split: str = "split"
    """"split": adapt on a cluster's adaptation windows, measure on its evaluation windows
    (other documents). "none": adapt and measure on the same windows (the paper's text)."""
    baseline: str | None = "null"
    """What Delta L is measured from. "null": the same head and schedule on a constant input
    (V-usable information: what the features add beyond the cluster's token distribution);
    "unigram": the closed-form smoothed unigram of the adaptation targets; "init": the loss
    at theta_init (the paper's L_init, ~ln V). YAML reads a bare `null` as None: it means "null"."""
    epochs: int = 10
    """Passes over the adaptation windows (the paper's K = 10 epochs); ignored when `steps` is set."""
    steps: int | None = None
    """A fixed number of AdamW steps instead of `epochs` (micro-batches cycle through the epochs)."""
    micro_batch: int | None = 8
    """Windows per AdamW step; None = every step on all adaptation windows (full batch)."""
    lr: float | str = "auto"
    """AdamW learning rate, or "auto": auto_lr_nats / (steps x mean L1 norm of the head's input)."""
    auto_lr_nats: float = 8.0
    """With lr auto: how far (in nats) the schedule can move any logit (docs/rap.md)."""
    weight_decay: float = 0.0
    """AdamW weight decay of the adapted upper part."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (beta1, beta2), each in [0, 1)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    seed: int = 0
    """theta_init seed; combined with the refresh index, so each refresh draws a new shared init."""
    batch_size: int | None = None
    """At most this many windows per role (adaptation, evaluation) are used; None = all given."""
    metric: str = "relative"
    """Which value `RAPResult.delta` holds (feeds Eq. 7): "relative" (Delta L / L_base) or "absolute"."""
    min_docs: int = 8
    """Clusters with fewer adaptation or evaluation documents are flagged and not probed (neutral)."""
    reliability_threshold: float = 0.5
    """Below this split-half reliability the callback shrinks Eq. 7 toward neutral in proportion."""
    pad_id: int | None = None
    """Token id of right padding; excluded as a loss target. None = windows are fully packed."""
    vmap: bool = True
    """Probe same-shaped clusters together with torch.func.vmap on accelerators; False = one by one."""
    vmap_on_cpu: bool = False
    """Also use vmap on CPU (slower there, measured; kept for testing vmap without a GPU)."""
    vmap_max_bytes: float = 2e9
    """Estimated memory cap of one vmap chunk (parameters, grads, Adam moments, activations)."""

    def __post_init__(self) -> None:
        check_int("reset_depth", self.reset_depth, 0)
        check_choice("eval_split", self.eval_split, EVAL_SPLITS)
        if self.baseline is None:  # `baseline: null` in YAML
            self.baseline = "null"
        check_choice("baseline", self.baseline, BASELINES)
        check_int("epochs", self.epochs, 1)
        check_int("steps", self.steps, 1, optional=True)
        check_int("micro_batch", self.micro_batch, 1, optional=True)
        if isinstance(self.lr, str):
            if self.lr != "auto":
                raise ValueError(f"lr: expected a finite number > 0 or 'auto', got {self.lr!r}")
        else:
            check_number("lr", self.lr, 0.0, open_lo=True)
        check_number("auto_lr_nats", self.auto_lr_nats, 0.0, open_lo=True)
        check_number("weight_decay", self.weight_decay, 0.0)
        if len(self.betas) != 2 or not all(
            isinstance(b, int | float) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in self.betas
        ):
            raise ValueError(f"betas: expected two numbers in [0, 1), got {self.betas!r}")
        check_number("eps", self.eps, 0.0, open_lo=True)
        check_int("seed", self.seed, 0)
        check_int("batch_size", self.batch_size, 1, optional=True)
        check_choice("metric", self.metric, ("relative", "absolute"))
        check_int("min_docs", self.min_docs, 1)
        check_number("reliability_threshold", self.reliability_threshold, -1.0, hi=1.0)
        check_int("pad_id", self.pad_id, 0, optional=True)
        check_number("vmap_max_bytes", self.vmap_max_bytes, 0.0, open_lo=True)

    @classmethod
    def literal(cls, **overrides) -> RAPConfig:
        """The paper's text (Sec. 3.2): train and measure on the same batch, 10 full-batch AdamW
        steps at lr 3e-4, Delta L from L(theta_init). Kept for comparison (docs/rap.md)."""
        base = dict(eval_split="none", baseline="init", steps=10, micro_batch=None, lr=3e-4, min_docs=1)
        return cls(**{**base, **overrides})

    def num_steps(self, n_windows: int) -> int:
        """AdamW steps for `n_windows` adaptation windows."""
        if self.steps is not None:
            return self.steps
        mb = n_windows if self.micro_batch is None else min(self.micro_batch, n_windows)
        return self.epochs * -(-n_windows // max(mb, 1))


@dataclass
class ProbeBatch:
    """One cluster's probe windows (LongTensors (n, T), right-padded with `RAPConfig.pad_id`)."""

    adapt: torch.Tensor
    """Adaptation windows: the reset part is trained on these."""
    eval: torch.Tensor | None = None
    """Evaluation windows (other documents of the cluster): L_init, L_final and the baseline are
    measured here. None = the rows of `adapt` alternate between the two roles under
    eval_split "split"; under "none" the adaptation windows are measured."""
    eval_half: torch.Tensor | None = None
    """(n_eval,) 0/1: the split-half each evaluation window belongs to, by document. None = alternating rows."""
    adapt_docs: int | None = None
    """Documents behind the adaptation windows (for `min_docs`); None = one per window."""
    eval_docs: int | None = None


@dataclass
class RAPResult:
    """Per-cluster probe outcome; arrays are float64 [K], NaN where a cluster was not probed."""

    delta: np.ndarray
    """The metric chosen by `RAPConfig.metric` (what Eq. 7 consumes)."""
    delta_abs: np.ndarray
    delta_rel: np.ndarray
    loss_init: np.ndarray
    """L(theta_init) on the evaluation windows (~ln V)."""
    loss_final: np.ndarray
    loss_base: np.ndarray
    """The baseline Delta L is measured from (`RAPConfig.baseline`; = loss_init for "init")."""
    seconds: float
    flops: float
    """Estimated probe FLOPs over all clusters (all ranks together)."""
    delta_half: np.ndarray = field(default_factory=lambda: np.zeros((2, 0)))
    """[2, K]: `delta` measured on each half of the evaluation documents."""
    reliability: float = float("nan")
    """Spearman correlation across clusters of the two halves' delta (NaN: fewer than 3 clusters)."""
    flagged: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    """Clusters with probe data but fewer than `min_docs` adaptation or evaluation documents."""
    lr: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """The AdamW learning rate each cluster was adapted with."""
    ceiling: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """lr x steps x mean L1 norm of the head's input: about how far (nats) any logit could move."""

    def cost_fraction(self, train_flops_between_refreshes: float) -> float:
        """Probe FLOPs as a fraction of the training FLOPs spent between two refreshes."""
        if not train_flops_between_refreshes > 0:
            raise ValueError(
                f"train_flops_between_refreshes: expected > 0, got {train_flops_between_refreshes!r}"
            )
        return float(self.flops / train_flops_between_refreshes)

    def shrink(self, threshold: float) -> float:
        """Eq. 7's trust in this probe: 1 when reliability >= threshold, reliability / threshold
        below it (0 when the reliability is negative or unknown)."""
        r = self.reliability
        if not np.isfinite(r) or r <= 0:
            return 0.0
        return 1.0 if threshold <= 0 or r >= threshold else float(r / threshold)


def spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties) over the entries finite in both; NaN
    with fewer than 3 such entries or a constant side."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return float("nan")
    ra, rb = _ranks(a[ok]), _ranks(b[ok])
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=np.float64)
    for v in np.unique(x):  # ties share their average rank
        tie = x == v
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks
