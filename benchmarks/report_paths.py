"""Paths as committed benchmark results show them: relative to the repository root.

A result file records what it was run on (model, data, the command line); an absolute path
there names the machine that ran it and means nothing on another checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def repo_relative(path: str | os.PathLike) -> str:
    """`path` relative to the repository root when it lies inside it, else as given."""
    absolute = Path(os.path.abspath(path))
    return str(absolute.relative_to(REPO)) if absolute.is_relative_to(REPO) else str(path)


def command_line(script: str, argv: list[str]) -> str:
    """The command as run, with every absolute path inside the repository made relative."""
    return " ".join([script, *(repo_relative(arg) if os.path.isabs(arg) else arg for arg in argv)])
