"""Shared plumbing of the Gram-space aggregators: argument checks, device and dtype moves."""

from __future__ import annotations

import torch

from ._linalg import check_coeffs, check_gram, default_rtol, dependence_tol
from .base import GramAggregator


def check_rtol(rtol: float | None, name: str) -> float | None:
    """Validate an optional relative eigenvalue cut-off."""
    if rtol is None:
        return None
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)):
        raise TypeError(f"{name}: `rtol` must be a float in [0, 1) or None, got {rtol!r}")
    if not 0 <= rtol < 1:
        raise ValueError(f"{name}: `rtol` must be in [0, 1) or None, got {rtol!r}")
    return float(rtol)


def check_float(value: float, arg: str, name: str, *, low: float, low_open: bool = False) -> float:
    """Validate a real-valued hyperparameter ``value >= low`` (or ``> low``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: `{arg}` must be a number, got {value!r}")
    value = float(value)
    ok = value > low if low_open else value >= low
    if not ok or value != value or value == float("inf"):
        relation = ">" if low_open else ">="
        raise ValueError(f"{name}: `{arg}` must be a finite number {relation} {low}, got {value!r}")
    return value


class QPAggregator:
    """Mixin: ``rtol`` is the dependence tolerance of :func:`._linalg.nnls_gram`."""

    def _default_rtol(self, m: int, source_dtype: torch.dtype) -> float:
        return dependence_tol(source_dtype)


class SolverAggregator(GramAggregator):
    """A :class:`GramAggregator` whose weights come from a small float64 problem on the CPU.

    Subclasses implement :meth:`_solve`; this class validates the inputs, moves the
    Gram matrix to the CPU in float64 (the problems are ``m x m``: a GPU round trip
    per tiny operation would cost more than it saves), picks the eigenvalue cut-off
    for the gradients' dtype and moves the weights back to the Gram matrix's device.
    A non-finite Gram matrix gives NaN weights (the training module then skips the step).
    """

    rtol: float | None = None

    def __init__(self, rtol: float | None = None):
        self.rtol = check_rtol(rtol, type(self).__name__)

    def weights(
        self, gram: torch.Tensor, coeffs: torch.Tensor, source_dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        name = type(self).__name__
        coeffs = check_coeffs(coeffs.detach().cpu(), name)
        check_gram(gram, coeffs.shape[0], name)
        device = gram.device
        gram = gram.detach().to(device="cpu", dtype=torch.float64)
        m = coeffs.shape[0]
        if m == 0:
            return gram.new_zeros(0).to(device)
        if not bool(torch.isfinite(gram).all()):
            return torch.full((m,), torch.nan, dtype=torch.float64, device=device)
        rtol = self.rtol if self.rtol is not None else self._default_rtol(m, source_dtype)
        return self._solve(gram, coeffs, rtol).to(device)

    def _default_rtol(self, m: int, source_dtype: torch.dtype) -> float:
        return default_rtol(m, source_dtype)

    def _solve(self, gram: torch.Tensor, coeffs: torch.Tensor, rtol: float) -> torch.Tensor:
        """``(m,)`` float64 CPU weights for a finite float64 CPU ``gram`` and ``coeffs``."""
        raise NotImplementedError
