"""PrimaryConstrained: the primary gradient projected onto the constraints' dual cone.

Every expected value is independent of the code under test: the A-GEM closed form, the
decoupled closed form of orthogonal constraints, the projection found by enumerating
active sets with least squares on the raw gradients, the KKT conditions of the QP, and
DualProj (tested on its own) side by side where the two problems coincide.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nequip_mtl.aggregators import DualProj, PrimaryConstrained, Sum
from tests.unit.test_aggregator_properties import (
    EXTREME_SCALES,
    GENERIC,
    SETTINGS,
    TOL,
    System,
    systems,
    term_scale,
)

f32, f64 = torch.float32, torch.float64


def randn(*shape, seed, dtype=f64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def solve(agg, grads, coeffs):
    """(weights from the float64 Gram, the update from the call path), as the module uses."""
    g = grads.double()
    w = agg.weights(g @ g.T, coeffs, source_dtype=grads.dtype)
    return w, agg(grads, coeffs.to(grads.dtype)).double()


def split(s: System, num_primary: int):
    """The first ``num_primary`` tasks are primary (the aggregator is told by position)."""
    primary = list(range(num_primary))
    g = s.grads.double()
    gp = s.coeffs[:num_primary] @ g[:num_primary]
    return PrimaryConstrained(primary=primary), g, gp, g[num_primary:]


def agem(gp: torch.Tensor, gr: torch.Tensor) -> torch.Tensor:
    """Chaudhry et al. 2019, eq. 11."""
    dot = gp @ gr
    return gp - dot / (gr @ gr) * gr if dot < 0 else gp


def projection_by_enumeration(gp: torch.Tensor, gc: torch.Tensor) -> torch.Tensor:
    """min |u - gp| s.t. gc @ u >= 0, by trying every active set (float64 least squares).

    For an active set S the candidate is the projection of ``gp`` onto the subspace
    orthogonal to ``gc[S]``; the solution is the closest feasible candidate.
    """
    best, best_dist = None, float("inf")
    scale = gp.norm() * gc.norm(dim=1)
    for r in range(gc.shape[0] + 1):
        for subset in itertools.combinations(range(gc.shape[0]), r):
            u = gp.clone()
            if subset:
                b = gc[list(subset)]
                coef = torch.linalg.lstsq(b.T, gp.unsqueeze(1)).solution.squeeze(1)
                u = gp - b.T @ coef
            if (gc @ u >= -1e-9 * scale).all() and (u - gp).norm() < best_dist:
                best, best_dist = u, (u - gp).norm()
    return best


# --------------------------------------------------------------------------- the guarantee
@SETTINGS
@given(s=systems(max_decades=4.0), num_primary=st.integers(1, 3))
def test_never_conflicts_with_a_constraint(s, num_primary):
    """u . g_c >= 0 for every constraint, on every kind of system, float32 and float64,
    norms anywhere in [1e-4, 1e4]; u . g_p = |u|^2 >= 0 and |u| <= |g_p|."""
    num_primary = min(num_primary, s.m - 1)
    agg, g, gp, gc = split(s, num_primary)
    w, u = solve(agg, s.grads, s.coeffs)
    assert torch.isfinite(w).all() and torch.isfinite(u).all()
    scale = term_scale(w, s)
    tol = TOL[s.dtype] * scale
    dots = gc @ u
    assert (dots >= -tol * gc.norm(dim=1)).all(), (dots / (gc.norm(dim=1) * scale)).tolist()
    if u.norm() >= 1e-2 * scale:  # not a cancellation of much longer terms: the cosine
        cos = dots / (gc.norm(dim=1) * u.norm()).clamp_min(1e-300)
        assert (cos >= -100 * TOL[s.dtype]).all(), cos.tolist()
    assert (u @ gp - u @ u).abs() <= 10 * tol * (gp.norm() + u.norm())
    assert u.norm() <= gp.norm() + 10 * tol
    # the primaries keep their coefficients; constraints only ever push (lambda >= 0)
    assert torch.equal(w[:num_primary], s.coeffs[:num_primary])
    assert (w[num_primary:] >= 0).all()


@SETTINGS
@given(s=systems(kinds=GENERIC, max_decades=4.0, max_m=5), num_primary=st.integers(1, 2))
def test_is_the_closest_non_conflicting_update(s, num_primary):
    """The minimal change: equal to the projection found by enumerating active sets, and
    the KKT conditions hold (lambda >= 0, lambda_c (u . g_c) = 0)."""
    num_primary = min(num_primary, s.m - 1)
    agg, g, gp, gc = split(s, num_primary)
    w, u = solve(agg, s.grads, s.coeffs)
    expected = projection_by_enumeration(gp, gc)
    scale = term_scale(w, s)
    assert (u - expected).norm() <= 100 * TOL[s.dtype] * scale
    lam = w[num_primary:]
    slack = lam * (gc @ (w @ g))  # w @ g in float64: the weights' own accuracy
    assert (slack.abs() <= 1e-9 * lam * gc.norm(dim=1) * scale).all(), slack.tolist()


@SETTINGS
@given(s=systems(kinds=GENERIC, max_decades=4.0))
def test_one_primary_equals_dualproj_projecting_only_the_primary(s):
    """With one primary, u . g_p >= 0 holds anyway, so the problem is DualProj's with the
    coefficient vector (c_p, 0, ..., 0): same update (solved by another code path)."""
    w, u = solve(PrimaryConstrained(primary=0), s.grads, s.coeffs)
    only = torch.zeros_like(s.coeffs)
    only[0] = s.coeffs[0]
    _, u_ref = solve(DualProj(), s.grads, only)
    assert (u - u_ref).norm() <= 100 * TOL[s.dtype] * term_scale(w, s)


# --------------------------------------------------------------------------- no conflict
@SETTINGS
@given(s=systems(dtypes=(f32, f64)), num_primary=st.integers(1, 3))
def test_without_conflict_the_primary_gradient_is_left_exactly_unchanged(s, num_primary):
    num_primary = min(num_primary, s.m - 1)
    s = System(s.grads.abs(), s.coeffs, s.kind)  # non-negative entries: no conflict at all
    agg, g, gp, gc = split(s, num_primary)
    w, u = solve(agg, s.grads, s.coeffs)
    expected = torch.zeros_like(s.coeffs)
    expected[:num_primary] = s.coeffs[:num_primary]
    assert torch.equal(w, expected)
    assert (u - gp).norm() <= TOL[s.dtype] * term_scale(w, s)


def test_only_the_conflicting_constraint_acts():
    """g_p conflicts with g_1, not with g_2: the update is A-GEM against g_1 alone, as
    long as that does not create a conflict with g_2 (g_2 orthogonal to g_1 here)."""
    gp = torch.tensor([1.0, 1.0, 0.0], dtype=f64)
    g1 = torch.tensor([-2.0, 0.0, 0.0], dtype=f64)
    g2 = torch.tensor([0.0, 3.0, 1.0], dtype=f64)
    w, u = solve(PrimaryConstrained(), torch.stack([gp, g1, g2]), torch.ones(3, dtype=f64))
    torch.testing.assert_close(u, torch.tensor([0.0, 1.0, 0.0], dtype=f64))
    assert w[2] == 0.0 and w[1] == pytest.approx(0.5)


# --------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("dtype", [f32, f64], ids=str)
@pytest.mark.parametrize("log_ratio", [-4.0, -2.0, 0.0, 2.0, 4.0])
@pytest.mark.parametrize("seed", range(6))
def test_one_constraint_is_agem(dtype, log_ratio, seed):
    """A-GEM: u = g_p - min(0, g_p . g_r) / |g_r|^2 g_r, primary/replay norm ratios of
    1e-4..1e4, conflicting or not (odd seeds are made to conflict)."""
    g = randn(2, 9, seed=seed)
    if seed % 2:
        g[1] = -g[0] + 0.4 * g[1]
    g[1] *= 10.0**log_ratio
    g = g.to(dtype)
    c = torch.tensor([0.6, 0.4], dtype=f64)
    w, u = solve(PrimaryConstrained(primary=0), g, c)
    gd = g.double()
    expected = agem(c[0] * gd[0], gd[1])
    scale = term_scale(w, System(g, c, "closed_form"))
    assert (u - expected).norm() <= 10 * TOL[dtype] * scale
    assert (gd[0] @ gd[1] < 0) == bool(w[1] > 0)


@pytest.mark.parametrize("seed", range(6))
def test_orthogonal_constraints_decouple(seed):
    """Orthogonal constraints: each conflicting one is removed on its own (A-GEM per
    constraint), the others are left alone."""
    q, _ = torch.linalg.qr(randn(8, 3, seed=seed))
    norms = torch.tensor([1e-2, 1.0, 1e2], dtype=f64)
    signs = torch.tensor([1.0, -1.0, 1.0], dtype=f64) * (-1.0) ** seed
    gc = q.T * (norms * signs)[:, None]  # three orthogonal constraints
    gp = randn(8, seed=100 + seed)
    gp = gp - 0.3 * (gc[0] / gc[0].norm() + gc[1] / gc[1].norm()) * gp.norm()
    expected = gp.clone()
    for row in gc:
        expected = expected - min(float(gp @ row), 0.0) / (row @ row) * row
    grads = torch.cat([gp[None], gc])
    w, u = solve(PrimaryConstrained(), grads, torch.tensor([1.0, 0.1, 0.1, 0.1], dtype=f64))
    torch.testing.assert_close(u, expected, rtol=1e-12, atol=1e-12 * gp.norm())
    assert int((w[1:] > 0).sum()) == int((gc @ gp < 0).sum()) >= 1


# --------------------------------------------------------------------------- scaling
@SETTINGS
@given(
    s=systems(kinds=GENERIC, max_decades=3.0),
    log2_primary=st.integers(-10, 10),
    log2_constraints=st.lists(st.integers(-10, 10), min_size=5, max_size=5),
)
def test_weights_scale_as_they_should(s, log2_primary, log2_constraints):
    """Scaling g_p by t and each constraint by s_c (exact powers of two): u scales by t,
    the primary weight is unchanged and each constraint weight scales by t / s_c."""
    t = 2.0**log2_primary
    sc = 2.0 ** torch.tensor(log2_constraints[: s.m - 1], dtype=f64)
    w, u = solve(PrimaryConstrained(), s.grads, s.coeffs)
    factors = torch.cat([torch.tensor([t], dtype=f64), sc])
    scaled = s.grads * factors[:, None].to(s.dtype)
    w_t, u_t = solve(PrimaryConstrained(), scaled, s.coeffs)
    expected_w = w.clone()
    expected_w[1:] = w[1:] * t / sc
    torch.testing.assert_close(w_t, expected_w, rtol=1e-6, atol=1e-9 * expected_w.abs().max())
    assert (u_t - t * u).norm() <= 100 * TOL[s.dtype] * t * term_scale(w, s)


@SETTINGS
@given(s=systems(kinds=GENERIC, max_decades=3.0), scale_index=st.integers(0, 4))
def test_tolerances_are_relative_to_the_scale(s, scale_index):
    """The same weights for gradients ~1e-20 to ~1e20 (exact powers of two), and the
    guarantee at that scale: no absolute threshold anywhere."""
    c = EXTREME_SCALES[scale_index]
    w, _ = solve(PrimaryConstrained(), s.grads, s.coeffs)
    w_c, u_c = solve(PrimaryConstrained(), s.grads * c, s.coeffs)
    torch.testing.assert_close(w_c, w, rtol=1e-6, atol=1e-9 * w.abs().max())
    g = s.grads.double() * c
    assert (g[1:] @ u_c >= -TOL[s.dtype] * g[1:].norm(dim=1) * term_scale(w, s) * c).all()


@pytest.mark.parametrize("dtype", [f32, f64], ids=str)
def test_norm_ratios_over_eight_decades(dtype):
    """Primary 1e-4, constraints 1e4 (and the reverse): the constraints still hold to the
    rounding of the weighted sum, and A-GEM's closed form is met for one constraint."""
    base = randn(3, 12, seed=5)
    base[1] = -base[0] + 0.2 * base[1]
    base[2] = -base[0] + 0.2 * base[2]
    for norms in ([-4.0, 4.0, 3.0], [4.0, -4.0, -3.0]):
        g = (base / base.norm(dim=1, keepdim=True) * (10.0 ** torch.tensor(norms))[:, None]).to(
            dtype
        )
        c = torch.full((3,), 1 / 3, dtype=f64)
        w, u = solve(PrimaryConstrained(), g, c)
        gd = g.double()
        scale = term_scale(w, System(g, c, "decades"))
        assert (gd[1:] @ u >= -TOL[dtype] * gd[1:].norm(dim=1) * scale).all()
        w1, u1 = solve(PrimaryConstrained(), g[:2], c[:2])
        expected = agem(c[0] * gd[0], gd[1])
        assert (u1 - expected).norm() <= 10 * TOL[dtype] * term_scale(w1, System(g[:2], c, "x"))


# --------------------------------------------------------------------------- order
@SETTINGS
@given(s=systems(kinds=GENERIC), perm_seed=st.integers(0, 1000), num_primary=st.integers(1, 2))
def test_task_order_does_not_matter(s, perm_seed, num_primary):
    """Permuting the tasks (primaries named, so they follow): weights permute, same u."""
    num_primary = min(num_primary, s.m - 1)
    names = [f"t{i}" for i in range(s.m)]
    primary = names[:num_primary]
    agg = PrimaryConstrained(primary=primary)
    agg.set_tasks(names)
    w, u = solve(agg, s.grads, s.coeffs)
    perm = torch.randperm(s.m, generator=torch.Generator().manual_seed(perm_seed))
    agg_p = PrimaryConstrained(primary=primary)
    agg_p.set_tasks([names[i] for i in perm])
    w_p, u_p = solve(agg_p, s.grads[perm], s.coeffs[perm])
    torch.testing.assert_close(w_p, w[perm], rtol=1e-6, atol=1e-9 * w.abs().max())
    assert (u_p - u).norm() <= 100 * TOL[s.dtype] * term_scale(w, s)


# --------------------------------------------------------------------------- degenerate
def test_degenerate_inputs():
    gp = randn(6, seed=1)
    other = randn(6, seed=2)
    c = torch.tensor([0.5, 0.5], dtype=f64)
    zero = torch.zeros(6, dtype=f64)
    cases = {
        # (gradients, expected update)
        "zero_constraint": (torch.stack([gp, zero]), 0.5 * gp),
        "zero_primary": (torch.stack([zero, other]), zero),
        "parallel": (torch.stack([gp, 3.0 * gp]), 0.5 * gp),
        "antiparallel": (torch.stack([gp, -1e-3 * gp]), zero),
        "all_zero": (torch.stack([zero, zero]), zero),
    }
    for name, (g, expected) in cases.items():
        for dtype in (f32, f64):
            w, u = solve(PrimaryConstrained(), g.to(dtype), c)
            assert torch.isfinite(w).all(), name
            atol = 10 * TOL[dtype] * g.norm(dim=1).sum()
            assert (u - expected).norm() <= atol, (name, dtype)
    # a zero constraint imposes nothing and gets weight 0; a zero primary gives u = 0
    w, _ = solve(PrimaryConstrained(), torch.stack([gp, zero]), c)
    assert w.tolist() == [0.5, 0.0]
    w, _ = solve(PrimaryConstrained(), torch.stack([zero, other]), c)
    assert (w[1:] == 0).all()
    # duplicated and opposite constraints: finite, and the guarantee holds
    g = torch.stack([gp, -gp + 0.1 * other, -gp + 0.1 * other, gp - 0.1 * other])
    w, u = solve(PrimaryConstrained(), g, torch.full((4,), 0.25, dtype=f64))
    assert torch.isfinite(w).all()
    assert (g[1:] @ u >= -1e-12 * g.norm() ** 2).all()


def test_zero_primary_coefficient_gives_no_update():
    g = randn(3, 5, seed=3)
    w, u = solve(PrimaryConstrained(), g, torch.tensor([0.0, 0.5, 0.5], dtype=f64))
    assert (w == 0).all() and (u == 0).all()


# --------------------------------------------------------------------------- naming tasks
def test_names_resolve_through_set_tasks_and_follow_dropped_tasks():
    g = randn(3, 7, seed=4)
    g[1] = -g[0] + 0.5 * g[1]
    c = torch.tensor([0.2, 0.5, 0.3], dtype=f64)
    names = ["pretrain", "new", "other"]
    by_name = PrimaryConstrained(primary="new")
    by_name.set_tasks(names)
    by_position = PrimaryConstrained(primary=1)
    by_position.set_tasks(names)
    w_ref = PrimaryConstrained(primary=1).weights(g @ g.T, c)  # rows are the tasks
    for agg in (by_name, by_position):
        torch.testing.assert_close(agg.weights(g @ g.T, c), w_ref, rtol=0, atol=0)
    # a step without "other": its row is gone; names and positions still find "new"
    rows = [0, 1]
    for agg in (by_name, by_position):
        agg.set_tasks(names, present=rows)
        w = agg.weights(g[rows] @ g[rows].T, c[rows])
        torch.testing.assert_close(w, PrimaryConstrained(primary=1).weights(g[:2] @ g[:2].T, c[:2]))
    # a step without the primary: no primary gradient, no update
    by_name.set_tasks(names, present=[0, 2])
    keep = [0, 2]
    assert (by_name.weights(g[keep] @ g[keep].T, c[keep]) == 0).all()


def test_the_primary_row_counts_the_present_tasks_only():
    """Tasks [a, b, new, c], `a` absent this step: the rows are b, new, c and `new` is row 1
    (its task position is 2, which is c's row). Constraints b = e1 and c = e2 are
    orthogonal, so the update decouples (each conflicting constraint's component is
    removed): g_new = (-1, 0.5, 1) conflicts with b only, u = c_new (0, 0.5, 1), i.e.
    weights (c_new, c_new, 0) on (b, new, c).

    Fails if the primary's row is taken as its task position (``t`` for ``row`` in
    ``_primary_rows``), which makes `c` the primary."""
    g = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.5, 1.0], [0.0, 1.0, 0.0]], dtype=f64)
    c = torch.tensor([0.2, 0.5, 0.3], dtype=f64)
    agg = PrimaryConstrained(primary="new")
    agg.set_tasks(["a", "b", "new", "c"], present=[1, 2, 3])
    w = agg.weights(g @ g.T, c)
    # O(1) exact inputs, a handful of float64 operations: a few eps of 0.5
    torch.testing.assert_close(w, torch.tensor([0.5, 0.5, 0.0], dtype=f64), rtol=0, atol=1e-15)
    expected = 0.5 * torch.tensor([0.0, 0.5, 1.0], dtype=f64)
    torch.testing.assert_close(w @ g, expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    "make, exc, words",
    [
        (lambda: PrimaryConstrained(primary=[]), ValueError, ["aggregator.primary", "empty"]),
        (lambda: PrimaryConstrained(primary=True), TypeError, ["aggregator.primary", "name"]),
        (lambda: PrimaryConstrained(primary=-1), TypeError, ["aggregator.primary", "int >= 0"]),
        (lambda: PrimaryConstrained(primary=1.0), TypeError, ["aggregator.primary"]),
        (lambda: PrimaryConstrained(primary=""), TypeError, ["aggregator.primary"]),
        (lambda: PrimaryConstrained(primary=["a", "a"]), ValueError, ["repeats", "'a'"]),
        (lambda: PrimaryConstrained(rtol=2.0), ValueError, ["rtol"]),
    ],
)
def test_constructor_validation(make, exc, words):
    with pytest.raises(exc) as info:
        make()
    for word in words:
        assert word in str(info.value)


def test_set_tasks_and_call_validation():
    names = ["pretrain", "new"]
    with pytest.raises(ValueError, match=r"'neww'.*not one of the tasks \['pretrain', 'new'\]"):
        PrimaryConstrained(primary="neww").set_tasks(names)
    with pytest.raises(ValueError, match=r"position 2 .*0 to 1.*aggregator.primary"):
        PrimaryConstrained(primary=2).set_tasks(names)
    with pytest.raises(ValueError, match="every task.*Sum"):
        PrimaryConstrained(primary=["new", 0]).set_tasks(names)
    with pytest.raises(ValueError, match="distinct"):
        PrimaryConstrained().set_tasks(["a", "a"])
    with pytest.raises(ValueError, match="repeated"):
        PrimaryConstrained().set_tasks(names, present=[1, 1])
    gram = torch.eye(2, dtype=f64)
    c = torch.full((2,), 0.5, dtype=f64)
    with pytest.raises(ValueError, match=r"names tasks \(\['new'\]\).*set_tasks.*primary: 0"):
        PrimaryConstrained(primary="new").weights(gram, c)
    with pytest.raises(ValueError, match="position 3"):
        PrimaryConstrained(primary=3).weights(gram, c)
    agg = PrimaryConstrained(primary="new")
    agg.set_tasks(names, present=[1])
    with pytest.raises(ValueError, match="announced 1 gradient rows"):
        agg.weights(gram, c)


def test_hydra_list_of_names_instantiates():
    from hydra.utils import instantiate

    agg = instantiate(
        {"_target_": "nequip_mtl.aggregators.PrimaryConstrained", "primary": ["a", 1]}
    )
    assert agg.primary == ["a", 1] and all(isinstance(p, (str, int)) for p in agg.primary)
    agg.set_tasks(["a", "b", "c"])
    g = torch.eye(3, dtype=f64)
    assert agg.weights(g, torch.full((3,), 1 / 3, dtype=f64)).tolist() == [1 / 3, 1 / 3, 0.0]


def test_sum_when_every_row_of_a_step_is_primary():
    """Constraints left out of a step (no gradient): the primaries' weighted sum."""
    g = randn(2, 4, seed=0)
    c = torch.tensor([0.3, 0.7], dtype=f64)
    agg = PrimaryConstrained(primary=["a", "b"])
    agg.set_tasks(["a", "b", "replay"], present=[0, 1])
    torch.testing.assert_close(agg.weights(g @ g.T, c), Sum().weights(g @ g.T, c))
