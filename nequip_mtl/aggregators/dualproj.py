"""DualProj: projection of the weighted mean onto the dual cone of the task gradients."""

from __future__ import annotations

import torch

from ._common import QPAggregator, SolverAggregator
from ._linalg import ScaledGram, project_onto_dual_cone


class DualProj(QPAggregator, SolverAggregator):
    r"""Projection of the weighted mean onto the dual cone (DualProj, `Quinton & Rey 2024
    <https://arxiv.org/abs/2406.16232>`_, torchjd; after Lopez-Paz & Ranzato's GEM).

    The coefficient-weighted sum :math:`\bar g = \sum_i c_i g_i` is projected onto the
    dual cone of the task gradients,
    :math:`\mathcal C = \{x : g_j \cdot x \ge 0\ \forall j\}`:

    .. math::  u = \pi_{\mathcal C}(\bar g) = G^\top v,\qquad
        v = \operatorname*{arg\,min}_{v \ge c} v^\top H v,

    one QP of ``m`` variables solved exactly by the shared active-set solver on the
    cosine matrix (diagonally scaled Gram matrix).

    **Coefficients** define the vector that is projected, :math:`\sum_i c_i g_i`
    (torchjd's preference vector; equal coefficients give the mean).

    **Guarantee.** Non-conflicting: :math:`u \cdot g_j \ge 0` for every task, and
    :math:`u` is the closest such vector to :math:`\bar g`. If :math:`\bar g` conflicts
    with no task it is returned unchanged (DualProj equals :class:`Sum`). Invariant to
    task permutation and positively homogeneous. Unlike :class:`UPGrad`, the result
    is dominated by the largest weighted gradient as much as :math:`\bar g` is; small
    tasks only enter through their constraints. Task gradients of (numerically) zero
    norm impose no constraint and get weight 0.

    **Cost.** One gradient per task (``m`` backward passes), plus one QP of ``m``
    variables on the Gram matrix.

    Example:

    .. code-block:: yaml

        training_module:
          _target_: nequip_mtl.train.MultitaskLightningModule
          aggregator:
            _target_: nequip_mtl.aggregators.DualProj

    Args:
        rtol (float, optional): a task gradient whose squared sine with the span of
            the gradients already in the QP solution is below ``rtol`` counts as
            linearly dependent on them (it is left out rather than given huge weights);
            default: ``eps`` of the gradients' dtype (``1.2e-7`` for float32), at least
            ``1e-13``
    """

    def _solve(self, gram: torch.Tensor, coeffs: torch.Tensor, rtol: float) -> torch.Tensor:
        sg = ScaledGram(gram)
        if sg.k == 0:
            return gram.new_zeros(sg.m)
        # min_{v >= c} v^T H v  <=>  min_{y >= n * c} y^T K y with y = n * v
        y = project_onto_dual_cone(sg.cos, coeffs[sg.active] * sg.n, rtol)
        return sg.scatter(y / sg.n)
