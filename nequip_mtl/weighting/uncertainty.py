"""Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla 2018, "Multi-Task Learning
Using Uncertainty to Weigh Losses for Scene Geometry and Semantics", CVPR).

With learnable log-variances ``s_k = log sigma_k^2`` the regression form of the
objective is ``sum_k 0.5 exp(-s_k) L_k + 0.5 s_k``. For fixed losses its minimum over
``s_k`` is at ``exp(s_k) = L_k``, so the effective weight ``0.5 exp(-s_k)`` tends to
``1 / (2 L_k)``: tasks with a large irreducible loss (noisy labels) are down-weighted.
"""

from __future__ import annotations

import torch


def uncertainty_weights(log_variances: torch.Tensor) -> torch.Tensor:
    """Effective multipliers ``0.5 exp(-s_k)`` of the raw losses."""
    return 0.5 * torch.exp(-log_variances)


def uncertainty_weighted_loss(losses: torch.Tensor, log_variances: torch.Tensor) -> torch.Tensor:
    """``sum_k 0.5 exp(-s_k) L_k + 0.5 s_k``."""
    s = log_variances.to(losses.dtype)
    return (0.5 * torch.exp(-s) * losses + 0.5 * s).sum()
