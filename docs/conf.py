"""Sphinx configuration for the nequip-mtl documentation.

Build (warnings are errors)::

    .venv/bin/sphinx-build -W -b html docs docs/_build/html
"""

from __future__ import annotations

import os
import sys
from importlib.metadata import PackageNotFoundError, version

# document the checkout this file lives in, even without an editable install
sys.path.insert(0, os.path.abspath(".."))
# autodoc imports nequip/torch; keep that import cheap on small shared machines
os.environ.setdefault("OMP_NUM_THREADS", "1")

project = "nequip-mtl"
author = "nequip-mtl developers"
copyright = "nequip-mtl developers"
try:
    release = version("nequip-mtl")
except PackageNotFoundError:  # pragma: no cover - docs built from a bare checkout
    release = "0.1.0"
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# --- MyST ---
myst_enable_extensions = ["colon_fence", "deflist", "dollarmath"]
myst_heading_anchors = 3

# --- autodoc / napoleon (Google-style "Args:" docstrings, like nequip) ---
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# --- HTML ---
html_theme = "furo"
html_title = "nequip-mtl"

# --- autosummary: one generated page per public class / function (docs/generated/) ---
autosummary_generate = True
