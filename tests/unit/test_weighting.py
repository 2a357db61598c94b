"""Pure weighting rules on hand-computed loss histories and synthetic two-task problems."""

from __future__ import annotations

import math
import random

import pytest
import torch

from nequip_mtl.weighting import (
    FAMOLogits,
    LossHistoryWeighting,
    dwa_weights,
    famo_logit_gradient,
    famo_loss_weights,
    mean_weights,
    sample_rlw_weights,
    scale_weights,
    softadapt_weights,
    uncertainty_weighted_loss,
    uncertainty_weights,
)

PREV = {"a": 1.0, "b": 2.0}
NEW = {"a": 0.5, "b": 1.9}  # slopes: a = -0.5 (fast), b = -0.1 (lagging)


# ------------------------------------------------------------------ SoftAdapt variants


@pytest.mark.parametrize(
    "variant, beta, expected_a",
    [
        # exp(-0.5) / (exp(-0.5) + exp(-0.1))
        ("original", 1.0, 0.401312339887548),
        # slopes / ||s||_2 = (-0.9806, -0.1961)
        ("l2_normalized", 1.0, 0.3133584739405629),
        # slopes / sum|s| = (-0.8333, -0.1667)
        ("normalized", 1.0, 0.3392436312341829),
        # mean losses f = (0.75, 1.95): f_a e^{-0.5} / (f_a e^{-0.5} + f_b e^{-0.1})
        ("loss_weighted", 1.0, 0.2049707785781448),
        ("loss_weighted", 2.0, 0.14735339132139258),
    ],
)
def test_softadapt_variants_match_hand_computed(variant, beta, expected_a):
    w = softadapt_weights(PREV, NEW, beta, variant)
    assert w["a"] == pytest.approx(expected_a, rel=1e-12)
    assert w["a"] + w["b"] == pytest.approx(1.0, rel=1e-14)
    assert w["b"] > w["a"]  # the lagging component gets more weight


def test_softadapt_l2_is_nequips_formula():
    # nequip: factor = beta / max(sqrt(sum s^2), eps); exp(factor * s) / (sum + eps)
    prev = {"e": 3.0, "f": 1.0, "s": 0.2}
    new = {"e": 2.5, "f": 0.99, "s": 0.21}
    beta, eps = 1.1, 1e-8
    changes = {k: new[k] - prev[k] for k in new}
    factor = beta / max(math.sqrt(sum(v * v for v in changes.values())), eps)
    exps = {k: math.exp(factor * v) for k, v in changes.items()}
    denom = sum(exps.values()) + eps
    ref = {k: v / denom for k, v in exps.items()}
    ref = {k: v / sum(ref.values()) for k, v in ref.items()}
    got = softadapt_weights(prev, new, beta, "l2_normalized", eps)
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=1e-12)


def test_softadapt_original_is_overflow_safe():
    w = softadapt_weights({"a": 0.0, "b": 0.0}, {"a": 1e4, "b": 0.0}, 1.0, "original")
    assert w == {"a": 1.0, "b": 0.0}


def test_softadapt_normalized_uses_absolute_sum():
    # all slopes negative: dividing by the signed sum would flip their order
    w = softadapt_weights({"a": 1.0, "b": 1.0}, {"a": 0.2, "b": 0.9}, 1.0, "normalized")
    assert w["b"] > w["a"]


def test_softadapt_rejects_unknown_variant():
    with pytest.raises(ValueError, match="variant.*l2_normalized"):
        softadapt_weights(PREV, NEW, 1.0, "l1")


def test_dwa_matches_hand_computed():
    # ratios (0.5, 0.95), T = 2: w_a = 1 / (1 + exp((0.95 - 0.5) / 2))
    w = dwa_weights(PREV, NEW, temperature=2.0)
    assert w["a"] == pytest.approx(0.44398610945538003, rel=1e-12)
    assert w["b"] == pytest.approx(1 - 0.44398610945538003, rel=1e-12)


# ------------------------------------------------------------------ scaling and cycles


def test_scale_weights_modes():
    w = {"a": 0.5, "b": 0.5}
    initial = {"a": 0.8, "b": 0.2}
    current = {"a": 0.1, "b": 0.9}
    assert scale_weights(w, "initial", initial, current) == pytest.approx({"a": 0.8, "b": 0.2})
    assert scale_weights(w, "current", initial, current) == pytest.approx({"a": 0.1, "b": 0.9})
    assert scale_weights(w, "none", initial, current) == pytest.approx({"a": 0.5, "b": 0.5})
    # a term inactive at the start falls back to its current coefficient
    assert scale_weights(w, "initial", {"a": 0.8, "b": None}, current) == pytest.approx(
        {"a": 0.8 / 1.7, "b": 0.9 / 1.7}
    )


HIST = [
    {"a": 1.0, "b": 2.0},
    {"a": 0.5, "b": 1.9},
    {"a": 0.4, "b": 1.5},
    {"a": 0.35, "b": 1.45},
    {"a": 0.3, "b": 1.44},
]
CURRENT = {"a": 0.5, "b": 0.5}


def _rule(p, n):
    return softadapt_weights(p, n, 1.0, "original")


def test_frequency_one_updates_on_every_observation():
    h = LossHistoryWeighting(_rule, frequency=1, scale_by="none")
    outs = [h.observe(loss, CURRENT) for loss in HIST]
    assert outs[0] is None
    for i in range(1, len(HIST)):
        assert outs[i] == pytest.approx(_rule(HIST[i - 1], HIST[i]))


def test_cycle_average_uses_every_candidate():
    h = LossHistoryWeighting(_rule, frequency=3, scale_by="none")
    outs = [h.observe(loss, CURRENT) for loss in HIST]
    assert outs[:3] == [None, None, None]
    expected = mean_weights([_rule(HIST[i - 1], HIST[i]) for i in (1, 2, 3)])
    assert outs[3] == pytest.approx(expected, rel=1e-14)
    assert outs[4] is None
    # and it differs from the mean of only the last two candidates (nequip's cycle)
    assert outs[3]["a"] != pytest.approx(
        mean_weights([_rule(HIST[i - 1], HIST[i]) for i in (2, 3)])["a"], rel=1e-6
    )


def test_history_skips_nonfinite_and_restarts_on_new_active_set():
    h = LossHistoryWeighting(_rule, frequency=1, scale_by="none")
    assert h.observe(HIST[0], CURRENT) is None
    assert h.observe({"a": float("nan"), "b": 1.0}, CURRENT) is None
    assert h.skipped == 1
    assert h.observe(HIST[1], CURRENT) == pytest.approx(_rule(HIST[0], HIST[1]))
    # "b" removed: the history restarts on the new active set
    assert h.observe(HIST[2], {"a": 1.0, "b": None}) is None
    assert h.prev == {"a": HIST[2]["a"]}
    state = h.state_dict()
    h2 = LossHistoryWeighting(_rule, frequency=1, scale_by="none")
    h2.load_state_dict(state)
    assert h2.observe(HIST[3], {"a": 1.0, "b": None}) == h.observe(HIST[3], {"a": 1.0, "b": None})


# ------------------------------------------------------------------ RLW


@pytest.mark.parametrize("distribution", ["normal", "uniform", "dirichlet"])
def test_rlw_draws_are_simplex_and_unbiased(distribution):
    rng = random.Random(0)
    names = ["a", "b", "c"]
    draws = [sample_rlw_weights(names, rng, distribution) for _ in range(3000)]
    for d in draws[:50]:
        assert sum(d.values()) == pytest.approx(1.0)
        assert all(v > 0 for v in d.values())
    mean = mean_weights(draws)
    for k in names:  # symmetric distributions: E[w_k] = 1/K
        assert mean[k] == pytest.approx(1 / 3, abs=0.02)
    spread = max(d["a"] for d in draws) - min(d["a"] for d in draws)
    assert spread > 0.2  # actually random


def test_rlw_is_reproducible_from_seed_and_state():
    a, b = random.Random(5), random.Random(5)
    assert [sample_rlw_weights(["x", "y"], a) for _ in range(3)] == [
        sample_rlw_weights(["x", "y"], b) for _ in range(3)
    ]
    state = a.getstate()
    first = sample_rlw_weights(["x", "y"], a)
    c = random.Random()
    c.setstate(state)
    assert sample_rlw_weights(["x", "y"], c) == first


# ------------------------------------------------------------------ FAMO


def _two_task_losses(theta: torch.Tensor, slow: float = 0.1) -> torch.Tensor:
    # task 0 converges fast, task 1 (gradient slow^2 times smaller) lags
    return torch.stack([(theta[0] - 2.0) ** 2, slow**2 * (theta[1] - 2.0) ** 2])


def test_famo_weights_reproduce_famos_gradient():
    theta = torch.tensor([0.3, -0.7], dtype=torch.float64, requires_grad=True)
    logits = torch.tensor([0.4, -0.2], dtype=torch.float64)
    losses = _two_task_losses(theta)
    w = famo_loss_weights(losses, logits)
    assert float(w.sum()) == pytest.approx(1.0)
    (g_ours,) = torch.autograd.grad((w * losses).sum(), theta, retain_graph=True)
    # the reference implementation's objective: sum_k z_k / c * log(L_k + eps), c detached
    z = torch.softmax(logits, 0)
    d = losses + 1e-8
    c = (z / d).sum().detach()
    (g_ref,) = torch.autograd.grad((z / c * d.log()).sum(), theta)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=0)


def test_famo_logit_gradient_is_autograd_of_z_dot_delta():
    logits = torch.tensor([0.1, 0.5, -0.3], dtype=torch.float64, requires_grad=True)
    prev = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    new = torch.tensor([0.8, 0.49, 1.0], dtype=torch.float64)
    delta = torch.log(prev + 1e-8) - torch.log(new + 1e-8)
    (ref,) = torch.autograd.grad((torch.softmax(logits, 0) * delta).sum(), logits)
    torch.testing.assert_close(famo_logit_gradient(logits, prev, new), ref, rtol=1e-12, atol=1e-15)


def test_famo_logit_adam_matches_torch_adam_and_masks():
    famo = FAMOLogits(3, lr=0.05, weight_decay=0.01)
    ref = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([ref], lr=0.05, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        prev = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
        new = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
        ref.grad = famo_logit_gradient(ref.detach(), prev, new)
        opt.step()
        famo.update(prev, new)
    torch.testing.assert_close(famo.logits, ref.detach(), rtol=1e-12, atol=1e-14)
    # a masked-out task keeps its logit and moments
    before = famo.state_dict()
    mask = torch.tensor([True, False, True])
    famo.update(
        torch.ones(3, dtype=torch.float64), torch.full((3,), 0.5, dtype=torch.float64), mask
    )
    assert famo.logits[1] == before["logits"][1] and famo.steps[1] == before["steps"][1]
    assert famo.logits[0] != before["logits"][0]
    assert famo.weights(torch.ones(3), mask)[1] == 0


def test_famo_moves_weight_to_lagging_task():
    # FAMO balances *relative* (log) improvement, so it is blind to a pure scale factor;
    # here task 1 lags for real: it has an irreducible error of 1 (its loss can fall
    # from 5 to 1 only, task 0's from 4 to 0)
    theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    famo = FAMOLogits(2, lr=0.025, weight_decay=0.0)
    prev = None
    for _ in range(60):
        losses = torch.stack([(theta[0] - 2.0) ** 2, (theta[1] - 2.0) ** 2 + 1.0])
        if prev is not None:
            famo.update(prev, losses.detach())
        w = famo.weights(losses)
        (grad,) = torch.autograd.grad((w * losses).sum(), theta)
        with torch.no_grad():
            theta -= 0.1 * grad
        prev = losses.detach()
    z = torch.softmax(famo.logits, 0)
    assert z[1] > 0.6 > z[0]


# ------------------------------------------------------------------ uncertainty weighting


def test_uncertainty_loss_formula_and_optimum():
    losses = torch.tensor([2.0, 0.5], dtype=torch.float64)
    s = torch.tensor([0.3, -1.0], dtype=torch.float64, requires_grad=True)
    value = uncertainty_weighted_loss(losses, s).detach()
    expected = 0.5 * math.exp(-0.3) * 2.0 + 0.15 + 0.5 * math.exp(1.0) * 0.5 - 0.5
    assert float(value) == pytest.approx(expected, rel=1e-12)
    # stationary in s at exp(s) = L
    s_opt = torch.log(losses).requires_grad_(True)
    (g,) = torch.autograd.grad(uncertainty_weighted_loss(losses, s_opt), s_opt)
    torch.testing.assert_close(g, torch.zeros(2, dtype=torch.float64), atol=1e-14, rtol=0)
    torch.testing.assert_close(uncertainty_weights(s_opt.detach()), 0.5 / losses)


def test_uncertainty_weighting_downweights_the_noisy_task():
    # two regressions of the same line, task 0 with label noise 1.0, task 1 with 0.1: the
    # known right weighting is inverse to the noise variance
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, dtype=torch.float64, generator=g)
    y0 = 2 * x + 1.0 * torch.randn(512, dtype=torch.float64, generator=g)
    y1 = 2 * x + 0.1 * torch.randn(512, dtype=torch.float64, generator=g)
    theta = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    s = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([theta, s], lr=0.05)
    for _ in range(400):
        losses = torch.stack([((theta * x - y0) ** 2).mean(), ((theta * x - y1) ** 2).mean()])
        opt.zero_grad()
        uncertainty_weighted_loss(losses, s).backward()
        opt.step()
    w = uncertainty_weights(s.detach())
    assert float(w[1] / w[0]) > 30  # ideally ~ (1.0 / 0.1)^2 = 100
