"""The training tokenizer: load one, or train a byte-level BPE on the corpus, and count l(x).

Byte-level BPE (the GPT-2 / Qwen family) never produces an unknown token, so every
document, whatever its bytes, has a well-defined length. Training uses HF `tokenizers`
(Rust, multi-threaded). The one special token `<|endoftext|>` is the EOS that the packer
inserts between documents; shards store a document's ids *without* it, and l(x) counts
the document's own tokens only.

Cost: training reads every document once more; on a huge corpus pass a tokenizer
(`tokenizer_path`) or train on a sample (`train_docs`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from grip_loop.workdir import file_sha256  # noqa: F401 (callers use tk.file_sha256)

EOS_TOKEN = "<|endoftext|>"


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2, progress: bool = False
):
    """A byte-level BPE tokenizer trained on `texts`, with `EOS_TOKEN` as special token id 0.
    `progress`: the trainer's bars on a terminal; elsewhere (a log) a line when it starts and
    one when it ends."""
    import sys
    import time

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise ValueError(f"vocab_size: must be > 257 (256 bytes + EOS), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress and sys.stderr.isatty(),
    )
    n = len(texts) if hasattr(texts, "__len__") else None
    if progress:
        on = f" on {n} documents" if n is not None else ""
        print(f"tokenize: training a byte-level BPE (vocab_size {vocab_size}){on}", flush=True)
    t0 = time.perf_counter()
    tok.train_from_iterator(texts, trainer=trainer, length=n)
    if progress:
        print(f"tokenize: BPE trained in {time.perf_counter() - t0:.1f} s ({tok.get_vocab_size()} tokens)")
    return tok


def load_tokenizer(path: str | os.PathLike):
    """An HF `tokenizer.json` file (or a directory holding one); ValueError naming the file otherwise."""
    from tokenizers import Tokenizer

    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise ValueError(
            f"tokenizer: {p} not found; pass an HF tokenizer.json or leave it unset to train one"
        )
    try:
        return Tokenizer.from_file(str(p))
    except Exception as exc:
        raise ValueError(f"tokenizer: {p} is not an HF tokenizers file ({exc})") from None


def eos_id(tok) -> int:
    """Id of the EOS token: `<|endoftext|>`, else `</s>` / `<eos>`; ValueError if none exists."""
    for name in (EOS_TOKEN, "</s>", "<eos>", "<|im_end|>"):
        i = tok.token_to_id(name)
        if i is not None:
            return int(i)
    raise ValueError("tokenizer: has no EOS token (<|endoftext|>, </s> or <eos>); add one or train a new one")


def encode(tok, texts: Sequence[str], batch_size: int = 1024) -> list[np.ndarray]:
    """Token ids of each text (no special tokens added), as uint32 arrays."""
    out: list[np.ndarray] = []
    for i in range(0, len(texts), batch_size):
        enc = tok.encode_batch(list(texts[i : i + batch_size]), add_special_tokens=False)
        out.extend(np.asarray(e.ids, dtype=np.uint32) for e in enc)
    return out
