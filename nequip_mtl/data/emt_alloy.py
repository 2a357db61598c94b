"""Moved to :mod:`nequip_mtl.tools.emt_alloy` (this path still works, with a DeprecationWarning)."""

from .._moved import forward_module

__getattr__ = forward_module(__name__, "nequip_mtl.tools.emt_alloy")
