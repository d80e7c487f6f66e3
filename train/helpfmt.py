"""The help formatter of every `grip` command: each option's help ends with its default."""

from __future__ import annotations

import argparse


class DefaultsFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help unless it already names its default or the
    default is empty (None, False, [], ''): `--help` then documents what a run does unasked."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if (
            "default" in text
            or not action.option_strings
            or d is argparse.SUPPRESS
            or d is None
            or d is False
            or (isinstance(d, list | tuple | str) and not d)
        ):
            return text
        shown = " ".join(map(str, d)) if isinstance(d, list | tuple) else "%(default)s"
        return f"{text} (default: {shown})"


class RawDefaultsFormatter(argparse.RawDescriptionHelpFormatter, DefaultsFormatter):
    """DefaultsFormatter that keeps the description's line breaks (a docstring with a table)."""
