"""Pure Python/torch loss-weighting rules (no Lightning): SoftAdapt and its variants,
Dynamic Weight Average, Random Loss Weighting, FAMO and uncertainty weighting.

The Lightning glue lives in :mod:`nequip_mtl.train.callbacks` (callbacks that set loss
coefficients) and :mod:`nequip_mtl.train` (training modules for the schemes with their own
parameters or that need the current step's per-task losses).
"""

from .common import SCALE_BY, mean_weights, normalise, scale_weights, softmax
from .dwa import dwa_weights
from .famo import FAMOLogits, famo_logit_gradient, famo_loss_weights
from .history import LossHistoryWeighting
from .rlw import RLW_DISTRIBUTIONS, sample_rlw_weights
from .softadapt import SOFTADAPT_VARIANTS, softadapt_weights
from .uncertainty import uncertainty_weighted_loss, uncertainty_weights

__all__ = [
    "SCALE_BY",
    "SOFTADAPT_VARIANTS",
    "RLW_DISTRIBUTIONS",
    "softmax",
    "normalise",
    "mean_weights",
    "scale_weights",
    "softadapt_weights",
    "dwa_weights",
    "LossHistoryWeighting",
    "sample_rlw_weights",
    "FAMOLogits",
    "famo_loss_weights",
    "famo_logit_gradient",
    "uncertainty_weighted_loss",
    "uncertainty_weights",
]
