"""Aggregators: closed forms, independent reference solvers, API and argument checks.

Every expected value here is computed independently of the code under test: from a
closed form, from the method's defining algorithm run in parameter space, or from
SciPy's solvers (NNLS, SLSQP) on the method's defining optimisation problem.
"""

from __future__ import annotations

import inspect
import math
import re
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from scipy.optimize import minimize, nnls

import nequip_mtl.aggregators as aggregators
from nequip_mtl.aggregators import (
    IMTLG,
    MGDA,
    Aggregator,
    AlignedMTL,
    CAGrad,
    ConFIG,
    DualProj,
    GramAggregator,
    Mean,
    PCGrad,
    PrimaryConstrained,
    Sum,
    UPGrad,
)
from nequip_mtl.aggregators._linalg import (
    ScaledGram,
    min_norm_in_hull,
    nnls_gram,
    project_onto_dual_cone,
)
from tests.unit._aggregator_classes import GRAM_AGGREGATORS

f64 = torch.float64
ALL_CLASSES = GRAM_AGGREGATORS


def randn(*shape, seed, dtype=f64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def spread(grads: torch.Tensor, log10_norms) -> torch.Tensor:
    """Rescale the rows of ``grads`` to norms ``10 ** log10_norms``."""
    norms = 10.0 ** torch.as_tensor(log10_norms, dtype=f64)
    return grads / grads.norm(dim=1, keepdim=True) * norms[:, None].to(grads.dtype)


def uniform(m: int) -> torch.Tensor:
    return torch.full((m,), 1.0 / m, dtype=f64)


def gram_weights(agg: GramAggregator, grads: torch.Tensor, coeffs=None) -> torch.Tensor:
    g = grads.double()
    c = uniform(len(g)) if coeffs is None else torch.as_tensor(coeffs, dtype=f64)
    return agg.weights(g @ g.T, c, source_dtype=grads.dtype)


def conflicting(m: int, n: int, seed: int) -> torch.Tensor:
    """Gradients sharing little: consecutive pairs point in nearly opposite directions."""
    g = randn(m, n, seed=seed)
    g[1::2] = -g[0::2][: g[1::2].shape[0]] + 0.5 * g[1::2]
    return g


# --------------------------------------------------------------------------- API
def test_exports_and_interface():
    for name in ["Aggregator", "GramAggregator", "ConFIG"]:
        assert name in aggregators.__all__
    for cls in ALL_CLASSES:
        assert cls.__name__ in aggregators.__all__
        assert getattr(aggregators, cls.__name__) is cls
        assert issubclass(cls, Aggregator) and issubclass(cls, GramAggregator)
        agg = cls()
        w = agg.weights(torch.eye(3, dtype=f64), uniform(3))
        assert w.dtype == f64 and w.shape == (3,)
        assert repr(agg).startswith(cls.__name__ + "(")


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_docstring_yaml_example_instantiates(cls):
    from hydra.utils import instantiate

    doc = inspect.getdoc(cls)
    for topic in ("guarantee", "cost", "coefficient"):
        assert topic in doc.lower(), f"{cls.__name__} docstring does not discuss its {topic}"
    block = re.search(r"\.\. code-block:: yaml\n\n((?:    .*\n|\n)+)", doc + "\n")
    assert block, f"{cls.__name__} docstring has no YAML example"
    config = yaml.safe_load(textwrap.dedent(block.group(1)))
    module = config["training_module"]
    assert module["_target_"] == "nequip_mtl.train.MultitaskLightningModule"
    assert module["aggregator"]["_target_"] == f"nequip_mtl.aggregators.{cls.__name__}"
    assert type(instantiate(module["aggregator"])) is cls


@pytest.mark.parametrize(
    "make, exc, words",
    [
        (lambda: PCGrad(seed=-1), ValueError, ["seed", ">= 0"]),
        (lambda: PCGrad(seed=1.5), TypeError, ["seed", "int"]),
        (lambda: PCGrad(seed=True), TypeError, ["seed", "int"]),
        (lambda: CAGrad(c=-0.1), ValueError, ["`c`", ">= 0"]),
        (lambda: CAGrad(c=float("nan")), ValueError, ["`c`"]),
        (lambda: CAGrad(c=float("inf")), ValueError, ["`c`", "finite"]),
        (lambda: CAGrad(c="0.4"), TypeError, ["`c`", "number"]),
        (lambda: CAGrad(rescale=1), TypeError, ["rescale", "bool"]),
        (lambda: AlignedMTL(scale_mode="max"), ValueError, ["scale_mode", "min", "median", "rmse"]),
        (lambda: UPGrad(rtol=1.0), ValueError, ["rtol", "[0, 1)"]),
        (lambda: DualProj(rtol=-1e-3), ValueError, ["rtol"]),
        (lambda: MGDA(rtol="small"), TypeError, ["rtol"]),
        (lambda: IMTLG(rtol=True), TypeError, ["rtol"]),
        (lambda: AlignedMTL(rtol=2), ValueError, ["rtol"]),
    ],
)
def test_constructor_validation(make, exc, words):
    with pytest.raises(exc) as info:
        make()
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_call_validation(cls):
    agg = cls()
    grads = randn(3, 5, seed=0)
    with pytest.raises(ValueError, match="num_tasks, num_params"):
        agg(grads[0])
    with pytest.raises(ValueError, match="coeffs"):
        agg(grads, torch.ones(2))
    if cls is not ConFIG:  # ConFIG (lead's) normalises coefficients as nequip does
        with pytest.raises(ValueError, match=">= 0"):
            agg.weights(torch.eye(3, dtype=f64), torch.tensor([0.5, -0.1, 0.6], dtype=f64))
        with pytest.raises(ValueError, match="Gram"):
            agg.weights(torch.eye(2, dtype=f64), uniform(3))


@pytest.mark.parametrize(
    "cls", [c for c in ALL_CLASSES if c is not ConFIG], ids=lambda c: c.__name__
)
def test_nonfinite_gram_gives_nan_weights_not_an_exception(cls):
    gram = torch.eye(3, dtype=f64)
    gram[0, 0] = torch.nan
    if cls in (Mean, Sum):
        pytest.skip("baselines do not look at the Gram matrix")
    assert torch.isnan(cls().weights(gram, uniform(3))).all()


def test_single_task_is_its_own_scaled_gradient():
    g = randn(1, 7, seed=1)
    c = torch.tensor([0.7], dtype=f64)
    expected_scale = {
        Mean: 1.0,
        Sum: 0.7,
        PCGrad: 0.7,
        IMTLG: 1.0,
        MGDA: 1.0,
        UPGrad: 0.7,
        DualProj: 0.7,
        AlignedMTL: 0.7,
        CAGrad: 0.7 * (1 + 0.4) / (1 + 0.4**2),  # d = g0 + c|g0| g/|g|, rescaled
        ConFIG: 1.0,
        PrimaryConstrained: 0.7,  # the primary's scaled gradient, nothing constrains
    }
    for cls, scale in expected_scale.items():
        torch.testing.assert_close(cls()(g, c), scale * g[0], msg=cls.__name__)


# --------------------------------------------------------------------------- baselines
def test_mean_ignores_coefficients_and_sum_uses_them():
    g = spread(randn(3, 9, seed=2), [-2.0, 0.0, 3.0])
    c = torch.tensor([0.2, 0.5, 0.3], dtype=f64)
    torch.testing.assert_close(Mean()(g, c), g.mean(0))
    torch.testing.assert_close(Sum()(g, c), 0.2 * g[0] + 0.5 * g[1] + 0.3 * g[2])
    torch.testing.assert_close(gram_weights(Sum(), g, c), c)
    torch.testing.assert_close(gram_weights(Mean(), g, c), uniform(3))


def test_sum_is_the_gradient_of_the_weighted_loss():
    """With normalised coefficients, Sum is the update of nequip's weighted-sum loss."""
    gen = torch.Generator().manual_seed(3)
    theta = torch.randn(6, generator=gen, dtype=f64, requires_grad=True)
    targets = torch.randn(3, 6, generator=gen, dtype=f64)
    raw_coeffs = torch.tensor([1.0, 10.0, 4.0], dtype=f64)
    coeffs = raw_coeffs / raw_coeffs.sum()  # nequip's MetricsManager normalisation
    losses = [((theta * (k + 1.0) - t) ** 2).mean() for k, t in enumerate(targets)]
    grads = torch.stack([torch.autograd.grad(loss, theta, retain_graph=True)[0] for loss in losses])
    (weighted_grad,) = torch.autograd.grad(sum(c * loss for c, loss in zip(coeffs, losses)), theta)
    torch.testing.assert_close(Sum()(grads, coeffs), weighted_grad)


# --------------------------------------------------------------------------- PCGrad
def _pcgrad_two_tasks(g1, g2, c1, c2):
    """PCGrad for two tasks (order-independent), straight from Algorithm 1."""
    p1, p2 = g1.clone(), g2.clone()
    if g1 @ g2 < 0:
        p1 = g1 - (g1 @ g2) / (g2 @ g2) * g2
        p2 = g2 - (g2 @ g1) / (g1 @ g1) * g1
    return c1 * p1 + c2 * p2


@pytest.mark.parametrize("seed", range(6))
def test_pcgrad_two_task_closed_form(seed):
    g = spread(randn(2, 5, seed=seed), [0.0, 2.0 * (seed % 3) - 2.0])
    if seed % 2:
        g[1] = -g[1] + 0.1 * g[0]  # make (most) pairs conflict
    c = torch.tensor([0.3, 0.7], dtype=f64)
    expected = _pcgrad_two_tasks(g[0], g[1], 0.3, 0.7)
    torch.testing.assert_close(PCGrad(seed=seed)(g, c), expected)
    torch.testing.assert_close(gram_weights(PCGrad(seed=seed), g, c) @ g, expected)


def _pcgrad_reference(grads, coeffs, generator):
    """Algorithm 1 of Yu et al. on the vectors: one random order per task."""
    m = len(grads)
    update = torch.zeros_like(grads[0])
    for i in range(m):
        order = torch.randperm(m, generator=generator).tolist()
        gi = grads[i].clone()
        for j in order:
            if j != i and gi @ grads[j] < 0:
                gi = gi - (gi @ grads[j]) / (grads[j] @ grads[j]) * grads[j]
        update += coeffs[i] * gi
    return update


@pytest.mark.parametrize("m", [3, 4, 6])
def test_pcgrad_matches_the_algorithm_in_parameter_space(m):
    grads = spread(conflicting(m, 8, seed=m), torch.linspace(-2, 2, m))
    coeffs = torch.rand(m, generator=torch.Generator().manual_seed(m), dtype=f64)
    agg, reference_gen = PCGrad(seed=11), torch.Generator().manual_seed(11)
    for _ in range(4):  # successive calls keep drawing from the same stream
        expected = _pcgrad_reference(grads, coeffs, reference_gen)
        torch.testing.assert_close(agg(grads, coeffs), expected)


def test_pcgrad_state_dict_round_trip_and_seeding():
    grads = conflicting(5, 6, seed=4)
    a = PCGrad(seed=3)
    for _ in range(3):
        a(grads)
    state = a.state_dict()
    expected = [a(grads) for _ in range(5)]
    b = PCGrad(seed=123)  # seed is irrelevant once the state is loaded
    b.load_state_dict(state)
    for e in expected:
        torch.testing.assert_close(b(grads), e, rtol=0, atol=0)
    # the returned state is a snapshot, not a view of the live generator
    a.load_state_dict(state)
    torch.testing.assert_close(a(grads), expected[0], rtol=0, atol=0)
    # same seed, same sequence; different seeds give different orders somewhere
    p1, p2 = PCGrad(seed=7), PCGrad(seed=7)
    for _ in range(3):
        torch.testing.assert_close(p1(grads), p2(grads), rtol=0, atol=0)
    x, y = PCGrad(seed=1), PCGrad(seed=2)
    assert any(not torch.equal(x(grads), y(grads)) for _ in range(10))


def test_pcgrad_load_state_dict_validation():
    with pytest.raises(ValueError, match="rng_state"):
        PCGrad().load_state_dict({"seed": 1})
    with pytest.raises(TypeError, match="uint8"):
        PCGrad().load_state_dict({"rng_state": torch.zeros(3)})


@pytest.mark.parametrize(
    "cls", [c for c in ALL_CLASSES if c is not PCGrad], ids=lambda c: c.__name__
)
def test_stateless_aggregators(cls):
    agg = cls()
    assert agg.state_dict() == {}
    agg.load_state_dict({})
    with pytest.raises(ValueError, match="stateless"):
        agg.load_state_dict({"rng_state": torch.zeros(1)})


# --------------------------------------------------------------------------- MGDA
def _mgda_two_task_vectors(g1, g2):
    gamma = ((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2))).clamp(0.0, 1.0)
    return gamma * g1 + (1 - gamma) * g2


@pytest.mark.parametrize("seed", range(8))
def test_mgda_two_task_closed_form_and_general_solver(seed):
    log_norms = [0.0, [-4.0, -2.0, 0.0, 2.0][seed % 4]]
    g = spread(randn(2, 4, seed=seed), log_norms)
    if seed % 2:
        g[1] = -g[1] + 0.2 * g[0]
    expected = _mgda_two_task_vectors(g[0], g[1])
    torch.testing.assert_close(MGDA()(g), expected)
    # the general QP solver, used for m >= 3, agrees with the closed form
    w = min_norm_in_hull(ScaledGram(g @ g.T), 1e-13)
    torch.testing.assert_close(w @ g, expected, atol=1e-12 * g.norm(dim=1).max(), rtol=1e-9)


def _slsqp_min_norm(h: np.ndarray) -> np.ndarray:
    m = len(h)
    best = None
    for x0 in [np.full(m, 1 / m)] + [np.eye(m)[i] * 0.8 + 0.2 / m for i in range(m)]:
        res = minimize(
            lambda w: w @ h @ w,
            x0,
            jac=lambda w: 2 * h @ w,
            bounds=[(0, 1)] * m,
            constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
            method="SLSQP",
            options={"ftol": 1e-16, "maxiter": 2000},
        )
        if best is None or res.fun < best.fun:
            best = res
    return best.x


@pytest.mark.parametrize("m", [3, 4, 5, 7])
def test_mgda_matches_a_generic_qp_solver(m):
    g = spread(conflicting(m, 10, seed=m), torch.linspace(-0.5, 0.5, m))
    w_ref = _slsqp_min_norm((g @ g.T).numpy())
    d_ref = torch.from_numpy(w_ref) @ g
    d = MGDA()(g)
    assert d.norm() <= d_ref.norm() * (1 + 1e-9)
    torch.testing.assert_close(d, d_ref, atol=1e-6 * g.norm(dim=1).max(), rtol=1e-6)


def test_mgda_zero_gradient_and_pareto_stationary_points():
    g = randn(3, 4, seed=5)
    g[1] = 0.0
    assert torch.equal(MGDA()(g), torch.zeros(4, dtype=f64))
    # 0 in the convex hull: g3 = -(g1 + g2) / 2
    g = randn(3, 4, seed=6)
    g[2] = -(g[0] + g[1]) / 2
    assert MGDA()(g).norm() < 1e-12 * g.norm()


# --------------------------------------------------------------------------- dual cone
def _project_onto_dual_cone_ref(grads: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Projection of v onto {x : grads @ x >= 0}: v + grads^T z, z = NNLS(grads^T, -v)."""
    z, _ = nnls(grads.T, -v, maxiter=10_000)
    return v + grads.T @ z


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("m", [2, 3, 5])
def test_upgrad_and_dualproj_match_scipy_nnls(seed, m):
    g = spread(conflicting(m, 12, seed=10 * seed + m), torch.linspace(-2, 2, m))
    c = torch.rand(m, generator=torch.Generator().manual_seed(seed), dtype=f64) + 0.1
    gn = g.numpy()
    upgrad_ref = sum(ci * _project_onto_dual_cone_ref(gn, gi) for ci, gi in zip(c.numpy(), gn))
    dualproj_ref = _project_onto_dual_cone_ref(gn, c.numpy() @ gn)
    scale = (c[:, None] * g).norm(dim=1).sum()
    for agg, ref in ((UPGrad(), upgrad_ref), (DualProj(), dualproj_ref)):
        for u in (agg(g, c), gram_weights(agg, g, c) @ g):
            torch.testing.assert_close(u, torch.from_numpy(ref), atol=1e-9 * scale, rtol=1e-7)


def test_dual_cone_projection_kkt_directly():
    """min_{y >= s} y^T K y: y >= s, K y >= 0, and (y - s)_j (K y)_j = 0."""
    for seed in range(20):
        a = conflicting(5, 4 + seed % 4, seed=seed)  # includes m > N
        a = a / a.norm(dim=1, keepdim=True)
        k = a @ a.T
        s = torch.rand(5, generator=torch.Generator().manual_seed(seed), dtype=f64)
        y = project_onto_dual_cone(k, s, 1e-13)
        assert (y >= s - 1e-15).all()
        ky = k @ y
        assert ky.min() >= -1e-10 * s.max()
        assert ((y - s) * ky).abs().max() <= 1e-9 * s.max() ** 2


def test_nnls_gram_matches_scipy_on_random_least_squares():
    for seed in range(30):
        gen = torch.Generator().manual_seed(seed)
        rows, cols = (
            int(torch.randint(1, 8, (), generator=gen)),
            int(torch.randint(1, 7, (), generator=gen)),
        )
        b = torch.randn(rows, cols, generator=gen, dtype=f64)
        t = torch.randn(rows, generator=gen, dtype=f64)
        z = nnls_gram(b.T @ b, b.T @ t, 1e-13)
        z_ref, res_ref = nnls(b.numpy(), t.numpy())
        assert (z >= 0).all()
        # the residual is unique even when z is not (rank-deficient b)
        assert abs((b @ z - t).norm().item() - res_ref) <= 1e-9 * (1 + res_ref)


def test_upgrad_with_opposite_gradients_is_zero_and_dualproj_keeps_the_common_part():
    e = torch.eye(3, dtype=f64)
    g = torch.stack([e[0] + e[1], -e[0] + e[1]])  # conflict along e0, agree along e1
    torch.testing.assert_close(UPGrad()(g), 0.5 * (e[1] + e[1]))  # both project to e1
    torch.testing.assert_close(DualProj()(g), e[1])  # the mean is already e1
    g = torch.stack([e[0], -e[0]])
    assert UPGrad()(g).norm() == 0 and DualProj()(g).norm() == 0


# --------------------------------------------------------------------------- CAGrad
def _cagrad_reference(h: np.ndarray, c: np.ndarray, c_ball: float) -> np.ndarray:
    """The authors' formulation, solved with SLSQP from several starts."""
    m = len(h)
    radius = c_ball * math.sqrt(c @ h @ c)

    def objective(w):
        return w @ h @ c + radius * math.sqrt(max(w @ h @ w, 0.0) + 1e-30)

    best = None
    for x0 in [np.full(m, 1 / m)] + [np.eye(m)[i] * 0.8 + 0.2 / m for i in range(m)]:
        res = minimize(
            objective,
            x0,
            bounds=[(0, 1)] * m,
            constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
            method="SLSQP",
            options={"ftol": 1e-15, "maxiter": 2000},
        )
        if best is None or res.fun < best.fun:
            best = res
    w = best.x
    return c + radius / math.sqrt(w @ h @ w) * w


@pytest.mark.parametrize("c_ball", [0.2, 0.4, 0.9])
@pytest.mark.parametrize("m", [2, 3, 5])
def test_cagrad_matches_the_authors_formulation(m, c_ball):
    g = spread(conflicting(m, 10, seed=m), torch.linspace(-0.5, 0.5, m))
    c = uniform(m)
    d_ref = torch.from_numpy(_cagrad_reference((g @ g.T).numpy(), c.numpy(), c_ball)) @ g
    d = CAGrad(c=c_ball, rescale=False)(g, c)
    torch.testing.assert_close(d, d_ref, rtol=2e-5, atol=2e-5 * d_ref.norm())
    # primal: d maximises min_i g_i . d over the ball |d - g0| <= c |g0|
    g0 = c @ g
    assert (d - g0).norm() <= c_ball * g0.norm() * (1 + 1e-9)
    gen = torch.Generator().manual_seed(m)
    for _ in range(200):
        step = torch.randn(g.shape[1], generator=gen, dtype=f64)
        other = (
            g0 + c_ball * g0.norm() * torch.rand((), generator=gen, dtype=f64) * step / step.norm()
        )
        assert (g @ other).min() <= (g @ d).min() + 1e-12 * g0.norm() * g.norm()
    # rescale divides by 1 + c^2, as in the authors' code
    torch.testing.assert_close(CAGrad(c=c_ball)(g, c), d / (1 + c_ball**2))


def test_cagrad_c_zero_is_sum_and_zero_gradient_is_ignored():
    g = conflicting(3, 5, seed=1)
    c = torch.tensor([0.5, 0.2, 0.3], dtype=f64)
    torch.testing.assert_close(CAGrad(c=0.0)(g, c), c @ g)
    # a zero task: its improvement is 0 whatever the direction, the rest is CAGrad on the others
    gz = torch.cat([g[:2], torch.zeros(1, 5, dtype=f64)])
    cz = torch.tensor([0.5, 0.5, 0.0], dtype=f64)
    torch.testing.assert_close(CAGrad()(gz, cz), CAGrad()(g[:2], cz[:2]))


# --------------------------------------------------------------------------- IMTL-G
def test_imtlg_matches_the_gram_formula_and_orthogonal_closed_form():
    for seed in range(10):
        g = spread(randn(4, 9, seed=seed), torch.linspace(-1.5, 1.5, 4))
        h = g @ g.T
        v = torch.linalg.pinv(h) @ h.diagonal().sqrt()  # Liu et al. / torchjd's formula
        if v.sum() > 0:  # the paper's normalisation; ours differs only in sign otherwise
            torch.testing.assert_close(IMTLG()(g), (v / v.sum()) @ g)
    q, _ = torch.linalg.qr(randn(6, 3, seed=0))
    n = torch.tensor([1e-2, 1.0, 1e2], dtype=f64)
    g = q.T * n[:, None]
    c = torch.tensor([0.2, 0.3, 0.5], dtype=f64)
    alpha = (c / n) / (c / n).sum()  # orthogonal: alpha_i proportional to c_i / |g_i|
    torch.testing.assert_close(IMTLG()(g, c), alpha @ g)


def test_imtlg_never_returns_an_ascent_direction():
    """A small task nearly in the span of the others makes the paper's sum(alpha) < 0."""
    e = torch.eye(3, dtype=f64)
    g = torch.stack([e[0], e[1], 1e-3 * ((e[0] + e[1]) / math.sqrt(2) + 1e-3 * e[2])])
    h = g @ g.T
    v = torch.linalg.solve(h, h.diagonal().sqrt())
    assert v.sum() < 0  # the case the sign flip is for
    u = IMTLG()(g)
    proj = (g @ u) / g.norm(dim=1)
    assert (proj > 0).all()
    torch.testing.assert_close(proj, proj.mean().expand(3))


# --------------------------------------------------------------------------- Aligned-MTL
def test_aligned_mtl_closed_forms():
    q, _ = torch.linalg.qr(randn(7, 3, seed=1))
    n = torch.tensor([1e-2, 3.0, 1e2], dtype=f64)
    g = q.T * n[:, None]  # orthogonal: eigenvalues n^2, eigenvectors e_i
    c = torch.tensor([0.2, 0.3, 0.5], dtype=f64)
    for mode, lam in (("min", n[0] ** 2), ("median", n[1] ** 2), ("rmse", (n**2).mean())):
        expected = lam.sqrt() * (c / n) @ g  # sqrt(lambda) * sum_i c_i g_i / |g_i|
        torch.testing.assert_close(AlignedMTL(scale_mode=mode)(g, c), expected)
    # general full rank: G u = sqrt(lambda_min) H^{1/2} c and |u|^2 = lambda_min |c|^2
    for seed in range(5):
        g = spread(conflicting(4, 6, seed=seed), torch.linspace(-2, 2, 4))
        c = torch.rand(4, generator=torch.Generator().manual_seed(seed), dtype=f64)
        evals, evecs = torch.linalg.eigh(g @ g.T)
        u = AlignedMTL()(g, c)
        torch.testing.assert_close(g @ u, evals[0].sqrt() * (evecs * evals.sqrt()) @ evecs.T @ c)
        torch.testing.assert_close(u @ u, evals[0] * (c @ c))


# --------------------------------------------------------------------------- ConFIG
def _nequip_config(grads: torch.Tensor, coeffs: torch.Tensor, eps: float = 1e-8, lsqr=True):
    """The update of nequip.train.ConFIGLightningModule (nequip/train/config.py)."""
    a = F.normalize(grads, dim=1, eps=eps)
    b = F.normalize(coeffs.to(grads.dtype), dim=0, eps=eps)
    x = torch.linalg.lstsq(a, b).solution if lsqr else torch.linalg.pinv(a) @ b
    x = F.normalize(x, dim=0, eps=eps)
    return torch.sum(grads * x) * x


@pytest.mark.parametrize("lsqr", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_config_equals_nequip_formula(seed, lsqr):
    m = 2 + seed
    g = spread(conflicting(m, 20, seed=seed), torch.linspace(-2, 2, m))
    c = torch.rand(m, generator=torch.Generator().manual_seed(seed), dtype=f64) + 0.1
    expected = _nequip_config(g, c, lsqr=lsqr)
    torch.testing.assert_close(ConFIG(lsqr=lsqr)(g, c), expected)
    torch.testing.assert_close(gram_weights(ConFIG(lsqr=lsqr), g, c) @ g, expected)


# --------------------------------------------------------------------------- scale, devices
@pytest.mark.parametrize("cls", [PCGrad, MGDA, UPGrad, DualProj, CAGrad], ids=lambda c: c.__name__)
def test_many_tasks(cls):
    """m = 12 tasks in 8 dimensions: the QP methods still meet their guarantees."""
    g = spread(conflicting(12, 8, seed=12), torch.linspace(-2, 2, 12))
    w = gram_weights(cls(), g)
    u = w @ g
    assert torch.isfinite(u).all()
    scale = (w.abs() * g.norm(dim=1)).sum()
    if cls in (UPGrad, DualProj):
        assert (g @ u >= -1e-10 * g.norm(dim=1) * scale).all()
    if cls is MGDA:
        assert (w >= 0).all() and (g @ u - u @ u >= -1e-10 * g.norm(dim=1) * scale).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_cuda_inputs_give_outputs_on_the_same_device(cls):
    g = conflicting(4, 10, seed=0).float()
    expected = cls(seed=0)(g) if cls is PCGrad else cls()(g)
    agg = cls(seed=0) if cls is PCGrad else cls()
    u = agg(g.cuda())
    assert u.device.type == "cuda"
    torch.testing.assert_close(u.cpu(), expected, rtol=1e-4, atol=1e-5 * g.norm())
    gram = (g.double() @ g.double().T).cuda()
    assert agg.weights(gram, uniform(4).cuda(), source_dtype=torch.float32).device.type == "cuda"


def test_config_zero_coefficient_is_not_a_conflict():
    """Full rank, one zero coefficient: the update is orthogonal to that task (cosine 0 up
    to rounding), which must not be mistaken for a conflict."""
    g = spread(conflicting(3, 12, seed=3), torch.tensor([-1.0, 0.0, 1.0]))
    c = torch.tensor([0.5, 0.5, 0.0], dtype=f64)
    u = ConFIG()(g, c)
    torch.testing.assert_close(u, _nequip_config(g, c))
    assert u.norm() > 0.1 * g.norm(dim=1).min()


def test_config_dependent_conflicting_tasks_give_zero():
    """g3 = -(g1 + g2): no non-zero direction in the span improves all three."""
    g12 = randn(2, 8, seed=4)
    g = torch.cat([g12, -(g12.sum(0, keepdim=True))])
    for lsqr in (True, False):
        assert ConFIG(lsqr=lsqr)(g).norm() <= 1e-12 * g.norm(dim=1).sum()


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("lsqr", [True, False])
def test_float32_gradients_whose_gram_overflows(cls, lsqr):
    """float32 entries ~1e20: squared norms overflow float32. The Gram is formed from
    rescaled rows in float64, so the update is the float64 one, not an MKL assertion."""
    if cls is not ConFIG and not lsqr:
        pytest.skip("lsqr is ConFIG's")
    make = (lambda: ConFIG(lsqr=lsqr)) if cls is ConFIG else (lambda: fresh(cls))
    g = conflicting(3, 10, seed=0).float() * 1e20
    u = make()(g)
    assert torch.isfinite(u).all()
    expected = make()(g.double())
    torch.testing.assert_close(u.double(), expected, rtol=1e-4, atol=1e-5 * g.norm().item())


def fresh(cls):
    return cls(seed=0) if cls is PCGrad else cls()


def test_float64_gram_overflow_is_a_clear_error():
    g = conflicting(3, 10, seed=0) * 1e170
    with pytest.raises(FloatingPointError, match="ConFIG: the Gram matrix .* overflows float64"):
        ConFIG()(g)


def test_config_nonfinite_gram_gives_nan_weights():
    gram = torch.eye(3, dtype=f64)
    gram[0, 1] = gram[1, 0] = torch.inf
    for lsqr in (True, False):
        assert torch.isnan(ConFIG(lsqr=lsqr).weights(gram, uniform(3))).all()
