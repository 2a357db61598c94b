"""Moved to :mod:`nequip_mtl.train.famo_module` (this path still works, with a DeprecationWarning)."""

from .._moved import forward_module

__getattr__ = forward_module(__name__, "nequip_mtl.train.famo_module")
