"""Where the grammar and kernel templates live, in a checkout and in a wheel.

The wheel carries `grammar/` and `kernels/` inside the package (as `_grammar`
and `_kernels`); an editable install or a plain checkout reads them from the
repository root beside the package.
"""
from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def resource_dir(name: str) -> Path:
    """The directory `grammar` or `kernels`, wherever this install keeps it."""
    for candidate in (_PACKAGE / f"_{name}", _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"convdsl is missing its {name}/ directory (broken install?)")


def grammar_path() -> Path:
    return resource_dir("grammar") / "convdsl.lark"
