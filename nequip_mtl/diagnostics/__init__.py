"""Pure-torch training diagnostics (no Lightning imports): gradient-conflict statistics
from task gradients or their Gram matrix, and loss coefficients calibrated from them."""

from .calibration import RULES, GradientCalibration
from .conflict import (
    ConflictStatistics,
    conflict_from_gradients,
    conflict_from_weights,
    conflict_metrics,
    conflict_statistics,
)

__all__ = [
    "ConflictStatistics",
    "conflict_statistics",
    "conflict_from_gradients",
    "conflict_from_weights",
    "conflict_metrics",
    "GradientCalibration",
    "RULES",
]
