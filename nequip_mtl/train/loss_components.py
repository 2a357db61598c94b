"""Moved: the forward pass and losses to :mod:`nequip_mtl.train.forward_losses`, the active
components to :mod:`nequip_mtl.train.coefficients` (this path still works, with a
DeprecationWarning)."""

from .._moved import forward_names

__getattr__ = forward_names(
    __name__,
    {
        "training_loss_components": "nequip_mtl.train.forward_losses:training_loss_components",
        "training_losses_and_output": "nequip_mtl.train.forward_losses:training_losses_and_output",
        "active_indices": "nequip_mtl.train.coefficients:active_indices",
        "active_names": "nequip_mtl.train.coefficients:active_names",
        "positive_active_coeffs": "nequip_mtl.train.coefficients:positive_active_coeffs",
    },
)
