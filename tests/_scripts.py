"""The console scripts as ``pyproject.toml`` declares them, callable in this process (the
installed copy's entry-point metadata may predate the file)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


def console_scripts() -> dict[str, str]:
    """``{command: "module:function"}`` of ``[project.scripts]``."""
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def console_script(name: str) -> Callable[[list[str] | None], int]:
    """The function the console script ``name`` calls."""
    module, _, attr = console_scripts()[name].partition(":")
    return getattr(importlib.import_module(module), attr)
