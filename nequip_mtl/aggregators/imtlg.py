"""IMTL-G: impartial multi-task learning, gradient part (Liu et al., ICLR 2021)."""

from __future__ import annotations

import torch

from ._common import SolverAggregator
from ._linalg import ScaledGram, psd_pinv_solve


class IMTLG(SolverAggregator):
    r"""Impartial gradient combination (IMTL-G, Liu et al. 2021, `ICLR
    <https://openreview.net/forum?id=IMPnRXEWpvr>`_).

    IMTL-G picks the combination :math:`u = \sum_i \alpha_i g_i` with
    :math:`\sum_i \alpha_i = 1` whose projections onto the unit task gradients are all
    equal, :math:`u \cdot \hat g_i = u \cdot \hat g_j`, so that every task improves at
    the same rate per unit of its own gradient. In Gram form (with
    :math:`H = G G^\top`, :math:`n_i = \|g_i\|`):

    .. math::  \alpha \propto H^{+} n = D^{-1} K^{+} \mathbf 1,

    where :math:`K` is the cosine matrix and :math:`D = \mathrm{diag}(n)`; this is
    computed on :math:`K` so that norm ratios of :math:`10^4` cost no accuracy. The
    direction is the same as :class:`ConFIG`'s, only the length differs (ConFIG: sum
    of the projections; IMTL-G: :math:`\sum_i \alpha_i = 1`, which makes the length of
    the order of the *smallest* gradient norm).

    **Coefficients** set the ratios of the projections: :math:`u \cdot \hat g_i
    \propto c_i`, i.e. :math:`\alpha \propto D^{-1} K^{+} c` (equal coefficients give
    the paper's method). Their overall scale does not matter.

    **Guarantee.** With linearly independent gradients, the projections of the update
    onto the unit task gradients are exactly proportional to the coefficients (equal
    with equal coefficients) and non-negative: no task conflicts with the update.
    Invariant to task permutation; the direction is invariant to positive rescaling of
    any task gradient. With linearly dependent gradients (duplicated or parallel tasks,
    ``m > N``), the pseudo-inverse gives the least-squares compromise.

    Deviations from the paper, for robustness: (1) the paper's normalisation
    :math:`\sum_i\alpha_i = 1` is applied as :math:`|\sum_i\alpha_i| = 1`: when a
    small-norm task lies almost in the span of the others, :math:`\sum_i` of the raw
    solution can be negative and the paper's formula then gives an update whose
    projections are equal but *negative* (every loss increases); we flip its sign.
    (2) When :math:`|\sum_i \alpha_i|` is below ``rtol`` times :math:`\sum_i|\alpha_i|`
    (the length would blow up), the weights are zero (no update), as in torchjd.
    Task gradients of (numerically) zero norm get weight 0.

    **Cost.** One gradient per task (``m`` backward passes), plus one ``m x m``
    eigen-decomposition.

    Example:

    .. code-block:: yaml

        training_module:
          _target_: nequip_mtl.train.MultitaskLightningModule
          aggregator:
            _target_: nequip_mtl.aggregators.IMTLG

    Args:
        rtol (float, optional): eigenvalues of the cosine matrix below ``rtol * max``
            count as zero; default ``10 * m * eps`` of the gradients' dtype
    """

    def _solve(self, gram: torch.Tensor, coeffs: torch.Tensor, rtol: float) -> torch.Tensor:
        sg = ScaledGram(gram)
        if sg.k == 0:
            return gram.new_zeros(sg.m)
        beta = psd_pinv_solve(sg.cos, coeffs[sg.active], rtol)
        alpha = beta / sg.n
        total = alpha.sum()
        if not bool(total.abs() > rtol * alpha.abs().sum()):
            return gram.new_zeros(sg.m)
        return sg.scatter(alpha / total.abs())
