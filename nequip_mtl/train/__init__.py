"""Lightning glue: training modules and loss managers for multitask NequIP training."""

from .coefficients import update_coeffs
from .config_modules import ConFIGLightningModule, EMAConFIGLightningModule
from .dataset_modifier import DatasetModifier
from .famo_module import FAMOLightningModule
from .label_checks import check_training_labels, nonfinite_model_state
from .metrics_manager import (
    EnergyForceLoss,
    EnergyForceStressLoss,
    EnergyOnlyLoss,
    MultitaskMetricsManager,
)
from .multitask import EMAMultitaskLightningModule, MultitaskLightningModule
from .per_dataset import PerDatasetLoss, PerDatasetMetrics
from .per_dataset_manager import PerDatasetMetricsManager
from .uncertainty_module import UncertaintyWeightingLightningModule

__all__ = [
    "update_coeffs",
    "MultitaskLightningModule",
    "EMAMultitaskLightningModule",
    "ConFIGLightningModule",
    "EMAConFIGLightningModule",
    "UncertaintyWeightingLightningModule",
    "FAMOLightningModule",
    "MultitaskMetricsManager",
    "EnergyForceLoss",
    "EnergyForceStressLoss",
    "EnergyOnlyLoss",
    "DatasetModifier",
    "PerDatasetLoss",
    "PerDatasetMetrics",
    "PerDatasetMetricsManager",
    "check_training_labels",
    "nonfinite_model_state",
]
