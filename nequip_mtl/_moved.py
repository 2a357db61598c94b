"""Old import paths of moved modules and names, kept working with a deprecation warning.

Configs and checkpoints hold ``_target_`` strings (``nequip_mtl.data.emt_alloy.EMTAlloy...``);
when a module moves, its old path stays importable as a small stub that forwards every
attribute to the new module and warns once per name, naming the new path:

.. code-block:: python

    # nequip_mtl/train/famo.py, after the module moved to nequip_mtl/train/famo_module.py
    from .._moved import forward_module

    __getattr__ = forward_module(__name__, "nequip_mtl.train.famo_module")

A name that moved out of a package that still exists is forwarded by :func:`forward_names`
(``__getattr__ = forward_names(__name__, {"OldName": "new.module:NewName"})``).
Hydra's ``_target_`` resolution imports the old module and reads the attribute, so both
forms keep every old ``_target_`` working.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

#: every forwarded old path -> its new path (filled as stubs are imported; for tests and docs)
MOVED: dict[str, str] = {}


def _warn(old: str, new: str) -> None:
    warnings.warn(
        f"`{old}` has moved to `{new}`; the old path still works but will be removed in a "
        "future release: update the `_target_` (or import) to the new path",
        DeprecationWarning,
        stacklevel=3,
    )


def forward_module(old_module: str, new_module: str) -> Callable[[str], Any]:
    """A module ``__getattr__`` that forwards every public attribute of the old module
    ``old_module`` to ``new_module``, with a :class:`DeprecationWarning` naming the new path."""
    MOVED[old_module] = new_module

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        target = importlib.import_module(new_module)
        try:
            value = getattr(target, name)
        except AttributeError:
            raise AttributeError(
                f"module {old_module!r} (moved to {new_module!r}) has no attribute {name!r}"
            ) from None
        _warn(f"{old_module}.{name}", f"{new_module}.{name}")
        return value

    return __getattr__


def forward_names(old_module: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for names that left ``old_module``: ``names`` maps each old
    name to ``"new.module:NewName"``."""
    for old, new in names.items():
        MOVED[f"{old_module}.{old}"] = new.replace(":", ".")

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {old_module!r} has no attribute {name!r}")
        module, _, attr = names[name].partition(":")
        value = getattr(importlib.import_module(module), attr)
        _warn(f"{old_module}.{name}", f"{module}.{attr}")
        return value

    return __getattr__
