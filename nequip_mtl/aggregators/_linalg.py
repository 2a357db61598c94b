"""Small, robust linear algebra on ``m x m`` Gram matrices (float64, any device)."""

from __future__ import annotations

import torch


def safe_norms(gram: torch.Tensor, eps: float) -> torch.Tensor:
    """Row norms from a Gram matrix, floored at ``eps`` like ``F.normalize``."""
    return gram.diagonal().clamp_min(0.0).sqrt().clamp_min(eps)


def psd_pinv_solve(gram: torch.Tensor, rhs: torch.Tensor, rtol: float) -> torch.Tensor:
    """Minimum-norm least-squares solution of ``gram @ c = rhs`` for a symmetric PSD ``gram``.

    Eigenvalues below ``rtol * max_eigenvalue`` are treated as zero, so a
    rank-deficient Gram matrix (parallel or duplicated task gradients) gives the
    pseudo-inverse solution instead of an overflow.
    """
    evals, evecs = torch.linalg.eigh(gram)
    cutoff = rtol * evals.abs().max().clamp_min(torch.finfo(gram.dtype).tiny)
    inv = torch.where(evals > cutoff, 1.0 / evals, torch.zeros_like(evals))
    return evecs @ (inv * (evecs.T @ rhs))


def default_rtol(num_tasks: int, source_dtype: torch.dtype) -> float:
    """Relative eigenvalue cut-off for a Gram matrix computed in ``source_dtype``.

    The Gram entries carry rounding errors of the dtype the gradients were
    accumulated in (float32 for most models), not of the float64 we solve in.
    """
    return 10.0 * max(num_tasks, 1) * torch.finfo(source_dtype).eps
