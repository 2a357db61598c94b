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
# Class pages list only the members a class defines itself (no `inherited-members`: the
# ~100 members of torch.nn.Module / LightningModule / nequip's module are linked through
# the base classes instead), and an undocumented override (a Lightning hook) does not
# borrow its parent's docstring and so is not listed either.
autodoc_inherit_docstrings = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# --- HTML ---
html_theme = "furo"
html_title = "nequip-mtl"

# --- autosummary: one generated page per public class / function (docs/generated/) ---
autosummary_generate = True
templates_path = ["_templates"]  # _templates/autosummary/class.rst: own members only

# --- links to torch, Lightning and nequip, resolved offline ---
# intersphinx would download the projects' inventories at build time; instead, a Python
# reference that Sphinx cannot resolve inside these docs (a base class, a type hint, a
# :class: role) and that names an object of torch, Lightning or nequip becomes a link to
# that object's page in the project's online documentation. The object is imported to
# find its public name (``torch.nn.modules.module.Module`` -> ``torch.nn.Module``); no
# network access is needed, and references that are not found stay plain text.

_EXTERNAL = {
    "torch": (
        "https://docs.pytorch.org/docs/stable/generated/{name}.html",
        ["torch", "torch.nn", "torch.optim", "torch.optim.lr_scheduler", "torch.utils.data"],
    ),
    "lightning": (
        "https://lightning.ai/docs/pytorch/stable/api/{name}.html",
        [
            "lightning.pytorch.callbacks",
            "lightning.pytorch.loggers",
            "lightning.pytorch.strategies",
            "lightning.pytorch.core",
            "lightning.pytorch.trainer.trainer",
        ],
    ),
    "nequip": (
        "https://nequip.readthedocs.io/en/latest/search.html?q={short}",
        ["nequip.train", "nequip.train.callbacks", "nequip.data", "nequip.model", "nequip.nn"],
    ),
}
_EXTERNAL["pytorch_lightning"] = _EXTERNAL["lightning"]
# nequip documents its training modules on one page, with an anchor per class
_NEQUIP_MODULES_PAGE = "https://nequip.readthedocs.io/en/latest/api/lightning_module.html#{name}"
_NEQUIP_MODULES = {
    "NequIPLightningModule",
    "EMALightningModule",
    "ConFIGLightningModule",
    "EMAConFIGLightningModule",
    "ScheduleFreeLightningModule",
}


def _import_object(target: str):
    import importlib

    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def external_url(target: str) -> str | None:
    """The online documentation page of a torch / Lightning / nequip object, or None."""
    import importlib

    project = target.split(".", 1)[0]
    if project not in _EXTERNAL or "." not in target:
        return None
    obj = _import_object(target)
    if obj is None:
        return None
    template, public_modules = _EXTERNAL[project]
    short = target.rsplit(".", 1)[-1]
    for module_name in public_modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if getattr(module, short, None) is obj:
            name = f"{module_name}.{short}"
            if project == "nequip" and module_name == "nequip.train" and short in _NEQUIP_MODULES:
                return _NEQUIP_MODULES_PAGE.format(name=name)
            return template.format(name=name, short=short)
    return None


def _resolve_external(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    url = external_url(node.get("reftarget", ""))
    if url is None:
        return None
    from docutils import nodes

    reference = nodes.reference("", "", internal=False, refuri=url, reftitle=node["reftarget"])
    reference.append(contnode)
    return reference


def setup(app):
    app.connect("missing-reference", _resolve_external)
