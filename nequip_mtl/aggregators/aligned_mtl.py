"""Aligned-MTL: independent component alignment (Senushkin et al., CVPR 2023)."""

from __future__ import annotations

import torch

from ._common import SolverAggregator, check_rtol
from ._linalg import ScaledGram

_SCALE_MODES = ("min", "median", "rmse")


class AlignedMTL(SolverAggregator):
    r"""Aligned-MTL (`Senushkin et al. 2023, "Independent component alignment for
    multi-task learning" <https://arxiv.org/abs/2305.19000>`_, Algorithm 1).

    The gradient system is made perfectly conditioned before it is combined: with the
    eigen-decomposition :math:`H = G G^\top = V \Lambda V^\top` (rank :math:`R`), the
    aligned gradients :math:`\tilde G = B G`,
    :math:`B = \sqrt{\lambda_\ast}\, V \Lambda^{-1/2} V^\top`, are orthogonal and all of
    norm :math:`\sqrt{\lambda_\ast}`, and the update is their weighted sum

    .. math::  u = c^\top \tilde G = \alpha^\top G,\qquad \alpha = B c .

    :math:`\lambda_\ast` is the smallest non-zero eigenvalue (``scale_mode="min"``, the
    paper's choice), their median (``"median"``) or their mean (``"rmse"``: the RMS
    singular value), as in the authors' code.

    **Coefficients** are the weights of the aligned gradients (the paper's task weights
    / torchjd's preference vector); equal coefficients :math:`1/m` by default.

    **Guarantee.** The aligned gradients have condition number 1 (orthogonal, equal
    norms), so no task dominates the update by its gradient norm or is cancelled by a
    conflicting one: :math:`u \cdot \tilde g_i = \lambda_\ast c_i` for the aligned
    gradients :math:`\tilde g_i`, and :math:`\|u\| = \sqrt{\lambda_\ast}\,\|c\|` for linearly
    independent gradients. It does *not* guarantee :math:`u \cdot g_i \ge 0` for the
    raw gradients. Invariant to task permutation and positively homogeneous. With
    ``"min"`` the update length is set by the smallest singular value of the gradient
    matrix: for nearly dependent gradients (or norm ratios of :math:`10^4`), steps
    become very small; ``"median"``/``"rmse"`` keep the length at the typical scale.
    Numerically dependent directions (eigenvalues of the *cosine* matrix below
    ``rtol`` times the largest) are dropped, and task gradients of (numerically) zero
    norm get weight 0.

    **Cost.** One gradient per task (``m`` backward passes), plus two ``m x m``
    eigen-decompositions.

    Example:

    .. code-block:: yaml

        training_module:
          _target_: nequip_mtl.train.MultitaskLightningModule
          aggregator:
            _target_: nequip_mtl.aggregators.AlignedMTL
            scale_mode: min

    Args:
        scale_mode (str): ``"min"`` (default), ``"median"`` or ``"rmse"``: which
            eigenvalue sets the length of the aligned gradients
        rtol (float, optional): eigenvalues of the cosine matrix below ``rtol * max``
            count as zero; default ``10 * m * eps`` of the gradients' dtype
    """

    def __init__(self, scale_mode: str = "min", rtol: float | None = None):
        if scale_mode not in _SCALE_MODES:
            raise ValueError(
                f"AlignedMTL: `scale_mode` must be one of {_SCALE_MODES}, got {scale_mode!r}"
            )
        self.scale_mode = scale_mode
        self.rtol = check_rtol(rtol, "AlignedMTL")

    def _solve(self, gram: torch.Tensor, coeffs: torch.Tensor, rtol: float) -> torch.Tensor:
        sg = ScaledGram(gram)
        if sg.k == 0:
            return gram.new_zeros(sg.m)
        # rank from the cosine matrix: "dependent up to the gradients' rounding",
        # whatever the norms; the decomposition itself is of the raw Gram matrix
        cos_evals = torch.linalg.eigvalsh(sg.cos)
        rank = int((cos_evals > rtol * cos_evals.max()).sum())
        evals, evecs = torch.linalg.eigh(sg.gram[sg.active][:, sg.active])
        evals, evecs = evals.flip(0), evecs.flip(1)  # descending
        floor = 10.0 * sg.k * torch.finfo(torch.float64).eps * evals[0]
        rank = min(rank, int((evals > floor).sum()))
        if rank == 0:
            return gram.new_zeros(sg.m)
        evals, evecs = evals[:rank], evecs[:, :rank]
        if self.scale_mode == "min":
            scale = evals[-1]
        elif self.scale_mode == "median":
            scale = evals.median()  # lower median for an even rank, as torch defines it
        else:
            scale = evals.mean()
        b = scale.sqrt() * (evecs / evals.sqrt()) @ evecs.T
        return sg.scatter(b @ coeffs[sg.active])
