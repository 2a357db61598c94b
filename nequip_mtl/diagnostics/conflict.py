"""Gradient-conflict statistics of a multitask update, from the task-gradient Gram matrix.

With task gradients ``g_1 ... g_m`` (rows of ``G``, one per loss component) and the
applied update ``u``, everything a conflict monitor reports is a function of

- the Gram matrix ``G @ G.T`` (``m x m``): norms ``|g_i| = sqrt(G_ii)`` and pairwise
  cosines ``cos(g_i, g_j) = G_ij / (|g_i| |g_j|)``;
- the update dot products ``G @ u`` (``m``) and ``|u|^2``: ``cos(g_i, u)``.

When the update is a weighted combination ``u = w @ G`` (every Gram-space aggregator),
``G @ u = Gram @ w`` and ``|u|^2 = w @ Gram @ w``, so no ``num_params``-sized vector is
needed at all. Everything here is pure torch (no Lightning, no nequip), float64, CPU.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from ..aggregators._linalg import symmetrized

__all__ = [
    "ConflictStatistics",
    "conflict_statistics",
    "conflict_from_gradients",
    "conflict_from_weights",
    "conflict_metrics",
    "PAIR_SEPARATOR",
]

#: separates the two task names of a pair in metric names (``forces_mse~stress_mse``)
PAIR_SEPARATOR = "~"


@dataclasses.dataclass(frozen=True)
class ConflictStatistics:
    """Norms and cosines of ``m`` task gradients (and of the applied update).

    Attributes:
        names: the task (loss component) names, in row order
        norms: ``(m,)`` Euclidean norm of each task gradient
        cosines: ``(m, m)`` cosine similarity of every pair of task gradients (``1`` on
            the diagonal of a nonzero gradient; ``nan`` where a gradient is zero, since
            the cosine is undefined there)
        update_norm: norm of the applied update, or ``None`` if no update was given
        cos_update: ``(m,)`` cosine between each task gradient and the update (``nan``
            where either is zero), or ``None`` if no update was given
    """

    names: list[str]
    norms: torch.Tensor
    cosines: torch.Tensor
    update_norm: float | None = None
    cos_update: torch.Tensor | None = None

    def pairs(self) -> list[tuple[int, int]]:
        """Index pairs ``(i, j)``, ``i < j``, in row order."""
        m = len(self.names)
        return [(i, j) for i in range(m) for j in range(i + 1, m)]


def conflict_statistics(
    gram: torch.Tensor,
    names: Sequence[str] | None = None,
    update_dots: torch.Tensor | None = None,
    update_sq_norm: torch.Tensor | float | None = None,
) -> ConflictStatistics:
    """Norms and cosines from a Gram matrix (and optionally the update's dot products).

    Args:
        gram: ``(m, m)`` Gram matrix ``G @ G.T`` of the task gradients
        names: ``m`` task names (default ``task0 ... task{m-1}``)
        update_dots: ``(m,)`` dot products ``G @ u`` of each task gradient with the update
        update_sq_norm: ``|u|^2``; required together with ``update_dots``

    Returns:
        :class:`ConflictStatistics` (float64, CPU)
    """
    gram = torch.as_tensor(gram).detach().to(device="cpu", dtype=torch.float64)
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"`gram` must be a square (m, m) matrix, got shape {tuple(gram.shape)}")
    m = gram.shape[0]
    names = [f"task{i}" for i in range(m)] if names is None else [str(n) for n in names]
    if len(names) != m:
        raise ValueError(f"got {len(names)} names for a {m} x {m} Gram matrix")
    if len(set(names)) != m:
        raise ValueError(f"task names must be unique, got {names}")
    if (update_dots is None) != (update_sq_norm is None):
        raise ValueError("`update_dots` and `update_sq_norm` must be given together")

    # symmetrise (roundoff) and clamp tiny negative squared norms from roundoff to zero
    gram = symmetrized(gram)
    norms = gram.diagonal().clamp_min(0.0).sqrt()
    cosines = _safe_cos(gram, torch.outer(norms, norms))

    update_norm = None
    cos_update = None
    if update_dots is not None:
        dots = torch.as_tensor(update_dots).detach().to(device="cpu", dtype=torch.float64)
        if dots.shape != (m,):
            raise ValueError(f"`update_dots` must have shape ({m},), got {tuple(dots.shape)}")
        sq = float(torch.as_tensor(update_sq_norm, dtype=torch.float64))
        update_norm = math.sqrt(max(sq, 0.0))
        cos_update = _safe_cos(dots, norms * update_norm)
    return ConflictStatistics(names, norms, cosines, update_norm, cos_update)


def conflict_from_gradients(
    gradients: torch.Tensor,
    update: torch.Tensor | None = None,
    names: Sequence[str] | None = None,
) -> ConflictStatistics:
    """Statistics of the rows of a ``(m, num_params)`` task-gradient matrix.

    Args:
        gradients: ``(m, num_params)`` one flattened gradient per task
        update: ``(num_params,)`` the applied update (optional)
        names: task names
    """
    g = gradients.detach().to(torch.float64)
    if g.ndim != 2:
        raise ValueError(f"`gradients` must be (m, num_params), got shape {tuple(g.shape)}")
    if update is None:
        return conflict_statistics(g @ g.T, names)
    u = update.detach().to(device=g.device, dtype=torch.float64).reshape(-1)
    if u.numel() != g.shape[1]:
        raise ValueError(f"`update` has {u.numel()} entries, the gradients have {g.shape[1]}")
    return conflict_statistics(g @ g.T, names, g @ u, u @ u)


def conflict_from_weights(
    gram: torch.Tensor, weights: torch.Tensor, names: Sequence[str] | None = None
) -> ConflictStatistics:
    """Statistics when the update is ``weights @ G``, from the Gram matrix alone."""
    gram = torch.as_tensor(gram).detach().to(device="cpu", dtype=torch.float64)
    w = torch.as_tensor(weights).detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    if w.shape[0] != gram.shape[0]:
        raise ValueError(f"got {w.shape[0]} weights for a {gram.shape[0]} x {gram.shape[0]} Gram")
    sym = symmetrized(gram)
    gw = sym @ w
    return conflict_statistics(sym, names, gw, w @ gw)


def conflict_metrics(
    stats: ConflictStatistics, prefix: str = "grad_conflict", finite_only: bool = True
) -> dict[str, float]:
    """Flat ``{metric name: value}`` dict for loggers.

    Names: ``{prefix}/norm/<task>``, ``{prefix}/cos/<task_i>~<task_j>`` (``i < j`` in row
    order), ``{prefix}/cos_update/<task>`` and ``{prefix}/update_norm``. With
    ``finite_only`` (default), undefined values (cosines involving a zero gradient) are
    left out instead of being logged as ``nan``.
    """
    out: dict[str, float] = {}
    for i, name in enumerate(stats.names):
        out[f"{prefix}/norm/{name}"] = float(stats.norms[i])
    for i, j in stats.pairs():
        key = f"{prefix}/cos/{stats.names[i]}{PAIR_SEPARATOR}{stats.names[j]}"
        out[key] = float(stats.cosines[i, j])
    if stats.cos_update is not None:
        for i, name in enumerate(stats.names):
            out[f"{prefix}/cos_update/{name}"] = float(stats.cos_update[i])
        out[f"{prefix}/update_norm"] = float(stats.update_norm)
    if finite_only:
        out = {k: v for k, v in out.items() if math.isfinite(v)}
    return out


def _safe_cos(dots: torch.Tensor, norm_products: torch.Tensor) -> torch.Tensor:
    """``dots / norm_products`` clamped to [-1, 1]; ``nan`` where a norm is zero."""
    cos = (dots / norm_products).clamp(-1.0, 1.0)
    return torch.where(norm_products > 0, cos, torch.full_like(cos, float("nan")))
