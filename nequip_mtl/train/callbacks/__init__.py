"""Lightning callbacks that schedule, adapt and monitor loss coefficients.

Drop-in (and corrected) versions of nequip's ``LossCoefficientScheduler``,
``LinearLossCoefficientScheduler``, ``LossCoefficientMonitor`` and ``SoftAdapt``, plus
Dynamic Weight Average, Random Loss Weighting and calibrate-then-freeze coefficients
(:class:`CalibrateLossCoefficients`), and validation/test metrics logged under their
datasets' names (:class:`DatasetMetricNames`). Every coefficient change goes through
:func:`nequip_mtl.train.coefficients.update_coeffs` (strict, partial, normalised).
"""

from .calibrate import CalibrateLossCoefficients
from .dataset_metric_names import DatasetMetricNames
from .dwa import DynamicWeightAverage
from .forgetting_budget import ForgettingBudget
from .gradient_conflict import GradientConflictMonitor
from .label_check import CheckTrainingLabels
from .linear_loss_coeff_scheduler import LinearLossCoefficientScheduler
from .loss_coeff_monitor import LossCoefficientMonitor
from .loss_coeff_scheduler import LossCoefficientScheduler
from .rlw import RandomLossWeighting
from .softadapt import SoftAdapt

__all__ = [
    "LossCoefficientScheduler",
    "LinearLossCoefficientScheduler",
    "LossCoefficientMonitor",
    "SoftAdapt",
    "DynamicWeightAverage",
    "RandomLossWeighting",
    "GradientConflictMonitor",
    "CalibrateLossCoefficients",
    "ForgettingBudget",
    "CheckTrainingLabels",
    "DatasetMetricNames",
]
