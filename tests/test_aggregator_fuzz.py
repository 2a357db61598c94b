"""Fuzz every aggregator: random shapes, dtypes, scales 1e-8..1e8, rank deficiency, faults.

Contract: finite gradients give a finite update of the right shape and dtype; non-finite
gradients raise ``FloatingPointError`` (the documented fault path), never a silent NaN.
"""

import inspect

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings

import nequip_mtl.aggregators as aggregators


def _concrete_aggregators():
    out = []
    for name in aggregators.__all__:
        cls = getattr(aggregators, name)
        if inspect.isclass(cls) and issubclass(cls, aggregators.Aggregator):
            if cls in (aggregators.Aggregator, aggregators.GramAggregator):
                continue
            out.append(cls)
    return out


AGGREGATORS = _concrete_aggregators()


@st.composite
def gradient_problems(draw):
    m = draw(st.integers(1, 5))
    n = draw(st.integers(1, 40))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(m, n, generator=g, dtype=torch.float64)
    log_scales = draw(st.lists(st.floats(-8, 8), min_size=m, max_size=m))
    grads = grads * torch.tensor([10.0**s for s in log_scales], dtype=torch.float64)[:, None]
    kind = draw(
        st.sampled_from(["generic", "zero_row", "duplicate", "parallel", "antiparallel", "rank1"])
    )
    if m >= 2:
        if kind == "zero_row":
            grads[draw(st.integers(0, m - 1))] = 0.0
        elif kind == "duplicate":
            grads[1] = grads[0]
        elif kind == "parallel":
            grads[1] = grads[0] * 10.0 ** draw(st.floats(-4, 4))
        elif kind == "antiparallel":
            grads[1] = -grads[0] * 10.0 ** draw(st.floats(-4, 4))
        elif kind == "rank1":
            grads = grads[:1].repeat(m, 1) * torch.rand(m, 1, generator=g, dtype=torch.float64)
    coeffs = torch.rand(m, generator=g, dtype=torch.float64) + 0.05
    coeffs = coeffs / coeffs.sum()
    return grads.to(dtype), coeffs.to(dtype)


@pytest.mark.parametrize("cls", AGGREGATORS, ids=lambda c: c.__name__)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=gradient_problems())
def test_finite_gradients_give_a_finite_update(cls, problem):
    grads, coeffs = problem
    update = cls()(grads, coeffs)
    assert update.shape == (grads.shape[1],)
    assert update.dtype == grads.dtype
    assert torch.isfinite(update).all(), f"{cls.__name__} returned {update}"


@pytest.mark.parametrize("cls", AGGREGATORS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_gradients_raise(cls, bad):
    grads = torch.randn(3, 7, dtype=torch.float64)
    grads[1, 4] = bad
    with pytest.raises(FloatingPointError, match=r"tasks \[1\]"):
        cls()(grads)
