"""Small, robust linear algebra on ``m x m`` Gram matrices (float64, any device)."""

from __future__ import annotations

import torch


def symmetrized(gram: torch.Tensor) -> torch.Tensor:
    """``(G + G^T) / 2``: a Gram matrix computed in floating point is symmetric only to its
    rounding, and solvers that do not symmetrise themselves (least squares) would leave
    O(eps) components outside its range. A no-op, bit for bit, on a symmetric matrix."""
    return 0.5 * (gram + gram.T)


def nonfinite_rows(grads: torch.Tensor, sq_norms: torch.Tensor) -> list[int]:
    """The rows of ``grads`` that contain a NaN or inf entry.

    ``sq_norms`` are the rows' (squared) norms, as computed anyway: a NaN or inf entry
    makes its row's sum of squares NaN or inf (``inf**2 = inf``, ``+inf`` and ``-inf``
    both square to ``+inf``, and NaN propagates), so only rows with a non-finite norm
    are looked at entry by entry. A non-finite norm of a row of finite entries is an
    overflow of the sum of squares, not a fault, and is not reported.
    """
    suspects = (~torch.isfinite(sq_norms)).nonzero().flatten().tolist()
    return [i for i in suspects if not bool(torch.isfinite(grads[i]).all())]


def raise_if_nonfinite(grads: torch.Tensor, sq_norms: torch.Tensor, name: str) -> None:
    """Raise ``FloatingPointError`` naming the tasks whose gradients contain NaN or inf."""
    bad = nonfinite_rows(grads, sq_norms)
    if bad:
        raise FloatingPointError(
            f"{name}: the gradients of tasks {bad} contain NaN or inf; non-finite "
            "gradients have no meaningful aggregate (the training modules handle them "
            "with `on_nonfinite` before aggregating)"
        )


def gram_matrix(grads: torch.Tensor, name: str) -> torch.Tensor:
    """The float64 Gram matrix ``grads @ grads.T`` of finite gradients, without over/underflow.

    The product is computed in the gradients' dtype (one ``m x m`` matmul, on their
    device). Its diagonal, the squared row norms, doubles as the finiteness check: a
    row with a NaN or inf entry raises ``FloatingPointError`` naming its task. If the
    squares overflow (float32 entries beyond ~1e19) or fall where they lose precision
    (float32 entries below ~1e-16), the rows are first scaled by exact powers of two to
    a largest entry in ``[0.5, 1)`` and the scales are applied again in float64, so the
    float64 Gram is accurate for any finite float32 gradients. Raises
    ``FloatingPointError`` if even the float64 Gram overflows (float64 gradients beyond
    ~1e154).
    """
    gram = grads @ grads.T
    diag = gram.diagonal()
    finfo = torch.finfo(grads.dtype)
    # below `lo`, the rounding of underflowing products exceeds eps of the squared norm
    lo = max(grads.shape[1], 1) * finfo.tiny / finfo.eps
    if bool((torch.isfinite(diag) & (diag >= lo)).all()):
        return gram.to(torch.float64)
    raise_if_nonfinite(grads, diag, name)
    _, exponent = torch.frexp(grads.abs().amax(dim=1))  # largest entry = mantissa * 2**exp
    half = torch.div(exponent, 2, rounding_mode="floor")
    # two exact power-of-two factors, each representable in the gradients' dtype
    scaled = grads * torch.exp2(-half.to(grads.dtype))[:, None]
    scaled = scaled * torch.exp2(-(exponent - half).to(grads.dtype))[:, None]
    gram = (scaled @ scaled.T).to(torch.float64)
    row_scale = torch.exp2(exponent.to(torch.float64))
    gram = gram * row_scale[:, None] * row_scale[None, :]
    if not bool(torch.isfinite(gram).all()):
        raise FloatingPointError(
            f"{name}: the Gram matrix of the gradients overflows float64 (largest entry "
            f"{float(grads.abs().max()):.3g}); scale the losses down"
        )
    return gram


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


# --------------------------------------------------------------------------------------
# Shared machinery of the Gram-space aggregators (UPGrad, DualProj, MGDA, CAGrad, ...).
#
# Task gradients of an MLIP differ in norm by 1e2..1e4 (energy vs forces vs stress), so
# the raw Gram matrix spans 1e8 in scale. Every small problem below is therefore solved
# on the *cosine* matrix K = D^-1 H D^-1 (D = diag of the gradient norms, unit diagonal),
# where eigenvalue cut-offs mean "these gradients are linearly dependent up to the
# rounding of their dtype" whatever their norms, and mapped back to raw weights after.
# --------------------------------------------------------------------------------------

#: task gradients with a norm below this fraction of the largest count as exactly zero
ZERO_NORM_RTOL = 1e-12


def check_coeffs(coeffs: torch.Tensor, name: str) -> torch.Tensor:
    """Return ``coeffs`` as a 1-D float64 tensor, or raise if any is negative or non-finite."""
    coeffs = torch.as_tensor(coeffs, dtype=torch.float64)
    if coeffs.dim() != 1:
        raise ValueError(f"{name}: `coeffs` must be a 1-D tensor, got shape {tuple(coeffs.shape)}")
    if not bool(torch.isfinite(coeffs).all()) or bool((coeffs < 0).any()):
        raise ValueError(
            f"{name}: loss coefficients must be finite and >= 0, got {coeffs.tolist()}"
        )
    return coeffs


def check_gram(gram: torch.Tensor, num_coeffs: int, name: str) -> None:
    """Raise unless ``gram`` is a square ``(m, m)`` matrix matching ``m`` coefficients."""
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] != num_coeffs:
        raise ValueError(
            f"{name}: expected a ({num_coeffs}, {num_coeffs}) Gram matrix for {num_coeffs} "
            f"coefficients, got shape {tuple(gram.shape)}"
        )


class ScaledGram:
    """A Gram matrix split into norms and cosines, with (numerically) zero rows set aside.

    Attributes:
        gram: the symmetrised ``(m, m)`` float64 Gram matrix
        norms: ``(m,)`` gradient norms (zero for the rows counted as zero)
        active: ``(k,)`` long indices of the rows with a usable, non-zero gradient
        n: ``(k,)`` norms of the active rows
        cos: ``(k, k)`` cosine matrix of the active rows (unit diagonal, entries in [-1, 1])
    """

    def __init__(self, gram: torch.Tensor):
        gram = symmetrized(gram.to(torch.float64))
        norms = gram.diagonal().clamp_min(0.0).sqrt()
        largest = norms.max() if norms.numel() else norms.new_zeros(())
        keep = norms > largest * ZERO_NORM_RTOL
        keep &= norms > 0
        self.gram = gram
        self.norms = torch.where(keep, norms, torch.zeros_like(norms))
        self.active = keep.nonzero().flatten()
        self.n = norms[self.active]
        sub = gram[self.active][:, self.active]
        cos = sub / (self.n[:, None] * self.n[None, :])
        cos = cos.clamp(-1.0, 1.0)
        cos.diagonal().fill_(1.0)
        self.cos = cos

    @property
    def m(self) -> int:
        return self.gram.shape[0]

    @property
    def k(self) -> int:
        return int(self.active.numel())

    def scatter(self, w_active: torch.Tensor) -> torch.Tensor:
        """Full ``(m,)`` weights with ``w_active`` on the active rows and 0 elsewhere."""
        w = self.gram.new_zeros(self.m)
        w[self.active] = w_active
        return w


def dependence_tol(source_dtype: torch.dtype) -> float:
    """Default :func:`nnls_gram` ``dep_tol`` for gradients computed in ``source_dtype``.

    A column whose squared sine with the span of the others is ``sigma`` enters the
    solution with weights up to ``~1/sqrt(sigma)``, which multiplies the rounding error
    of the final ``weights @ grads`` (``eps`` of the gradients' dtype); leaving it out
    instead can leave a conflict of relative size ``~sqrt(sigma)``. Both are balanced at
    ``sigma = eps``, floored where float64 solves stop being accurate.
    """
    return max(torch.finfo(source_dtype).eps, 1e-13)


def nnls_gram(
    q: torch.Tensor, r: torch.Tensor, dep_tol: float, max_iter: int | None = None
) -> torch.Tensor:
    r"""Solve :math:`\min_{z \ge 0} \tfrac12 z^\top Q z - r^\top z` for a small PSD ``Q``.

    This is non-negative least squares in Gram form (``Q = B^T B``, ``r = B^T t``, so
    ``r`` lies in the range of ``Q`` and a minimiser exists even for singular ``Q``),
    solved exactly by the Lawson--Hanson active-set method (in the Gram form of Bro &
    de Jong, 1997), float64. Lawson--Hanson keeps the passive columns linearly
    independent; numerically, a column is only let in if its squared sine with the
    span of the passive columns is above ``dep_tol`` (measured for free as
    ``(r - Q z)_j / s_j``), otherwise it is blocked until the next successful step.
    This makes degenerate inputs (duplicated or parallel columns, more columns than
    dimensions) terminate at the optimum of the non-degenerate part, and bounds the
    weights by ``~1/sqrt(dep_tol)``. At most ``max_iter`` (default ``3 m + 10``) outer
    steps.

    Optimality (KKT): ``z >= 0``, ``(Q z - r)_j ~ 0`` where ``z_j > 0`` and
    ``(Q z - r)_j >= -tol`` elsewhere (``tol = 1e-12 |r|_inf max(1, max diag Q)``) except
    for blocked, numerically dependent columns. Scale ``Q`` to a unit diagonal (as the
    callers do) for ``dep_tol`` to mean the same thing for every column.
    """
    m = q.shape[0]
    if m == 0:
        return q.new_zeros(0)
    # the solution is positively homogeneous in r (z(t r) = t z(r)): solve for r scaled
    # to a unit maximum, so that tolerances relative to Q mean the same for any scale
    # of r (an absolute comparison of r with Q blocked every variable for tiny r)
    r_scale = float(r.abs().max())
    if not r_scale > 0.0:
        return q.new_zeros(m)
    # m is a handful of tasks: plain Python floats beat torch's per-operation overhead
    qq, rr = q.tolist(), (r / r_scale).tolist()
    scale = max(1.0, max(abs(qq[i][i]) for i in range(m)))
    tol = 1e-12 * scale
    z = [0.0] * m
    passive: list[int] = []  # in order of entry
    blocked = [False] * m
    max_iter = 3 * m + 10 if max_iter is None else max_iter
    for _ in range(max_iter):
        # negative gradient r - Q z; z is optimal on the passive set here
        grad = [rr[i] - sum(qq[i][k] * z[k] for k in passive) for i in range(m)]
        j, best = -1, tol
        for i in range(m):
            if grad[i] > best and not blocked[i] and i not in passive:
                j, best = i, grad[i]
        if j < 0:
            break
        trial = passive + [j]
        s = _passive_solve(qq, rr, trial, m)
        # s_j = grad_j / sigma_j, sigma_j = squared distance of column j from the span
        # of the passive columns; tiny sigma_j: numerically dependent, keep it out
        if not s[j] > 0 or grad[j] / s[j] <= dep_tol * qq[j][j]:
            blocked[j] = True
            continue
        blocked = [False] * m
        passive = trial
        for _ in range(m + 1):
            bad = [i for i in passive if s[i] <= 0]
            if not bad:
                break
            # step from z towards s until the first passive variable hits zero
            k = min(bad, key=lambda i: z[i] / max(z[i] - s[i], 1e-300))  # z >= 0 >= s
            alpha = min(max(z[k] / max(z[k] - s[k], 1e-300), 0.0), 1.0)
            z = [zi + alpha * (si - zi) for zi, si in zip(z, s)]
            passive = [i for i in passive if i != k and z[i] > 0]
            z = [z[i] if i in passive else 0.0 for i in range(m)]
            s = _passive_solve(qq, rr, passive, m)
        z = [s[i] if (i in passive and s[i] > 0) else 0.0 for i in range(m)]
        passive = [i for i in passive if z[i] > 0]
    return torch.tensor(z, dtype=q.dtype) * r_scale


def _passive_solve(qq: list, rr: list, passive: list, m: int) -> list:
    """Solve ``Q_PP s_P = r_P`` (``s = 0`` elsewhere) by Cholesky, in Python floats.

    The passive columns are linearly independent (see :func:`nnls_gram`), so ``Q_PP`` is
    positive definite; the eigenvalue pseudo-inverse only guards against a breakdown.
    """
    s = [0.0] * m
    if not passive:
        return s
    k = len(passive)
    a = [[qq[i][j] for j in passive] for i in passive]
    b = [rr[i] for i in passive]
    low = [[0.0] * k for _ in range(k)]
    ok = True
    for i in range(k):
        for j in range(i + 1):
            acc = a[i][j] - sum(low[i][t] * low[j][t] for t in range(j))
            if i == j:
                if not acc > 1e-14 * max(a[i][i], 1e-300):
                    ok = False
                    break
                low[i][i] = acc**0.5
            else:
                low[i][j] = acc / low[j][j]
        if not ok:
            break
    if ok:
        y = [0.0] * k
        for i in range(k):
            y[i] = (b[i] - sum(low[i][t] * y[t] for t in range(i))) / low[i][i]
        x = [0.0] * k
        for i in reversed(range(k)):
            x[i] = (y[i] - sum(low[t][i] * x[t] for t in range(i + 1, k))) / low[i][i]
    else:
        x = psd_pinv_solve(
            torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), 1e-15
        ).tolist()
    for i, xi in zip(passive, x):
        s[i] = xi
    return s


def project_onto_dual_cone(cos: torch.Tensor, shift: torch.Tensor, dep_tol: float) -> torch.Tensor:
    r"""Weights of the projection of ``shift @ A`` onto the dual cone of the unit rows ``A``.

    Solves :math:`\min_{y \ge s} y^\top K y` for the cosine matrix ``K = A A^T`` and a
    shift ``s`` (the projection of :math:`A^\top s` onto :math:`\{x: A x \ge 0\}` is
    :math:`A^\top y`, Quinton & Rey 2024). Returns ``y >= s`` with ``K y >= 0``
    up to the solver tolerance. ``s`` is normalised internally, so any scale works.
    """
    s_scale = float(shift.abs().max()) if shift.numel() else 0.0
    if s_scale == 0.0:
        return torch.zeros_like(shift)
    s = shift / s_scale
    z = nnls_gram(cos, -(cos @ s), dep_tol)
    return (s + z) * s_scale


def min_norm_in_hull(sg: ScaledGram, dep_tol: float) -> torch.Tensor:
    r"""Weights :math:`w \in \Delta` of the minimum-norm point of the convex hull of the rows.

    Uses the identity (for any :math:`\beta > 0`): the minimiser :math:`y^*` of
    :math:`\|A^\top y\|^2 + \beta (a^\top y - 1)^2` over :math:`y \ge 0`, with
    :math:`A` the unit rows, :math:`a_i = 1/\|g_i\|` and :math:`y = D w`, is a positive
    multiple of the scaled min-norm weights (the KKT conditions coincide), so the
    simplex-constrained problem becomes one NNLS on the well-scaled matrix
    :math:`K + \bar a \bar a^\top` (:math:`\bar a = a/\|a\|`, :math:`\beta = 1/\|a\|^2`).
    A zero gradient is itself the minimum-norm point: all weight goes to it. Returns the
    full ``(m,)`` float64 weights (non-negative, summing to 1).
    """
    m = sg.m
    if sg.k < m:  # a zero (or negligible) gradient: the min-norm point is 0
        w = sg.gram.new_zeros(m)
        zero_rows = torch.ones(m, dtype=torch.bool)
        zero_rows[sg.active] = False
        w[zero_rows.nonzero().flatten()[0]] = 1.0
        return w
    a = 1.0 / sg.n
    a_norm = a.norm()
    a_bar = a / a_norm
    q = sg.cos + a_bar[:, None] * a_bar[None, :]
    y = nnls_gram(q, a_bar / a_norm, dep_tol)
    w = y / sg.n
    total = w.sum()
    if not bool(total > 0) or not bool(torch.isfinite(w).all()):
        # cannot happen in exact arithmetic (the linear term is positive); be safe
        w = torch.zeros_like(w)
        w[int(sg.n.argmin())] = 1.0
        return w
    return w / total
