"""Values of `--set KEY=VALUE` command-line overrides (grip ablate, grip probe)."""

from __future__ import annotations

import re

# YAML 1.1 (PyYAML) reads "3e-4" and "1E5" as strings: a float needs a dot ("3.0e-4"). On a
# command line everyone writes 3e-4, so numbers in exponent notation are floats here.
_EXP_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def parse_value(raw: str):
    """The YAML value of `raw`, except that exponent notation without a dot is a float."""
    import yaml

    if _EXP_FLOAT.fullmatch(raw.strip()):
        return float(raw)
    return yaml.safe_load(raw)
