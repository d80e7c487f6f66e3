"""LightningCLI entry: `grip train --config configs/train/cpu-tiny.yaml` (= `python -m train.main ...`).

The first argument may be a Lightning subcommand (fit, validate); without one, `fit` runs.
With no --config at all, the embedded default configs/train/cpu-tiny.yaml is used.
Weights & Biases runs offline unless WANDB_MODE says otherwise (sync later with `wandb sync`).

The run folder: `trainer.default_root_dir` is the one setting that places a run. In a logger's
`save_dir`, a callback's `dirpath` (ModelCheckpoint) or any other string init argument of a
logger or callback, the text `{default_root_dir}` stands for it, so
`grip train --config configs/train/cpu-tiny-grip.yaml --trainer.default_root_dir=runs/try20`
moves the CSV logs, W&B run, checkpoints and the GRIP files (grip_history.jsonl, grip_probe.csv,
PNG) together. A hard-coded path outside the run folder is kept, with a one-line warning.

The vocabulary: `model.vocab_size: null` (the GRIP configs) takes the prepared tokenizer's
vocabulary from the corpus's manifest.json; a number overrides it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "train" / "cpu-tiny.yaml"
SUBCOMMANDS = ("fit", "validate", "test", "predict")
ROOT_TOKEN = "{default_root_dir}"


def place_run_paths(trainer_cfg, warn=print) -> list[str]:
    """Replace `{default_root_dir}` in the string init arguments of `trainer_cfg.logger` and
    `trainer_cfg.callbacks` (jsonargparse Namespaces or dicts) by `trainer_cfg.default_root_dir`;
    warn once per path that is hard-coded outside the run folder. Returns the warnings."""
    root = _get(trainer_cfg, "default_root_dir") or "."
    root_res = Path(root).resolve()
    notes: list[str] = []
    groups = (("logger", _get(trainer_cfg, "logger")), ("callbacks", _get(trainer_cfg, "callbacks")))
    for group, items in groups:
        if not isinstance(items, list):
            items = [items] if items not in (None, True, False) else []
        for i, item in enumerate(items):
            args = _get(item, "init_args")
            if args is None:
                continue
            for key in ("save_dir", "dirpath", *[k for k in _keys(args) if k not in ("save_dir", "dirpath")]):
                v = _get(args, key)
                if not isinstance(v, str):
                    continue
                if ROOT_TOKEN in v:
                    _put(args, key, v.replace(ROOT_TOKEN, str(root)))
                elif key in ("save_dir", "dirpath") and not _inside(Path(v).resolve(), root_res):
                    notes.append(
                        f"trainer.{group}[{i}].init_args.{key}={v} is outside trainer.default_root_dir={root}: "
                        f"this output will not move with the run folder (write {ROOT_TOKEN!r} in the YAML)"
                    )
    for n in notes:
        warn(f"warning: {n}")
    return notes


def vocab_from_manifest(cfg) -> int | None:
    """`model.vocab_size: null` with a GripIterableDataset: the prepared tokenizer's vocabulary
    (manifest.json `tokenizer.vocab_size`) becomes the model's. A number given in the YAML or on
    the command line is kept (GripCallback checks that it covers the tokenizer). Returns the
    vocabulary set, or None when nothing was changed."""
    model, data = _get(cfg, "model"), _get(cfg, "data")
    if model is None or _get(model, "vocab_size") is not None:
        return None
    ds = _get(data, "dataset")
    if not str(_get(ds, "class_path") or "").endswith("GripIterableDataset"):
        return None
    root = _get(_get(ds, "init_args"), "root")
    if root is None:
        return None
    from grip_loop.manifest import load_manifest

    vocab = int(load_manifest(root, check_files=False).tokenizer["vocab_size"])
    _put(model, "vocab_size", vocab)
    return vocab


def show_logs() -> None:
    """INFO lines of the project's loggers (`grip_loop.*`: probe start, the probe table, budget
    versions; `train.*`: the model summary, progress lines in a log) on stderr, once."""
    import logging

    class _Stderr(logging.StreamHandler):
        """Writes to whatever sys.stderr is at the time (a test's capture may replace it)."""

        @property
        def stream(self):
            return sys.stderr

        @stream.setter
        def stream(self, value) -> None:
            pass

    for name in ("grip_loop", "train"):
        lg = logging.getLogger(name)
        if not lg.handlers:
            h = _Stderr()
            h.setFormatter(logging.Formatter("%(message)s"))
            lg.addHandler(h)
            lg.setLevel(logging.INFO)
            lg.propagate = False


def _inside(p: Path, root: Path) -> bool:
    return p == root or root in p.parents


def _get(obj, key):
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)


def _put(obj, key, value) -> None:
    if isinstance(obj, dict):
        obj[key] = value
    else:
        setattr(obj, key, value)


def _keys(obj) -> list[str]:
    if isinstance(obj, dict):
        return list(obj)
    return list(vars(obj)) if hasattr(obj, "__dict__") else []


def build_cli(argv: list[str], run: bool = True):
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from jsonargparse import set_parsing_settings
    from lightning.pytorch.cli import LightningCLI

    from train import quiet

    # `--help` shows each config dataclass field's attribute docstring (RAPConfig, BudgetConfig, ...)
    set_parsing_settings(docstring_parse_attribute_docstrings=True)

    from train.data import GripDataModule
    from train.module import MoELM
    from train.progress import progress_callbacks

    quiet.install()
    show_logs()

    class GripCLI(LightningCLI):
        def before_instantiate_classes(self) -> None:
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            place_run_paths(cfg.trainer, warn=lambda m: print(m, file=sys.stderr))
            vocab_from_manifest(cfg)
            loggers = cfg.trainer.logger if isinstance(cfg.trainer.logger, list) else [cfg.trainer.logger]
            for lg in loggers:
                if "Wandb" in str(_get(lg, "class_path") or ""):
                    quiet.quiet_wandb()
                    save_dir = _get(_get(lg, "init_args"), "save_dir")
                    if save_dir and run:  # W&B looks for git in it before Lightning creates it
                        Path(save_dir).mkdir(parents=True, exist_ok=True)

        def _instantiate_trainer(self, config, callbacks):
            given = config.get("callbacks") or []
            existing = list(callbacks) + (list(given) if isinstance(given, list) else [given])
            return super()._instantiate_trainer(
                config, list(callbacks) + progress_callbacks(config, existing)
            )

    argv = list(argv)
    if run and (not argv or argv[0] not in SUBCOMMANDS):
        argv = ["fit", *argv]
    if not any(a == "--config" or a.startswith("--config=") for a in argv) and "--help" not in argv:
        if not DEFAULT_CONFIG.is_file():
            raise SystemExit(f"no --config given and the default {DEFAULT_CONFIG} is missing")
        argv[1 if run else 0 : 1 if run else 0] = ["--config", str(DEFAULT_CONFIG)]
    return GripCLI(
        MoELM,
        GripDataModule,
        args=argv,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    # LightningCLI warns when it gets both args= and a non-empty sys.argv; the args are ours now.
    sys.argv = sys.argv[:1]
    try:
        build_cli(argv)
    finally:
        # Tear the process group down before interpreter exit: a gloo group left alive can
        # abort the process at exit ("terminate called without an active exception").
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
