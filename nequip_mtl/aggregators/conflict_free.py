"""ConFIG: conflict-free inverse gradients (Liu et al., arXiv 2408.11104)."""

from __future__ import annotations

import torch

from ._linalg import default_rtol, psd_pinv_solve, safe_norms, symmetrized
from .base import GramAggregator

#: smallest relative negative cosine of the least-squares direction counted as a conflict
#: (below it, float64 rounding of the small solve); the cut-off is ``rtol`` above this
_CONFLICT_FLOOR = 1e-12


class ConFIG(GramAggregator):
    r"""Conflict-free inverse gradients (`ConFIG <https://arxiv.org/abs/2408.11104>`_).

    With unit task gradients :math:`\hat g_i` stacked as rows of :math:`A` and the
    normalised loss coefficients as :math:`b`, ConFIG takes the direction
    :math:`x = A^+ b / \|A^+ b\|` (so that :math:`\hat g_i \cdot x \propto b_i`) and the
    length :math:`\sum_i g_i \cdot x`, the sum of the projections of the raw gradients:

    .. math::  u = \Big(\sum_i g_i \cdot \hat x\Big)\,\hat x,\qquad \hat x = \frac{A^+ b}{\|A^+ b\|}.

    **Guarantee.** With equal coefficients and linearly independent gradients, the update
    has the same positive cosine with every task gradient, so no task is made worse to
    first order. With unequal coefficients, the cosines are proportional to them. The
    update is invariant to the order of the tasks and to positive rescaling of any one
    task's gradient direction.

    This computes exactly the update of :class:`nequip.train.ConFIGLightningModule`, but
    entirely in the ``m x m`` Gram space: :math:`A^+ b = A^\top (A A^\top)^+ b`, so the
    per-step cost is one Gram matrix and one weighted sum of gradient rows (no
    normalised copy of the gradient matrix, no ``m x N`` least-squares factorisation).
    Rank-deficient systems (parallel tasks, more tasks than independent directions)
    give the pseudo-inverse solution and a finite update, as long as that solution
    conflicts with no task. When it would (an exactly or numerically antiparallel pair;
    dependent tasks that cannot all improve together, e.g.
    :math:`g_3 = -(g_1 + g_2)`), no non-zero direction in the span of the gradients
    improves every task, and the update is **zero** (the tasks are Pareto-stationary to
    first order). nequip's ConFIG returns the least-squares direction there, which for
    an antiparallel pair with equal coefficients is ~0 as well (its normalisation floor),
    but with unequal coefficients follows one task against the other; the authors'
    ``conflictfree`` package normalises the ~0 least-squares solution to an arbitrary
    unit direction. The Gram matrix is symmetrised first, so both solvers (``lsqr``)
    use the same rank cut-off (``rtol``, relative to the gradients' dtype).

    **Scaling.** Positively homogeneous (:math:`u(tG) = t\,u(G)`, :math:`t > 0`) while
    every task gradient norm is above ``norm_eps``; like nequip, norms below that
    absolute floor are floored, which changes the direction (lower ``norm_eps`` for
    problems whose gradients are that small).

    Example (as the aggregator of :class:`nequip_mtl.train.MultitaskLightningModule`):

    .. code-block:: yaml

        training_module:
          _target_: nequip_mtl.train.MultitaskLightningModule
          aggregator:
            _target_: nequip_mtl.aggregators.ConFIG

    Args:
        lsqr (bool): solve the small system with a rank-revealing least-squares solver
            (``True``, default) or an explicit eigen-decomposition pseudo-inverse
            (``False``); both give the minimum-norm solution. Kept for compatibility with
            nequip's ``lsqr`` argument.
        norm_eps (float): floor for the norms in every normalisation, as in nequip
            (default ``1e-8``)
        rtol (float, optional): eigenvalues of the normalised Gram matrix below
            ``rtol * max`` count as zero; default ``10 * m * eps`` of the gradients' dtype
    """

    def __init__(self, lsqr: bool = True, norm_eps: float = 1e-8, rtol: float | None = None):
        if not isinstance(lsqr, bool):
            raise TypeError(f"ConFIG: `lsqr` must be a bool, got {lsqr!r}")
        if not norm_eps > 0:
            raise ValueError(f"ConFIG: `norm_eps` must be > 0, got {norm_eps!r}")
        if rtol is not None and not 0 <= rtol < 1:
            raise ValueError(f"ConFIG: `rtol` must be in [0, 1), got {rtol!r}")
        self.lsqr = lsqr
        self.norm_eps = float(norm_eps)
        self.rtol = rtol

    def weights(
        self, gram: torch.Tensor, coeffs: torch.Tensor, source_dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        eps = self.norm_eps
        rtol = self.rtol if self.rtol is not None else default_rtol(len(coeffs), source_dtype)
        gram = gram.to(torch.float64)
        if not bool(torch.isfinite(gram).all()):
            # no meaningful weights (the training module then skips the step); LAPACK's
            # least squares would fail with an internal assertion on inf/NaN input
            return torch.full(coeffs.shape, torch.nan, dtype=torch.float64, device=gram.device)
        # a Gram matrix computed in float32 is symmetric only to its rounding; the
        # least-squares solver (unlike the eigen-decomposition) does not symmetrise it
        # and would then leave O(eps) components outside the numerical range of the
        # matrix, which the normalisation below blows up to a full-length update
        gram = symmetrized(gram)
        norms = safe_norms(gram, eps)
        unit_gram = gram / (norms[:, None] * norms[None, :])
        b = coeffs / coeffs.norm().clamp_min(eps)
        c = self._solve(unit_gram, b, rtol)
        # A x = unit_gram @ c: the cosines of x with the tasks, times |x|. With linearly
        # independent gradients it equals b >= 0. A rank-deficient system whose tasks
        # cannot all be improved together (antiparallel pair; dependent, conflicting
        # tasks) leaves the least-squares x conflicting with some task: no update there
        cosines = unit_gram @ c
        if bool(cosines.min() < -max(rtol, _CONFLICT_FLOOR) * cosines.abs().max()):
            return torch.zeros_like(c)
        # x = A^T c = sum_i (c_i / |g_i|) g_i
        a = c / norms
        gram_a = gram @ a
        x_norm = (a @ gram_a).clamp_min(0.0).sqrt().clamp_min(eps)
        # sum_i g_i . x_hat, then u = that * x_hat
        projection = gram_a.sum() / x_norm
        return a * (projection / x_norm)

    def _solve(self, unit_gram: torch.Tensor, b: torch.Tensor, rtol: float) -> torch.Tensor:
        if self.lsqr and unit_gram.device.type == "cpu":
            return torch.linalg.lstsq(unit_gram, b[:, None], rcond=rtol, driver="gelsd").solution[
                :, 0
            ]
        return psd_pinv_solve(unit_gram, b, rtol)
