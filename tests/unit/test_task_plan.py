"""Tasks from loss components: one per component, or one per training dataset."""

import pytest
import torch

from nequip_mtl.step import plan_tasks

COEFFS = {"a/energy": 0.1, "a/forces": 0.3, "b/energy": 0.2, "b/forces": 0.4, "b/stress": None}
DATASETS = {name: name.split("/")[0] for name in COEFFS}


def test_components_are_tasks_unchanged():
    plan = plan_tasks(COEFFS)
    assert plan.coeffs == COEFFS
    losses = {n: torch.tensor(float(i)) for i, n in enumerate(COEFFS)}
    out = plan.losses(losses)
    assert list(out) == ["a/energy", "a/forces", "b/energy", "b/forces"]
    assert all(out[n] is losses[n] for n in out)  # the same tensors: no extra ops


def test_dataset_tasks_keep_the_weighted_sum():
    """sum_d C_d L_d equals sum_c c_c L_c, and each dataset's coefficient is the sum of its
    components'; an inactive component is not part of its task."""
    plan = plan_tasks(COEFFS, DATASETS)
    assert plan.coeffs == pytest.approx({"a": 0.4, "b": 0.6})
    assert plan.parts["b"] == pytest.approx({"b/energy": 1 / 3, "b/forces": 2 / 3})
    losses = {n: torch.tensor(float(i + 1), requires_grad=True) for i, n in enumerate(COEFFS)}
    tasks = plan.losses(losses)
    total = sum(plan.coeffs[t] * tasks[t] for t in tasks)
    expected = sum(c * losses[n] for n, c in COEFFS.items() if c is not None)
    torch.testing.assert_close(total, expected, rtol=1e-12, atol=0)


def test_a_dataset_without_active_components_is_inactive_and_zero_coefficients_stay():
    coeffs = {"a/energy": None, "a/forces": None, "b/energy": 0.0, "b/forces": 0.0}
    plan = plan_tasks(coeffs, {n: n.split("/")[0] for n in coeffs})
    assert plan.coeffs == {"a": None, "b": 0.0}
    assert plan.parts == {"b": {"b/energy": 0.5, "b/forces": 0.5}}
