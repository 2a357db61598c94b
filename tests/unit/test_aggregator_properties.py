"""Property tests of the aggregators on randomised gradient systems (hypothesis).

The gradient systems mimic MLIP training: task gradient norms spread over up to four
orders of magnitude (energy vs forces vs stress) anywhere in ``[1e-4, 1e4]``, in float32
and float64, and include the hard cases: strongly conflicting pairs, nearly parallel
or anti-parallel gradients, rank-deficient systems, duplicated and zero rows, and more
tasks than parameters. Every check is an invariant or a defining property of the
method (KKT conditions, non-conflict, closed forms), never a stored number.

Tolerances: results are compared against ``tol * scale`` where ``scale`` is the size of
the terms that are summed (``sum_j |w_j| |g_j|``): a float32 weighted sum of gradient rows
is only accurate to ``eps32 * scale`` however exact the weights are, so a relative
criterion on the (possibly much shorter, e.g. cancelled) result alone cannot hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nequip_mtl.aggregators import (
    IMTLG,
    MGDA,
    AlignedMTL,
    CAGrad,
    ConFIG,
    DualProj,
    Mean,
    PCGrad,
    PrimaryConstrained,
    Sum,
    UPGrad,
)
from nequip_mtl.aggregators._linalg import dependence_tol
from tests.unit._aggregator_classes import GRAM_AGGREGATORS

f32, f64 = torch.float32, torch.float64
ALL_CLASSES = GRAM_AGGREGATORS
# the update is mathematically unique and independent of the task order
ORDER_FREE = [Mean, Sum, IMTLG, MGDA, UPGrad, DualProj, AlignedMTL, CAGrad, ConFIG]

KINDS = (
    "random",
    "conflict",
    "parallel",
    "antiparallel",
    "lowrank",
    "duplicate",
    "zero_row",
    "wide",
)
GENERIC = ("random", "conflict")  # full rank, moderately conditioned (N >= m + 2)
#: relative accuracy expected of a weighted sum of gradient rows (see the module docstring)
TOL = {f32: 2e-5, f64: 1e-11}

SETTINGS = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass
class System:
    grads: torch.Tensor  # (m, N) in `dtype`
    coeffs: torch.Tensor  # (m,) float64, >= 0, sum 1
    kind: str

    @property
    def m(self) -> int:
        return self.grads.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.grads.dtype

    def gram(self) -> torch.Tensor:
        g = self.grads.double()
        return g @ g.T

    def __repr__(self) -> str:  # readable hypothesis failure reports
        norms = self.grads.double().norm(dim=1)
        return (
            f"System(kind={self.kind}, m={self.m}, N={self.grads.shape[1]}, dtype={self.dtype}, "
            f"norms={norms.tolist()}, coeffs={self.coeffs.tolist()})"
        )


def build(seed, m, n, kind, dtype, log_ratio, center, equal_coeffs) -> System:
    gen = torch.Generator().manual_seed(seed)
    if kind == "wide":
        n = max(1, min(n, m - 1))
    elif kind in GENERIC:
        n = max(n, m + 2)
    d = torch.randn(m, n, generator=gen, dtype=f64)
    if kind == "conflict":
        d[1::2] = -d[0::2][: d[1::2].shape[0]] + 0.3 * d[1::2]
    elif kind in ("parallel", "antiparallel"):
        spread = 10 ** (-6 + 5 * torch.rand((), generator=gen, dtype=f64))
        d = torch.randn(1, n, generator=gen, dtype=f64) + spread * d
        if kind == "antiparallel":
            d[1::2] = -d[1::2]
    elif kind == "lowrank":
        rank = max(1, min(m - 1, n) // 2)
        d = torch.randn(m, rank, generator=gen, dtype=f64) @ torch.randn(
            rank, n, generator=gen, dtype=f64
        )
    d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-300)
    # norms log-uniform over `log_ratio` decades around `center`, both extremes present
    u = torch.rand(m, generator=gen, dtype=f64)
    u[0], u[-1] = 0.0, 1.0
    log_norms = center + log_ratio * (u - 0.5)
    grads = d * (10.0**log_norms)[:, None]
    if kind == "duplicate":
        grads[-1] = grads[0]
    elif kind == "zero_row":
        grads[int(torch.randint(m, (), generator=gen))] = 0.0
    if equal_coeffs:
        coeffs = torch.full((m,), 1.0 / m, dtype=f64)
    else:
        coeffs = torch.rand(m, generator=gen, dtype=f64) + 0.05
        coeffs = coeffs / coeffs.sum()
    return System(grads.to(dtype), coeffs, kind)


@st.composite
def systems(
    draw,
    kinds=KINDS,
    max_decades=4.0,
    min_m=2,
    max_m=6,
    dtypes=(f32, f64),
    equal_coeffs=None,
):
    """Gradient systems with norms in [1e-4, 1e4] spanning up to `max_decades` decades."""
    log_ratio = draw(st.floats(0.0, max_decades))
    return build(
        seed=draw(st.integers(0, 2**31 - 1)),
        m=draw(st.integers(min_m, max_m)),
        n=draw(st.integers(1, 24)),
        kind=draw(st.sampled_from(kinds)),
        dtype=draw(st.sampled_from(dtypes)),
        log_ratio=log_ratio,
        center=draw(st.floats(-4.0 + log_ratio / 2, 4.0 - log_ratio / 2)),
        equal_coeffs=draw(st.booleans()) if equal_coeffs is None else equal_coeffs,
    )


def weights_and_update(agg, s: System, coeffs=None):
    """The Gram path (float64 Gram of the gradients) and the call path, both."""
    c = s.coeffs if coeffs is None else coeffs
    w = agg.weights(s.gram(), c, source_dtype=s.dtype)
    return w, w.to(s.dtype) @ s.grads


def term_scale(w: torch.Tensor, s: System) -> torch.Tensor:
    """sum_j |w_j| |g_j|: the size of the terms of the weighted sum."""
    return (w.abs() * s.grads.double().norm(dim=1)).sum()


def fresh(cls):
    return cls(seed=0) if cls is PCGrad else cls()


# --------------------------------------------------------------------------- robustness
@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
@SETTINGS
@given(s=systems(max_decades=8.0))
def test_finite_and_bounded_on_every_kind_of_system(cls, s):
    """Finite weights and update for finite gradients, norms anywhere in [1e-4, 1e4]."""
    w, u_w = weights_and_update(fresh(cls), s)
    u = fresh(cls)(s.grads, s.coeffs.to(s.dtype))
    assert torch.isfinite(w).all() and torch.isfinite(u_w).all() and torch.isfinite(u).all()
    assert u.dtype == s.dtype and w.dtype == f64
    norms = s.grads.double().norm(dim=1)
    c = s.coeffs
    slack = 1 + 1e-4
    bound = {
        Mean: norms.mean(),
        Sum: (c * norms).sum(),
        PCGrad: (c * norms).sum(),  # projections only shorten
        UPGrad: (c * norms).sum(),  # projections onto a convex cone only shorten
        DualProj: (c * norms).sum(),
        MGDA: norms.min(),  # the min-norm point is no longer than any g_i
        CAGrad: (c * norms).sum() * (1 + 0.4) / (1 + 0.4**2),
        ConFIG: norms.sum(),  # |u| = sum_i g_i . x_hat
        AlignedMTL: c.norm() * norms.norm(),  # sqrt(lambda_R) |c|, lambda_R <= trace(H)
        PrimaryConstrained: c[0] * norms[0],  # a projection of the primary c_0 g_0
    }.get(cls)
    if bound is not None:
        assert u.double().norm() <= bound * slack + 1e-30


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
@SETTINGS
@given(s=systems())
def test_call_path_matches_gram_path(cls, s):
    """agg(grads, coeffs) == weights(grads @ grads.T) @ grads, up to the Gram's dtype."""
    w, u_w = weights_and_update(fresh(cls), s)
    u = fresh(cls)(s.grads, s.coeffs.to(s.dtype))
    if s.dtype == f64 or s.kind in GENERIC:
        # float32 Grams of degenerate systems may legitimately resolve ties differently
        tol = TOL[s.dtype] * (1e3 if cls in (IMTLG, ConFIG, AlignedMTL) else 10)
        scale = term_scale(w, s) + 1e-300
        assert (u.double() - u_w.double()).norm() <= tol * scale


# --------------------------------------------------------------------------- invariances
@pytest.mark.parametrize("cls", ORDER_FREE, ids=lambda c: c.__name__)
@SETTINGS
@given(s=systems(kinds=GENERIC), perm_seed=st.integers(0, 1000))
def test_permutation_equivariance(cls, s, perm_seed):
    perm = torch.randperm(s.m, generator=torch.Generator().manual_seed(perm_seed))
    w, u = weights_and_update(cls(), s)
    permuted = System(s.grads[perm], s.coeffs[perm], s.kind)
    w_p, u_p = weights_and_update(cls(), permuted)
    scale = term_scale(w, s)
    assert (u_p.double() - u.double()).norm() <= 100 * TOL[s.dtype] * scale
    torch.testing.assert_close(w_p, w[perm], rtol=1e-6, atol=1e-9 * w.abs().max())


@SETTINGS
@given(s=systems(min_m=2, max_m=2))
def test_pcgrad_two_tasks_is_order_free_and_non_conflicting(s):
    w, u = weights_and_update(PCGrad(seed=0), s)
    w_r, u_r = weights_and_update(PCGrad(seed=0), System(s.grads.flip(0), s.coeffs.flip(0), s.kind))
    torch.testing.assert_close(w_r.flip(0), w)
    g = s.grads.double()
    assert ((g @ (w @ g)) >= -TOL[f64] * g.norm(dim=1) * term_scale(w, s)).all()


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
@SETTINGS
@given(s=systems(kinds=GENERIC, max_decades=3.0), log2_scale=st.integers(-12, 12))
def test_positive_homogeneity(cls, s, log2_scale):
    """u(t G) = t u(G) for t > 0 (every method here is scale-free in this sense).

    Powers of two scale float32/float64 gradients exactly, so the weights must agree to
    the float64 rounding of the solvers.
    """
    t = 2.0**log2_scale
    w, _ = weights_and_update(fresh(cls), s)
    w_t, _ = weights_and_update(fresh(cls), System(s.grads * t, s.coeffs, s.kind))
    torch.testing.assert_close(w_t, w, rtol=1e-6, atol=1e-9 * w.abs().max())


@pytest.mark.parametrize("cls", [ConFIG, IMTLG], ids=lambda c: c.__name__)
@SETTINGS
@given(
    s=systems(kinds=GENERIC, max_decades=3.0),
    log_scales=st.lists(st.floats(-2, 2), min_size=6, max_size=6),
)
def test_direction_invariant_to_rescaling_one_task(cls, s, log_scales):
    t = 10.0 ** torch.tensor(log_scales[: s.m], dtype=f64)
    _, u = weights_and_update(cls(), s)
    _, u_t = weights_and_update(cls(), System(s.grads * t[:, None].to(s.dtype), s.coeffs, s.kind))
    u, u_t = u.double(), u_t.double()
    cos = u @ u_t / (u.norm() * u_t.norm())
    assert cos >= 1 - (1e-8 if s.dtype == f64 else 1e-4)


# --------------------------------------------------------------------------- guarantees
def assert_non_conflicting(s: System, w: torch.Tensor, u: torch.Tensor):
    g = s.grads.double()
    u = u.double()
    norms = g.norm(dim=1)
    scale = term_scale(w, s)
    dots = g @ u
    assert (dots >= -TOL[s.dtype] * norms * scale).all(), (dots / (norms * scale)).tolist()
    # where the update is not a cancellation of much longer terms, the cosine itself
    if u.norm() >= 1e-2 * scale:
        cos = dots / (norms * u.norm()).clamp_min(1e-300)
        assert (cos >= -100 * TOL[s.dtype]).all(), cos.tolist()


@pytest.mark.parametrize("cls", [UPGrad, DualProj], ids=lambda c: c.__name__)
@SETTINGS
@given(s=systems())
def test_upgrad_dualproj_never_conflict(cls, s):
    """u . g_i >= 0 for every task, norm ratios up to 1e4, degenerate systems included."""
    w, u_w = weights_and_update(cls(), s)
    assert_non_conflicting(s, w, u_w)
    assert_non_conflicting(s, w, cls()(s.grads, s.coeffs.to(s.dtype)))


@SETTINGS
@given(s=systems())
def test_mgda_kkt_conditions(s):
    """w >= 0, sum w = 1, g_i . d >= |d|^2 for all i, with equality where w_i > 0."""
    w, _ = weights_and_update(MGDA(), s)
    assert (w >= 0).all()
    assert abs(w.sum().item() - 1.0) <= 1e-12
    g = s.grads.double()
    d = w @ g
    gap = g @ d - d @ d  # = (g_i - d) . d
    scale = g.norm(dim=1) * term_scale(w, s)
    if s.kind in GENERIC:
        tol = 1e-9 * scale
    else:
        # a task gradient numerically dependent on the solution's support (squared sine
        # below dependence_tol) is left out; the KKT residual it can leave is bounded by
        # sqrt(dependence_tol) (measured: <= 1e-9 relative in float64, 5e-8 in float32)
        tol = math.sqrt(dependence_tol(s.dtype)) * scale
    assert (gap >= -tol).all(), gap.tolist()
    support = w > 1e-6
    assert (gap[support].abs() <= tol[support]).all(), gap.tolist()


@SETTINGS
@given(s=systems(kinds=GENERIC, max_decades=4.0, max_m=5))
def test_imtlg_equal_projections(s):
    """u . g_i / |g_i| is proportional to c_i (equal with equal coefficients) and >= 0."""
    w, u = weights_and_update(IMTLG(), s)
    g, u = s.grads.double(), u.double()
    cos = (g @ u) / (g.norm(dim=1) * u.norm())
    assert_cosines_proportional(cos, s.coeffs, w, s)
    # the paper's normalisation sum(w) = 1, up to the sign that makes the update descend
    assert abs(w.sum().item()) == pytest.approx(1.0, rel=1e-9)


def assert_cosines_proportional(cos, coeffs, w, s: System):
    """cos_i = k c_i with k > 0, to the accuracy of the float weighted sum behind cos."""
    assert (cos > 0).all(), cos.tolist()
    k = (cos @ coeffs) / (coeffs @ coeffs)
    u_norm = (w @ s.grads.double()).norm()
    tol = (1e-10 if s.dtype == f64 else 1e-5) * term_scale(w, s) / u_norm
    assert (cos - k * coeffs).abs().max() <= tol, (cos / coeffs).tolist()


@SETTINGS
@given(s=systems(kinds=GENERIC))
def test_cagrad_improves_worst_case_within_the_ball(s):
    """|d - g0| <= c |g0|, and the worst task does at least as well as with g0 itself."""
    c = 0.4
    w, _ = weights_and_update(CAGrad(c=c, rescale=False), s)
    g = s.grads.double()
    d, g0 = w @ g, s.coeffs @ g
    assert (d - g0).norm() <= c * g0.norm() * (1 + 1e-9) + 1e-300
    slack = 1e-9 * g.norm(dim=1).max() * g0.norm()
    assert (g @ d).min() >= (g @ g0).min() - slack
    gen = torch.Generator().manual_seed(s.m)
    for _ in range(20):  # random points of the ball are no better
        step = torch.randn(g.shape[1], generator=gen, dtype=f64)
        other = g0 + c * g0.norm() * step / step.norm()
        assert (g @ other).min() <= (g @ d).min() + slack


@SETTINGS
@given(s=systems(kinds=GENERIC, max_decades=2.0))
def test_aligned_mtl_update_norm(s):
    """|u|^2 = lambda_min |c|^2 for linearly independent gradients (scale_mode='min')."""
    w, _ = weights_and_update(AlignedMTL(), s)
    g = s.grads.double()
    u = w @ g
    lam_min = torch.linalg.eigvalsh(g @ g.T)[0]
    assert (u @ u).item() == pytest.approx((lam_min * s.coeffs @ s.coeffs).item(), rel=1e-6)


@SETTINGS
@given(s=systems(dtypes=(f32, f64)), pos_seed=st.integers(0, 1000))
def test_no_conflict_means_upgrad_dualproj_pcgrad_equal_the_weighted_sum(s, pos_seed):
    """With g_i . g_j >= 0 for all pairs, the cone methods change nothing."""
    g = s.grads.double().abs()  # non-negative entries: every pair is non-conflicting
    s = System(g.to(s.dtype), s.coeffs, s.kind)
    expected = s.coeffs.to(s.dtype) @ s.grads
    for agg in (UPGrad(), DualProj(), PCGrad(seed=pos_seed)):
        w, u = weights_and_update(agg, s)
        tol = TOL[s.dtype] * term_scale(s.coeffs, s)
        assert (u.double() - expected.double()).norm() <= tol
        assert (agg(s.grads, s.coeffs.to(s.dtype)).double() - expected.double()).norm() <= tol


@SETTINGS
@given(s=systems(dtypes=(f32, f64), kinds=GENERIC))
def test_upgrad_equals_mean_with_equal_coefficients_and_no_conflict(s):
    g = s.grads.double().abs().to(s.dtype)
    u = UPGrad()(g)
    torch.testing.assert_close(u, g.mean(0), rtol=10 * TOL[s.dtype], atol=0.0)


# --------------------------------------------------------------------------- ConFIG
def nequip_config(grads, coeffs, eps=1e-8):
    """nequip.train.ConFIGLightningModule's update (nequip/train/config.py), in float64."""
    a = F.normalize(grads, dim=1, eps=eps)
    b = F.normalize(coeffs, dim=0, eps=eps)
    x = F.normalize(torch.linalg.lstsq(a, b).solution, dim=0, eps=eps)
    return (grads * x).sum() * x


@SETTINGS
@given(s=systems(kinds=GENERIC))
def test_config_cosines_proportional_to_coefficients_and_length(s):
    w, u = weights_and_update(ConFIG(), s)
    g, u = s.grads.double(), u.double()
    cos = (g @ u) / (g.norm(dim=1) * u.norm())
    assert_cosines_proportional(cos, s.coeffs, w, s)
    # length = sum of the projections of the raw gradients onto the direction
    rel = 1e-10 if s.dtype == f64 else 1e-5
    assert u.norm().item() == pytest.approx((g @ (u / u.norm())).sum().item(), rel=rel)


@SETTINGS
@given(s=systems(kinds=GENERIC, equal_coeffs=True))
def test_config_equal_positive_cosine_with_every_task(s):
    u = ConFIG()(s.grads).double()
    w = ConFIG().weights(s.gram(), s.coeffs, source_dtype=s.dtype)
    g = s.grads.double()
    cos = (g @ u) / (g.norm(dim=1) * u.norm())
    assert_cosines_proportional(cos, s.coeffs, w, s)  # equal coefficients: equal cosines


@SETTINGS
@given(s=systems(kinds=GENERIC))
def test_config_agrees_with_nequip(s):
    """Exact agreement with nequip's formula (evaluated in float64 on the same data)."""
    expected = nequip_config(s.grads.double(), s.coeffs)
    for u in (
        ConFIG()(s.grads, s.coeffs.to(s.dtype)),
        ConFIG(lsqr=False)(s.grads, s.coeffs.to(s.dtype)),
    ):
        tol = 1e-9 if s.dtype == f64 else 1e-4
        assert (u.double() - expected).norm() <= tol * expected.norm()


@SETTINGS
@given(s=systems(kinds=("lowrank", "duplicate", "wide", "parallel", "antiparallel", "zero_row")))
def test_config_degenerate_systems_are_finite(s):
    for agg in (ConFIG(), ConFIG(lsqr=False)):
        u = agg(s.grads, s.coeffs.to(s.dtype))
        assert torch.isfinite(u).all()
        assert u.double().norm() <= s.grads.double().norm(dim=1).sum() * (1 + 1e-4)


# --------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [f32, f64], ids=str)
def test_explicit_edge_cases_are_finite(cls, dtype):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, generator=gen, dtype=f64)
    cases = {
        "all_zero": torch.zeros(3, 5, dtype=f64),
        "one_zero_row": torch.cat([base[:2], torch.zeros(1, 5, dtype=f64)]),
        "duplicates": torch.stack([base[0], base[0], base[0]]),
        "opposite": torch.stack([base[0], -base[0], base[1]]),
        "huge": base * 1e4,
        "tiny": base * 1e-4,
        "spread_1e8": base * torch.tensor([[1e4], [1.0], [1e-4]], dtype=f64),
        "m_gt_n": torch.randn(6, 2, generator=gen, dtype=f64),
        "one_param": torch.tensor([[1.0], [-2.0], [1e-3]], dtype=f64),
    }
    for name, grads in cases.items():
        grads = grads.to(dtype)
        agg = fresh(cls)
        u = agg(grads)
        w = agg.weights(
            grads.double() @ grads.double().T,
            torch.full((len(grads),), 1 / len(grads), dtype=f64),
            source_dtype=dtype,
        )
        assert torch.isfinite(u).all() and torch.isfinite(w).all(), name
        if name == "all_zero":
            assert (u == 0).all(), name


# --------------------------------------------------------------------------- extreme scales
#: ~1e-20, ~1e-12, 1, ~1e12 and ~7e19 as exact powers of two, so that c * G is exact in
#: float32 and float64 and the weights must agree to the rounding of the float64 solvers.
#: 2**-66: float32 squares underflow; 2**66: float32 squares overflow (the Gram is then
#: formed from power-of-two rescaled rows).
EXTREME_SCALES = [2.0**-66, 2.0**-40, 1.0, 2.0**40, 2.0**66]


def homogeneous_instance(cls, scale):
    """An instance that is positively homogeneous at this scale of the gradients.

    ConFIG (like nequip's) floors every norm at the absolute `norm_eps` (1e-8): it is
    homogeneous only while all task gradient norms exceed it, so below that it is tested
    with the floor out of the way.
    """
    if cls is ConFIG and scale < 1.0:
        return ConFIG(norm_eps=1e-300)
    return fresh(cls)


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
@SETTINGS
@given(s=systems(kinds=GENERIC, max_decades=3.0), scale_index=st.integers(0, 4))
def test_positive_homogeneity_at_extreme_scales(cls, s, scale_index):
    """agg(c G) == c agg(G) through the whole call path (Gram, checks, solvers), for
    gradient norms from ~1e-24 to ~1e24 in float32 and float64."""
    c = EXTREME_SCALES[scale_index]
    u = homogeneous_instance(cls, c)(s.grads, s.coeffs.to(s.dtype)).double()
    u_c = homogeneous_instance(cls, c)(s.grads * c, s.coeffs.to(s.dtype)).double() / c
    assert torch.isfinite(u_c).all()
    w, _ = weights_and_update(fresh(cls), s)
    # CAGrad's root finding on log(lambda) stops at a relative 1e-10
    tol = 1e-9 if cls is CAGrad else 10 * TOL[s.dtype]
    assert (u_c - u).norm() <= tol * term_scale(w, s)


def test_config_default_norm_floor_is_not_homogeneous_below_it():
    """Documented: with the default `norm_eps` (nequip's 1e-8), gradients whose norms are
    all below the floor get a different direction; with the floor lowered they do not."""
    g = build(3, 3, 12, "conflict", f64, 2.0, 0.0, True).grads
    c = 2.0**-66
    u = ConFIG()(g)
    assert (ConFIG()(g * c) / c - u).norm() > 1e-3 * u.norm()
    assert (ConFIG(norm_eps=1e-300)(g * c) / c - u).norm() <= 1e-12 * u.norm()


@pytest.mark.parametrize("lsqr", [True, False], ids=["lsqr", "pinv"])
@SETTINGS
@given(
    s=systems(
        kinds=("antiparallel", "parallel", "duplicate", "conflict", "random"),
        min_m=2,
        max_m=2,
        max_decades=4.0,
    )
)
def test_config_pairs_never_conflict(lsqr, s):
    """Two tasks, including (near-)antiparallel float32 pairs at norm ratios up to 1e4: the
    update has a non-negative cosine with both (ConFIG's guarantee; for an exactly or
    numerically antiparallel pair the only such direction in their span is 0)."""
    agg = ConFIG(lsqr=lsqr)
    w = agg.weights(s.gram(), s.coeffs, source_dtype=s.dtype)
    g, u = s.grads.double(), agg(s.grads, s.coeffs.to(s.dtype)).double()
    # rounding of the float32/64 weighted sum: TOL * sum_j |w_j| |g_j| (module docstring)
    assert (g @ u >= -10 * TOL[s.dtype] * g.norm(dim=1) * term_scale(w, s)).all()


@pytest.mark.parametrize("lsqr", [True, False], ids=["lsqr", "pinv"])
@pytest.mark.parametrize("dtype", [f32, f64], ids=str)
@pytest.mark.parametrize("ratio", [1.0, 1e2, 1e4])
def test_config_exactly_antiparallel_pair_gives_zero(lsqr, dtype, ratio):
    """g and -r g: no non-zero direction in their span conflicts with neither, so ConFIG
    returns (numerically) zero, as nequip's ConFIG does (its normalisation floor turns
    the ~1e-17 least-squares solution into a ~0 update)."""
    g = torch.randn(20, generator=torch.Generator().manual_seed(0), dtype=f64)
    grads = torch.stack([g, -ratio * g]).to(dtype)
    u = ConFIG(lsqr=lsqr)(grads).double()
    scale = grads.double().norm(dim=1).sum()
    assert u.norm() <= 10 * TOL[dtype] * scale
    expected = nequip_config(grads.double(), torch.full((2,), 0.5, dtype=f64))
    assert expected.norm() <= 10 * TOL[dtype] * scale
