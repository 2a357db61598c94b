"""MGDA: the minimum-norm point of the convex hull of the task gradients."""

from __future__ import annotations

import torch

from ._common import QPAggregator, SolverAggregator
from ._linalg import ScaledGram, min_norm_in_hull


class MGDA(QPAggregator, SolverAggregator):
    r"""Multiple-gradient descent (MGDA-UB, `Sener & Koltun 2018
    <https://arxiv.org/abs/1810.04650>`_; Désidéri 2012).

    The update is the minimum-norm element of the convex hull of the task gradients,

    .. math::  u = \sum_i w_i g_i,\qquad w = \operatorname*{arg\,min}_{w \ge 0,\ \sum_i w_i = 1}
        \Big\|\sum_i w_i g_i\Big\|^2 .

    Two tasks use the exact closed form
    :math:`w_1 = \mathrm{clip}\big(\frac{(g_2 - g_1)\cdot g_2}{\|g_1 - g_2\|^2}, 0, 1\big)`;
    more tasks solve the quadratic program exactly with the shared active-set
    non-negative least-squares solver, on the cosine matrix (see
    :func:`nequip_mtl.aggregators._linalg.min_norm_in_hull`), so norm ratios of
    :math:`10^4` between tasks are handled at full accuracy.

    **Guarantee** (the KKT conditions): :math:`g_i \cdot u \ge \|u\|^2` for every task,
    with equality for every task with :math:`w_i > 0`. So either :math:`u = 0` (the
    parameters are Pareto-stationary: some convex combination of the gradients
    vanishes) or :math:`u` is a descent direction for *every* task. Invariant to task
    permutation; positively homogeneous (scaling all gradients by :math:`s > 0` scales
    the update by :math:`s`), but not invariant to rescaling one task.

    **Coefficients are ignored**: the min-norm point has no notion of task preference.
    Be aware that it is dominated by the *smallest* gradient (its length is at most the
    smallest gradient norm): with energy, force and stress gradient norms differing by
    :math:`10^2`-:math:`10^4`, MGDA takes very small steps, mostly along the
    smallest-norm task. A task with an exactly zero gradient makes the update zero.

    **Cost.** One gradient per task (``m`` backward passes), plus an ``m``-variable
    QP on the Gram matrix (a few ``m x m`` eigen-decompositions).

    Example:

    .. code-block:: yaml

        training_module:
          _target_: nequip_mtl.train.MultitaskLightningModule
          aggregator:
            _target_: nequip_mtl.aggregators.MGDA

    Args:
        rtol (float, optional): a task gradient whose squared sine with the span of
            the gradients already in the QP solution is below ``rtol`` counts as
            linearly dependent on them (it is left out rather than given huge weights);
            default: ``eps`` of the gradients' dtype (``1.2e-7`` for float32), at least
            ``1e-13``
    """

    def _solve(self, gram: torch.Tensor, coeffs: torch.Tensor, rtol: float) -> torch.Tensor:
        sg = ScaledGram(gram)
        m = sg.m
        if sg.k == 0:  # all gradients zero: any weights give the zero update
            return gram.new_full((m,), 1.0 / m)
        if m == 2 and sg.k == 2:
            return two_task_min_norm(sg.gram)
        return min_norm_in_hull(sg, rtol)


def two_task_min_norm(gram: torch.Tensor) -> torch.Tensor:
    """Closed-form min-norm weights ``(gamma, 1 - gamma)`` for two gradients."""
    h11, h12, h22 = gram[0, 0], gram[0, 1], gram[1, 1]
    denom = h11 + h22 - 2.0 * h12  # |g1 - g2|^2
    if not bool(denom > 0):  # identical gradients: every convex combination is the same
        gamma = gram.new_tensor(0.5)
    else:
        gamma = ((h22 - h12) / denom).clamp(0.0, 1.0)
    return torch.stack([gamma, 1.0 - gamma])
