"""A controlled learnability testbed: a JSONL corpus whose clusters have a known order.

The probe's job is to rank clusters by how much the model's features let a fresh head
predict them. Nothing in a natural corpus says what the right ranking is, so this module
builds one where it is known by construction, from real installed Python code (the standard
library, the same files on every machine with this Python):

=================  =====================================================  ==========
group              documents                                              true rank
=================  =====================================================  ==========
``repeated``       one real top-level function/class repeated to fill the   1 (most)
                   document: almost every token follows from context
``code``           real code (runs of whole top-level statements)          2
``code-noise05``   real code, 5% of its characters (newlines excepted)      3
                   replaced by uniform random printable characters
``code-noise15``   15% replaced                                            4
``code-noise40``   40% replaced                                            5
``noise``          uniformly random printable characters (a newline every  6 (least)
                   30-90): nothing to learn beyond the character frequencies
=================  =====================================================  ==========

Replacing characters at random destroys information at every level (which identifier, which
operator, the layout, the tokenisation itself), so each step down is less learnable whatever
the model's features are: the order holds for a weak model as for a strong one. Two gentler
corruptions were tried first and dropped because their order did *not* hold for a weak model:
replacing whole identifiers by other real identifiers (a 100-step model does not use which
identifier it is, so clean code and 10%/30%-corrupted code were ties decided by which source
files each group got), and replacing identifier characters by random letters (a new,
learnable pattern: after a random letter comes another; the probe then ranked 10%-corrupted
code above clean code in every seed). Levels above ~40% are indistinguishable from noise for
the tiny model, so the levels are 5/15/40%.

Quality: corrupted code does not parse, and the offline judge scores it as what it is, low
quality (Q_k ~0.2-0.25 against ~0.78 for real code): the Eq. 7 gate closes for the four
``corrupted`` groups and stays open for the two ``clean`` ones. So the testbed exercises both
halves of Eq. 7: the ranking decides between the clean groups (repeated text, the most
learnable, should give budget to real code), and the gate keeps the probe's (correctly) tiny
drops on corrupted text and noise from handing those groups more budget.

Every group draws its documents from its own source files (disjoint across groups), so
what the model learns from one group does not leak into another's probe. Documents carry
``group`` (the cluster: `grip prepare --cluster-by group`), ``lang`` ("python"), ``path``
(``<group>/<stdlib file>``, what tables show as examples) and ``source`` (the file).
`truth.json` holds the ground truth: ``{"field": "group", "rank": {group: rank}, "clean":
[...], "corrupted": [...]}``.
"""

from __future__ import annotations

import json
import os
import string
import sysconfig
from pathlib import Path

import numpy as np

#: (group, fraction of characters replaced; None = a special generator), in true order.
GROUPS: tuple[tuple[str, float | None], ...] = (
    ("repeated", None),
    ("code", 0.0),
    ("code-noise05", 0.05),
    ("code-noise15", 0.15),
    ("code-noise40", 0.40),
    ("noise", None),
)
#: Groups of corrupted or random text: low quality for the judge, so the Eq. 7 gate closes for
#: them and the loop must not give them budget; the others are real code.
CORRUPTED_GROUPS = ("code-noise05", "code-noise15", "code-noise40", "noise")
CLEAN_GROUPS = ("repeated", "code")
ALPHABET = string.ascii_letters + string.digits + string.punctuation + " "


def _stdlib_files(max_bytes: int = 65536) -> list[Path]:
    from grip_loop.default_corpus import _walk

    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(_walk(root, {".py"}, max_bytes))


def _chunks(text: str, size: int) -> list[str]:
    """Runs of consecutive top-level statements (functions, classes, ...) of about `size`
    characters: every chunk is complete, parseable code, as a real file is."""
    import ast

    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    lines = text.splitlines(keepends=True)
    out, start, end = [], None, None
    for node in tree.body:
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
        start = first if start is None else start
        end = node.end_lineno
        piece = "".join(lines[start:end])
        if len(piece) >= size:
            if piece.strip() and len(piece) <= 2 * size:
                out.append(piece if piece.endswith("\n") else piece + "\n")
            start = None
    return out


def _corrupt(text: str, frac: float, rng: np.random.Generator) -> str:
    """Replace `frac` of the characters (newlines excepted) by uniform draws from ALPHABET."""
    chars = np.array(list(text))
    can = np.flatnonzero(chars != "\n")
    pick = rng.choice(can, size=int(round(frac * len(can))), replace=False) if len(can) else can
    chars[pick] = np.array(list(ALPHABET))[rng.integers(0, len(ALPHABET), size=len(pick))]
    return "".join(chars.tolist())


def _noise(size: int, rng: np.random.Generator) -> str:
    lines, n = [], 0
    while n < size:
        k = int(rng.integers(30, 90))
        lines.append("".join(np.array(list(ALPHABET))[rng.integers(0, len(ALPHABET), size=k)].tolist()))
        n += k + 1
    return "\n".join(lines) + "\n"


def _repeated(text: str, size: int) -> str:
    """One top-level statement of the chunk (a function, a class, ...; the first of 80 to
    size/2 characters if any) repeated to about `size` characters: it still parses."""
    stmts = _chunks(text, 1) or [text]
    fit = [x for x in stmts if 80 <= len(x) <= size // 2]
    snippet = (fit or stmts)[0]
    return snippet * max(2, -(-size // len(snippet)))


def build_testbed(
    out: str | os.PathLike,
    *,
    docs_per_group: int = 160,
    doc_chars: int = 1500,
    seed: int = 0,
    files: list[Path] | None = None,
) -> dict:
    """Write `<out>/corpus.jsonl` and `<out>/truth.json`; returns the truth dict.

    `docs_per_group` documents of about `doc_chars` characters per group (GROUPS). Source
    files are shuffled with `seed` and dealt round-robin to the groups (disjoint), then cut
    into chunks; a group that runs out of chunks raises (give more files or fewer docs).
    """
    if docs_per_group < 1 or doc_chars < 100:
        raise ValueError(f"docs_per_group >= 1 and doc_chars >= 100, got {docs_per_group}, {doc_chars}")
    files_are_stdlib, stdlib = files is None, sysconfig.get_paths()["stdlib"]
    files = _stdlib_files() if files is None else [Path(f) for f in files]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(files))
    per_group: dict[str, list[tuple[str, str]]] = {g: [] for g, _ in GROUPS}
    names = [g for g, _ in GROUPS]
    gi = 0
    for i in order:
        if all(len(v) >= docs_per_group for v in per_group.values()):
            break
        # deal files round-robin among the groups that still need chunks
        while len(per_group[names[gi % len(names)]]) >= docs_per_group:
            gi += 1
        group = names[gi % len(names)]
        gi += 1
        try:
            text = files[i].read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        need = docs_per_group - len(per_group[group])
        per_group[group] += [(str(files[i]), c) for c in _chunks(text, doc_chars)[:need]]
    short = {g: len(v) for g, v in per_group.items() if len(v) < docs_per_group}
    if short:
        raise ValueError(
            f"testbed: not enough source text for {docs_per_group} documents per group (got {short}); "
            "lower docs_per_group or doc_chars"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "corpus.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        for group, frac in GROUPS:
            grng = np.random.default_rng([seed, names.index(group)])
            for j, (src, chunk) in enumerate(per_group[group]):
                if group == "repeated":
                    text = _repeated(chunk, doc_chars)
                elif group == "noise":
                    text = _noise(len(chunk), grng)
                else:
                    text = _corrupt(chunk, float(frac), grng) if frac else chunk
                rel = os.path.relpath(src, stdlib) if files_are_stdlib else Path(src).name
                rec = {
                    "id": f"{group}/{j:05d}",
                    "group": group,
                    "lang": "python",
                    "path": f"{group}/{rel}",
                    "source": src,
                    "text": text,
                }
                fh.write(json.dumps(rec) + "\n")
    os.replace(tmp, out / "corpus.jsonl")
    truth = {
        "field": "group",
        "rank": {g: i + 1 for i, (g, _) in enumerate(GROUPS)},
        "clean": list(CLEAN_GROUPS),
        "corrupted": list(CORRUPTED_GROUPS),
        "docs_per_group": docs_per_group,
        "doc_chars": doc_chars,
        "seed": seed,
    }
    (out / "truth.json").write_text(json.dumps(truth, indent=1) + "\n")
    return truth
