"""CAGrad: conflict-averse gradient descent (Liu et al., NeurIPS 2021)."""

from __future__ import annotations

import math

import torch

from ._common import QPAggregator, SolverAggregator, check_float, check_rtol
from ._linalg import ScaledGram, min_norm_in_hull

#: the search for the dual variable |g_w| spans this many orders of magnitude below max |g_i|
_LAMBDA_RANGE = 1e-14
#: root finding on log(lambda): absolute tolerance and step cap
_X_TOL = 1e-10
_MAX_STEPS = 200


class CAGrad(QPAggregator, SolverAggregator):
    r"""Conflict-averse gradient descent (`CAGrad <https://arxiv.org/abs/2110.14048>`_,
    Liu et al. 2021).

    CAGrad maximises the worst-case improvement inside a ball around the average
    gradient :math:`g_0`:

    .. math::  d = \operatorname*{arg\,max}_{\|d - g_0\| \le c\|g_0\|}\ \min_i\ g_i \cdot d .

    Through its dual, :math:`d = g_0 + c\|g_0\|\, g_w / \|g_w\|` with
    :math:`g_w = \sum_i w_i g_i` and
    :math:`w = \arg\min_{w \in \Delta}\ g_w \cdot g_0 + c\|g_0\|\,\|g_w\|`. We solve the
    dual exactly: writing :math:`\|g_w\| = \min_{\lambda > 0} (\|g_w\|^2/\lambda +
    \lambda)/2` turns it, for fixed :math:`\lambda`, into the minimum-norm point of the
    hull of the shifted gradients :math:`g_i + \frac{\lambda}{c\|g_0\|} g_0` (the same
    exact active-set solver as :class:`MGDA`), and the optimal :math:`\lambda =
    \|g_w\|` is found by a safeguarded regula falsi on :math:`\log\lambda` (the dual is
    jointly convex, so the sign of :math:`\lambda - \|g_{w(\lambda)}\|` changes once). With ``rescale`` (default, as in
    the authors' code) the update is divided by :math:`1 + c^2`.

    **Coefficients** define the centre of the ball, :math:`g_0 = \sum_i c_i g_i` (the
    average gradient with equal coefficients :math:`1/m`, as in the paper).

    **Guarantee.** For :math:`0 \le c < 1`, CAGrad converges to a stationary point of
    the (coefficient-weighted) average loss, while each step improves the worst task
    as much as the ball allows. ``c = 0`` gives :class:`Sum`; larger ``c`` moves the
    update towards the MGDA direction. It does not guarantee :math:`d \cdot g_i \ge 0`
    (only that the worst :math:`d \cdot g_i` is as large as possible within the ball).
    Invariant to task permutation, positively homogeneous. If the worst-case
    improvement is zero at the optimum (some convex combination of the gradients
    vanishes, so :math:`g_w = 0`), the centre :math:`g_0` is returned. Task gradients of
    (numerically) zero norm are left out of the worst case (their improvement is 0
    for every direction).

    **Cost.** One gradient per task (``m`` backward passes), plus 10-30 small
    min-norm QPs on ``m x m`` matrices (milliseconds on the CPU).

    Example:

    .. code-block:: yaml

        training_module:
          _target_: nequip_mtl.train.MultitaskLightningModule
          aggregator:
            _target_: nequip_mtl.aggregators.CAGrad
            c: 0.4

    Args:
        c (float): radius of the ball relative to :math:`\|g_0\|`, ``>= 0`` (default
            ``0.4``; the paper uses 0.2-0.9)
        rescale (bool): divide the update by :math:`1 + c^2` (default ``True``, the
            authors' default ``rescale=1``); ``False`` returns :math:`d` itself
        rtol (float, optional): a task gradient whose squared sine with the span of
            the gradients already in the QP solution is below ``rtol`` counts as
            linearly dependent on them (it is left out rather than given huge weights);
            default: ``eps`` of the gradients' dtype (``1.2e-7`` for float32), at least
            ``1e-13``
    """

    def __init__(self, c: float = 0.4, rescale: bool = True, rtol: float | None = None):
        self.c = check_float(c, "c", "CAGrad", low=0.0)
        if not isinstance(rescale, bool):
            raise TypeError(f"CAGrad: `rescale` must be a bool, got {rescale!r}")
        self.rescale = rescale
        self.rtol = check_rtol(rtol, "CAGrad")

    def _solve(self, gram: torch.Tensor, coeffs: torch.Tensor, rtol: float) -> torch.Tensor:
        sg = ScaledGram(gram)
        factor = 1.0 / (1.0 + self.c**2) if self.rescale else 1.0
        if sg.k == 0:
            return gram.new_zeros(sg.m)
        h = sg.gram[sg.active][:, sg.active]
        c = coeffs[sg.active]
        hc = h @ c
        g0_norm = math.sqrt(max(float(c @ hc), 0.0))
        radius = self.c * g0_norm
        if radius <= 0.0:
            return sg.scatter(c * factor)
        w, gw_norm = self._dual(h, c, hc, radius, float(sg.n.max()), rtol)
        if w is None:
            return sg.scatter(c * factor)
        return sg.scatter((c + (radius / gw_norm) * w) * factor)

    @staticmethod
    def _dual(
        h: torch.Tensor, c: torch.Tensor, hc: torch.Tensor, radius: float, largest: float, rtol
    ) -> tuple[torch.Tensor | None, float]:
        """Minimise ``g_w . g0 + radius |g_w|`` over the simplex; ``None`` if ``g_w = 0``."""
        g0_sq = float(c @ hc)
        ones = torch.ones_like(c)

        def inner(lam: float) -> tuple[torch.Tensor, float]:
            # min-norm point of the hull of g_i + kappa g0 (Gram M H M^T, M = I + kappa 1 c^T)
            kappa = lam / radius
            shifted = (
                h
                + kappa * (hc[:, None] * ones[None, :] + ones[:, None] * hc[None, :])
                + kappa**2 * g0_sq
            )
            w = min_norm_in_hull(ScaledGram(shifted), rtol)
            return w, math.sqrt(max(float(w @ h @ w), 0.0))

        # root of f(x) = x - log|g_w(e^x)| (increasing through its single sign change)
        lo, hi = math.log(largest * _LAMBDA_RANGE), math.log(largest)
        w_lo, norm_lo = inner(math.exp(lo))
        if norm_lo <= math.exp(lo):  # optimum at |g_w| ~ 0: worst-case improvement is 0
            return None, 0.0
        f_lo = lo - math.log(norm_lo)
        w_hi, norm_hi = inner(math.exp(hi))
        if not norm_hi > 0.0:
            return None, 0.0
        f_hi = hi - math.log(norm_hi)
        best = (w_hi, norm_hi) if abs(f_hi) < abs(f_lo) else (w_lo, norm_lo)
        if f_hi <= 0.0:  # |g_w| = max |g_i| already (e.g. one task): hi is the root
            return w_hi, norm_hi
        side = 0
        checkpoint, bisect = hi - lo, False
        for step in range(_MAX_STEPS):
            if hi - lo <= _X_TOL:
                break
            if step % 3 == 2:  # safeguard: bisect unless the bracket halved in 3 steps
                bisect = hi - lo > 0.5 * checkpoint
                checkpoint = hi - lo
            if bisect:
                x = 0.5 * (lo + hi)
                bisect = False
            else:  # Illinois (modified regula falsi)
                x = (lo * f_hi - hi * f_lo) / (f_hi - f_lo)
                x = min(max(x, lo + 1e-3 * (hi - lo)), hi - 1e-3 * (hi - lo))
            w, norm = inner(math.exp(x))
            # |g_w| = 0 means lambda > |g_w|: the upper side of the root
            f = x - math.log(norm) if norm > 0.0 else 1e10
            best = (w, norm)
            if abs(f) <= _X_TOL:
                break
            if f > 0.0:
                hi, f_hi = x, f
                if side == 1:
                    f_lo *= 0.5
                side = 1
            else:
                lo, f_lo = x, f
                if side == -1:
                    f_hi *= 0.5
                side = -1
        w, norm = best
        if not norm > 0.0:
            return None, 0.0
        return w, norm
