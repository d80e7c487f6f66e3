"""Every `grip ...` command shown in README.md and docs/*.md names a real command, only options
that command has, and config files that exist: the docs cannot drift from the CLI unnoticed.
(Each command's `--help` runs in tests/test_cli.py; here the parsers are read in-process.)"""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

import pytest

from train.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def shown_commands(text: str) -> list[str]:
    """`grip ...` lines of fenced code blocks (with `\\` continuations joined) and inline code spans."""
    out, in_code, buf = [], False, ""
    for line in text.splitlines():
        if line.strip().startswith("```"):
            in_code, buf = not in_code, ""
            continue
        if not in_code:
            continue
        s = line.split(" #")[0].strip()
        if not buf and not s.startswith("grip "):
            continue
        buf = f"{buf} {s}".strip()
        if buf.endswith("\\"):
            buf = buf[:-1].strip()
            continue
        out.append(buf)
        buf = ""
    out += [m.group(1) for m in re.finditer(r"`(grip [^`]+)`", text.replace("\n", " "))]
    return out


class _Parsed(Exception):
    pass


def parser_of(command: str, monkeypatch) -> argparse.ArgumentParser:
    """The argparse parser a `grip COMMAND` builds (its main stopped at parse_args)."""
    seen = {}

    def stop(self, *a, **k):
        seen["p"] = self
        raise _Parsed

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", stop)
        with pytest.raises(_Parsed):
            importlib.import_module(COMMANDS[command][0]).main([])
    return seen["p"]


CASES = [(doc, cmd) for doc in DOCS for cmd in shown_commands(doc.read_text())]


def test_the_docs_show_commands():
    assert len(CASES) > 50 and {c.split()[1] for _, c in CASES} >= set(COMMANDS) - {"corpus"}


def test_every_shown_command_exists_with_its_options_and_files(monkeypatch):
    parsers: dict[str, argparse.ArgumentParser] = {}
    problems = []
    for doc, cmd in CASES:
        words = cmd.replace("[", " ").replace("]", " ").split()
        name = words[1]
        if name == "COMMAND" or name.endswith(":"):  # the generic form; a quoted error message
            continue
        where = f"{doc.relative_to(ROOT)}: `{cmd}`"
        if name not in COMMANDS:
            problems.append(f"{where}: no command {name!r}")
            continue
        for w in words[2:]:
            path = w.split("=", 1)[-1]
            if path.startswith("configs/") and not any(ch in path for ch in "*<>") and "X." not in path:
                if not (ROOT / path).exists():
                    problems.append(f"{where}: {path} does not exist")
        if name == "train":  # LightningCLI: its options are the YAML's keys
            continue
        if name not in parsers:
            parsers[name] = parser_of(name, monkeypatch)
        known = set(parsers[name]._option_string_actions)
        problems += [
            f"{where}: {w} is not an option"
            for w in words[2:]
            if w.startswith("--") and w.split("=")[0] not in known
        ]
    assert problems == [], "\n".join(problems)


def test_every_option_with_a_default_shows_it_in_help(monkeypatch):
    missing = []
    for name in COMMANDS:
        if name == "train":  # LightningCLI prints its defaults itself
            continue
        p = parser_of(name, monkeypatch)
        fmt = p._get_formatter()
        for a in p._actions:
            if a.option_strings and a.help != argparse.SUPPRESS and a.dest != "help":
                d = a.default
                if (
                    d not in (None, False, argparse.SUPPRESS)
                    and d != []
                    and "default" not in fmt._get_help_string(a)
                ):
                    missing.append(f"grip {name} {a.option_strings[0]} (default {d!r})")
    assert missing == [], missing
