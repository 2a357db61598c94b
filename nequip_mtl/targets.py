"""The object a dotted ``_target_`` string names (pure Python: no Hydra, no nequip).

One locator for the package: the aggregator builder
(:func:`nequip_mtl.train.aggregator_spec.build_aggregator`) resolves a user's
``_target_`` with it, and so can code that must not import Hydra (a packaged model).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["locate"]


def locate(target: str) -> Any:
    """The object a dotted ``_target_`` names, or ``None`` when there is none.

    The longest importable module prefix is imported and the rest is read as attributes,
    so ``package.module.Class`` and ``package.module.Class.method`` both resolve. Unlike
    Hydra's ``get_class`` it logs nothing and raises nothing for a missing name, so the
    caller writes the one error the user sees. A module that exists but fails to import
    (one of *its* imports is missing, or it raises) is not hidden: that error propagates.
    """
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name and not (module + ".").startswith(err.name + "."):
                raise  # the module exists, but something it imports does not
            continue
        try:
            for part in parts[i:]:
                obj = getattr(obj, part)
        except AttributeError:
            return None
        return obj
    return None
