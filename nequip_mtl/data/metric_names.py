"""Moved to :mod:`nequip_mtl.train.callbacks.dataset_metric_names` (this path still works, with a
DeprecationWarning)."""

from .._moved import forward_module

__getattr__ = forward_module(__name__, "nequip_mtl.train.callbacks.dataset_metric_names")
