"""The budget multiplier (``nequip_mtl.weighting.budget``) on problems whose constrained
optimum is known in closed form.

Two quadratics in the plane, ``f = |theta - a|^2 / 2`` (the new data) and
``g = |theta - b|^2 / 2`` (the replayed data), start from ``theta_0`` near ``b`` (the
pretrained model). The budget ``g(theta) <= (1 + tol) g(theta_0) = c`` is active when ``a``
lies outside it; the constrained optimum is then the point of the budget circle towards
``a``, ``theta* = b + sqrt(2c) (a - b)/|a - b|``, where the weighted sum ``f + lambda g`` is
minimised by ``(a + lambda b)/(1 + lambda)``, so ``lambda* = |a - b| / sqrt(2c) - 1``.
Gradient descent on the weighted sum with the multiplier driven by the observed ratio
``g/g(theta_0)`` must reach both.
"""

from __future__ import annotations

import math

import pytest

from nequip_mtl.weighting.budget import DualAscentMultiplier


def _descend(a, b, theta0, tol, steps=20000, lr=0.02, every=1, step_size=0.5, proportional=0.0):
    g = lambda t: 0.5 * sum((x - y) ** 2 for x, y in zip(t, b))  # noqa: E731
    g0 = g(theta0)
    dual = DualAscentMultiplier(1 + tol, step_size=step_size, every=every,
                                proportional=proportional)  # fmt: skip
    theta = list(theta0)
    for _ in range(steps):
        lam = dual.multiplier
        theta = [t - lr * ((t - x) + lam * (t - y)) for t, x, y in zip(theta, a, b)]
        dual.observe(g(theta) / g0)
        dual.step()
    return theta, dual, g(theta) / g0, g0


@pytest.mark.parametrize("tol", [0.05, 0.5, 2.0])
@pytest.mark.parametrize("every", [1, 10])
@pytest.mark.parametrize("proportional", [0.0, 1.0])
def test_an_active_budget_reaches_the_constrained_optimum(tol, every, proportional):
    """Plain dual ascent and the PI controller: the same fixed point (the proportional
    term vanishes with the violation)."""
    a, b, theta0 = (1.0, 0.5), (0.0, 0.0), (0.1, -0.05)
    theta, dual, ratio, g0 = _descend(a, b, theta0, tol, every=every, proportional=proportional)
    c = (1 + tol) * g0
    dist = math.dist(a, b)
    expected_lambda = dist / math.sqrt(2 * c) - 1
    expected_theta = [y + math.sqrt(2 * c) * (x - y) / dist for x, y in zip(a, b)]
    assert ratio == pytest.approx(1 + tol, rel=1e-4)
    assert dual.multiplier == pytest.approx(expected_lambda, rel=1e-3)
    assert theta == pytest.approx(expected_theta, rel=1e-4, abs=1e-6)


def test_a_slack_budget_lets_the_multiplier_fall_to_its_bound():
    """``a`` inside the budget: the unconstrained optimum keeps it, replay costs nothing."""
    a, b, theta0 = (0.05, 0.0), (0.0, 0.0), (0.1, 0.0)  # g(a) = g(theta0)/4
    theta, dual, ratio, _ = _descend(a, b, theta0, tol=0.05)
    assert dual.multiplier == dual.bounds[0]
    assert ratio < 1.05 and theta == pytest.approx([a[0] / (1 + 1e-3), 0.0], rel=1e-6)


def test_the_multiplier_moves_in_log_space_by_the_mean_of_the_window():
    dual = DualAscentMultiplier(1.1, step_size=2.0, every=3, initial=1.0)
    for ratio in (1.0, float("nan")):  # a NaN (no constrained data) is not observed
        dual.observe(ratio)
        assert not dual.step()
    assert dual.multiplier == 1.0  # two optimizer steps of three: no update yet
    dual.observe(1.6)
    dual.observe(1.3)  # several observations in one step (accumulated micro-batches)
    # the update uses the mean of the three finite ratios since the last one: 1.3
    assert dual.step() and dual.updates == 1
    assert dual.multiplier == pytest.approx(math.exp(2.0 * (1.3 / 1.1 - 1)), rel=1e-15)
    assert dual.last_ratio == pytest.approx(1.3, rel=1e-15)
    for _ in range(3):  # a window without observations leaves it alone
        dual.step()
    assert dual.updates == 1


def test_the_proportional_term_answers_the_current_window_and_leaves_with_it():
    """log lambda = integral + proportional * violation: a violated window moves the
    multiplier by both terms, the next window at the bound keeps the integral only.
    Mutation: adding the proportional step to the integral fails the second check."""
    dual = DualAscentMultiplier(1.1, step_size=0.5, every=1, proportional=3.0)
    dual.observe(1.32)  # violation 0.2
    dual.step()
    assert dual.integral == pytest.approx(0.1, rel=1e-14)
    assert dual.multiplier == pytest.approx(math.exp(0.1 + 0.6), rel=1e-14)
    dual.observe(1.1)  # at the bound: no violation
    dual.step()
    assert dual.multiplier == pytest.approx(math.exp(0.1), rel=1e-14)
    dual.observe(0.88)  # violation -0.2: below the start, the integral back at 0
    dual.step()
    assert dual.integral == pytest.approx(0.0, abs=1e-15)
    assert dual.multiplier == pytest.approx(math.exp(-0.6), rel=1e-14)


def test_the_integral_does_not_wind_up_beyond_the_bounds():
    """A long slack spell holds the integral at the lower bound: one violated window then
    moves the multiplier up from the bound, not from far below it."""
    dual = DualAscentMultiplier(1.0, step_size=1.0, every=1, bounds=(0.1, 10.0), proportional=1.0)
    for _ in range(100):
        dual.observe(0.5)
        dual.step()
    assert dual.multiplier == 0.1 and dual.integral == pytest.approx(math.log(0.1), rel=1e-14)
    dual.observe(1.5)
    dual.step()
    assert dual.multiplier == pytest.approx(0.1 * math.exp(0.5 + 0.5), rel=1e-12)


def test_a_ratio_far_over_its_bound_moves_the_multiplier_by_a_bounded_step():
    """A near-zero reference makes the ratio huge: no overflow, one bounded step."""
    dual = DualAscentMultiplier(1.05, every=1, bounds=(1e-3, 1e300))
    dual.observe(1e30)
    dual.step()
    assert dual.multiplier == pytest.approx(math.exp(30.0), rel=1e-12)


@pytest.mark.parametrize("proportional", [0.0, 1.5])
def test_a_restored_multiplier_continues_exactly(proportional):
    ratios = [1.0 + 0.1 * math.sin(i) for i in range(37)]
    whole = DualAscentMultiplier(1.05, every=4, proportional=proportional)
    for r in ratios:
        whole.observe(r)
        whole.step()
    first = DualAscentMultiplier(1.05, every=4, proportional=proportional)
    for r in ratios[:18]:  # stops mid-window
        first.observe(r)
        first.step()
    resumed = DualAscentMultiplier(1.05, every=4, proportional=proportional)
    resumed.load_state_dict(first.state_dict())
    for r in ratios[18:]:
        resumed.observe(r)
        resumed.step()
    assert resumed.state_dict() == whole.state_dict()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bound": 0.0}, "bound"),
        ({"bound": -0.1}, "bound"),
        ({"bound": 1.1, "every": 0}, "every"),
        ({"bound": 1.1, "step_size": 0}, "step_size"),
        ({"bound": 1.1, "bounds": (0.0, 1.0)}, "bounds"),
        ({"bound": 1.1, "initial": 1e4}, "initial"),
        ({"bound": 1.1, "proportional": -1.0}, "proportional"),
    ],
)
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DualAscentMultiplier(**kwargs)


def test_weighted_observations_give_the_ratio_of_the_summed_losses():
    """Two batches' ratios weighted by their denominators: the window's ratio is the sum of
    the losses over the sum of the references, not the mean of the two ratios (1.75)."""
    dual = DualAscentMultiplier(1.0, every=2)
    dual.observe(2.0 / 4.0, weight=4.0)
    dual.observe(3.0 / 1.0, weight=1.0)
    dual.observe(5.0, weight=0.0)  # no weight: not observed
    dual.observe(5.0, weight=float("nan"))
    dual.step(), dual.step()
    assert dual.last_ratio == pytest.approx((2.0 + 3.0) / (4.0 + 1.0), rel=1e-15)
