"""Lightning glue: training modules and loss managers for multitask NequIP training."""

from .coefficients import update_coeffs
from .config import ConFIGLightningModule, EMAConFIGLightningModule
from .multitask import EMAMultitaskLightningModule, MultitaskLightningModule

__all__ = [
    "update_coeffs",
    "MultitaskLightningModule",
    "EMAMultitaskLightningModule",
    "ConFIGLightningModule",
    "EMAConFIGLightningModule",
]

# --- callbacks/weighting exports (owned by the loss-coefficient work; keep this block) ---
# --- end callbacks/weighting exports ---
