"""Tolerances of the Gram-space aggregators are relative.

An absolute tolerance (a zero-norm test, an eigenvalue cut-off, a conflict test) passes
at the scale it was written for and breaks at another; MLIP task gradients differ by
four decades in norm and mixed precision rescales them. Each test scales its inputs over
many decades and checks the result against its exact scaling or a closed form.
"""

from __future__ import annotations

import pytest
import torch

from nequip_mtl.aggregators import (
    IMTLG,
    MGDA,
    AlignedMTL,
    CAGrad,
    ConFIG,
    DualProj,
    Mean,
    PCGrad,
    Sum,
    UPGrad,
)
from nequip_mtl.aggregators._linalg import gram_matrix, psd_pinv_solve

#: gradient scales 1e-9 .. 1e9: 18 decades (Gram entries over 36)
SCALES = [10.0**k for k in range(-9, 10, 3)]


def _gradients(small: float = 1e-4) -> torch.Tensor:
    """Three float64 task gradients: a conflicting pair and a task ``small`` times weaker."""
    g = torch.Generator().manual_seed(0)
    grads = torch.randn(3, 20, generator=g, dtype=torch.float64)
    grads[1] = -0.7 * grads[0] + 0.3 * grads[1]
    grads[2] *= small
    return grads


COEFFS = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)


def test_gram_matrix_is_accurate_at_every_float32_scale():
    """float32 gradients from 1e-36 (subnormal squares) to 1e36 (overflowing squares): the
    float64 Gram matches the exact one to float32 rounding, relative to the norms."""
    grads = torch.randn(3, 50, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads[2] *= 1e-3
    for k in range(-36, 37, 4):
        g32 = (grads * 10.0**k).float()
        exact = g32.double() @ g32.double().T
        got = gram_matrix(g32, "test")
        norms = exact.diagonal().sqrt()
        err = float(((got - exact).abs() / (norms[:, None] * norms[None, :])).max())
        assert err < 1e-6, f"scale 1e{k}: relative error {err:.2e}"


def test_float32_gram_with_subnormal_entries_matches_float64():
    """float32 gradients near 2^-70, whose products (and squared norms, ~1e-40) lie in the
    subnormal range, where float32 keeps only a few significant bits: the Gram must be
    formed from power-of-two rescaled rows. Then each entry is a float32 dot product of
    the exactly rescaled rows, within ``gamma_n |g_i| |g_j|`` (``gamma_n = n u / (1 - n
    u)``, ``u = 2^-24``, Cauchy-Schwarz) of the float64 one, itself exact to ``n 2^-53``.
    Computed in float32 as is, the entries are off by ~1e-2 of that.

    Fails if the rescaling floor is lowered into the subnormal range (e.g. ``lo = n *
    tiny * eps`` instead of ``n * tiny / eps``, or ``diag > 0`` instead of ``diag >= lo``)."""
    n = 8
    g = torch.randn(3, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g32 = (g * torch.tensor([2.0**-68, 2.0**-70, 2.0**-72], dtype=torch.float64)[:, None]).float()
    exact = g32.double() @ g32.double().T  # products of float32 values are exact in float64
    assert float(exact.diagonal().max()) < torch.finfo(torch.float32).tiny  # subnormal scale
    got = gram_matrix(g32, "test")
    norms = exact.diagonal().sqrt()
    u = 2.0**-24
    bound = (n * u / (1 - n * u) + n * 2.0**-53) * norms[:, None] * norms[None, :]
    assert bool(((got - exact).abs() <= bound).all()), (got - exact).abs() / bound


@pytest.mark.parametrize(
    "aggregator",
    [UPGrad, DualProj, MGDA, IMTLG, CAGrad, AlignedMTL, PCGrad, Sum, Mean],
    ids=lambda c: c.__name__,
)
def test_weights_do_not_depend_on_the_gradient_scale(aggregator):
    """Every update is positively homogeneous of degree 1, so the weights of ``t G`` are
    those of ``G`` for every ``t > 0``: 18 decades, with a task 1e-4 times weaker than
    the others (the zero-norm test of the cosine rescaling is relative to the largest
    norm, not absolute)."""
    grads = _gradients()
    ref = aggregator().weights(grads @ grads.T, COEFFS)
    assert float(ref[2]) != 0.0  # the weak task takes part
    for t in SCALES:
        scaled = grads * t
        w = aggregator().weights(scaled @ scaled.T, COEFFS)
        torch.testing.assert_close(w, ref, rtol=1e-9, atol=1e-12 * float(ref.abs().max()))


def test_config_weights_do_not_depend_on_the_gradient_scale():
    """ConFIG floors norms at its absolute ``norm_eps`` (1e-8, as nequip does, documented):
    above it, 12 decades of scale leave the weights unchanged."""
    grads = _gradients(small=1e-2)
    grads = grads / grads.norm(dim=1).min()  # smallest norm 1 at t = 1
    ref = ConFIG().weights(grads @ grads.T, COEFFS)
    for k in range(-6, 7):
        scaled = grads * 10.0**k
        w = ConFIG().weights(scaled @ scaled.T, COEFFS)
        torch.testing.assert_close(w, ref, rtol=1e-9, atol=0, msg=f"scale 1e{k}")


def test_pseudo_inverse_cutoff_is_relative():
    """A PSD matrix with eigenvalues (1, 0.5, 1e-18): the cut-off drops the last one at
    every scale of the matrix (1e-12 .. 1e12), giving ``U diag(1, 2, 0) U^T b``."""
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(2)).double())
    evals = torch.tensor([1.0, 0.5, 1e-18], dtype=torch.float64)
    gram = q @ torch.diag(evals) @ q.T
    rhs = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    expected = q @ (torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64) * (q.T @ rhs))
    for k in range(-12, 13, 2):
        t = 10.0**k
        # (t H)^+ (t b) = H^+ b
        got = psd_pinv_solve(gram * t, rhs * t, rtol=1e-10)
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10, msg=f"scale 1e{k}")


def _pcgrad_closed_form(grads: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Two tasks: each gradient loses its component along the other if they conflict."""
    g1, g2 = grads
    dot = g1 @ g2
    if dot < 0:
        p1 = g1 - dot / (g2 @ g2) * g2
        p2 = g2 - dot / (g1 @ g1) * g1
    else:
        p1, p2 = g1, g2
    return c[0] * p1 + c[1] * p2


@pytest.mark.parametrize("sign", [-1.0, 1.0], ids=["conflict", "no-conflict"])
def test_pcgrad_projection_test_is_relative(sign):
    """``[[1, 0], [sign 1e-8, 1e-8]]`` scaled by 1e-6 .. 1e6: a conflict of cosine -0.7 with
    a gradient 1e8 times weaker is a conflict at every scale (the weak task pulls the
    strong one halfway round); without a conflict PCGrad is the weighted sum."""
    base = torch.tensor([[1.0, 0.0], [sign * 1e-8, 1e-8]], dtype=torch.float64)
    c = torch.tensor([0.5, 0.5], dtype=torch.float64)
    for k in range(-6, 7):
        grads = base * 10.0**k
        update = PCGrad().weights(grads @ grads.T, c) @ grads
        expected = _pcgrad_closed_form(grads, c)
        torch.testing.assert_close(update, expected, rtol=1e-9, atol=0, msg=f"scale 1e{k}")
    if sign < 0:  # the closed form's projected strong gradient is (0.5, 0.5)
        torch.testing.assert_close(
            _pcgrad_closed_form(base, c), torch.tensor([0.25, 0.25 + 0.5e-8]).double()
        )


@pytest.mark.parametrize("lsqr", [True, False])
def test_config_weights_equal_for_a_float32_gram_and_its_transpose(lsqr):
    """A float32 Gram matrix is symmetric only to its rounding (blocked products sum in
    different orders); one ulp of asymmetry in a nearly rank-deficient system must not
    change the weights: ConFIG solves the symmetric part of what it is given."""
    g = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    g[1] = g[0] + 1e-4 * g[1]  # nearly parallel in float32
    g[2] = 30 * g[2]
    gram32 = g @ g.T
    gram32[0, 1] = torch.nextafter(gram32[0, 1], torch.tensor(float("inf")))
    gram = gram32.double()
    assert not torch.equal(gram, gram.T)
    c = torch.full((3,), 1 / 3, dtype=torch.float64)
    agg = ConFIG(lsqr=lsqr)
    w = agg.weights(gram, c, source_dtype=torch.float32)
    w_t = agg.weights(gram.T.contiguous(), c, source_dtype=torch.float32)
    assert torch.equal(w, w_t), (w - w_t).abs().max()
    assert bool(torch.isfinite(w).all())
