"""UPGrad: unconflicting projection of gradients (Quinton & Rey, 2024)."""

from __future__ import annotations

import torch

from ._common import QPAggregator, SolverAggregator
from ._linalg import ScaledGram, project_onto_dual_cone


class UPGrad(QPAggregator, SolverAggregator):
    r"""Unconflicting projection of gradients (UPGrad, `Quinton & Rey 2024, "Jacobian
    descent for multi-objective optimization" <https://arxiv.org/abs/2406.16232>`_; the
    default aggregator of torchjd).

    Each task gradient is projected onto the *dual cone* of all task gradients,
    :math:`\mathcal C = \{x : g_j \cdot x \ge 0\ \forall j\}` (the directions that
    conflict with no task), and the projections are averaged with the coefficients:

    .. math::  u = \sum_i c_i\, \pi_{\mathcal C}(g_i).

    Each projection is a small quadratic program in Gram space,
    :math:`\pi_{\mathcal C}(g_i) = G^\top v`, :math:`v = \arg\min_{v \ge e_i} v^\top H v`,
    solved exactly by the shared active-set solver on the cosine matrix (diagonally
    scaled Gram matrix), so norm ratios of :math:`10^4` between tasks cost no accuracy.

    **Coefficients** weight the projected gradients (torchjd's preference vector); the
    default equal coefficients :math:`1/m` average them. Since the projection is
    positively homogeneous, this is the same as projecting the scaled gradients
    :math:`c_i g_i`.

    **Guarantee.** Non-conflicting: :math:`u \cdot g_j \ge 0` for every task (a sum of
    vectors of the cone). When no two task gradients conflict
    (:math:`g_i \cdot g_j \ge 0` for all pairs), every :math:`g_i` is already in the cone
    and UPGrad equals :class:`Sum` (the mean with equal coefficients). Invariant to task
    permutation, positively homogeneous, and (unlike MGDA) its length does not collapse
    to the smallest gradient norm. Task gradients of (numerically) zero norm impose no
    constraint and get weight 0.

    **Cost.** One gradient per task (``m`` backward passes), plus ``m`` QPs of ``m``
    variables on the Gram matrix (about a millisecond on the CPU; trivial when no pair
    conflicts).

    Example:

    .. code-block:: yaml

        training_module:
          _target_: nequip_mtl.train.MultitaskLightningModule
          aggregator:
            _target_: nequip_mtl.aggregators.UPGrad

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
        c = coeffs[sg.active]
        w = gram.new_zeros(sg.k)
        eye = torch.eye(sg.k, dtype=torch.float64)
        for i in range(sg.k):
            if c[i] == 0:
                continue
            # min_{y >= e_i} y^T K y  <=>  min_{v >= e_i} v^T H v with y = n * v / n_i
            y = project_onto_dual_cone(sg.cos, eye[i], rtol)
            w += c[i] * sg.n[i] * y / sg.n
        return sg.scatter(w)
