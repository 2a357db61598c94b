"""Fuzz every aggregator: random shapes, dtypes, scales 1e-8..1e8, rank deficiency, faults.

Contract: finite gradients give a finite update of the right shape and dtype; non-finite
gradients raise ``FloatingPointError`` (the documented fault path), never a silent NaN.
"""

import inspect
import re

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


def _pattern(name: str) -> tuple[torch.Tensor, list[int]]:
    grads = torch.randn(4, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    inf, nan = float("inf"), float("nan")
    if name == "plus_and_minus_inf":  # +inf and -inf in one row: squares are both +inf
        grads[2, 1], grads[2, 5] = inf, -inf
        return grads, [2]
    if name == "inf_where_others_are_zero":  # inf * 0 = NaN off the diagonal only
        grads[:, 3] = 0.0
        grads[0, 3] = inf
        return grads, [0]
    if name == "nan_row":
        grads[3] = nan
        return grads, [3]
    if name == "two_bad_rows":
        grads[0, 0], grads[3, 8] = nan, -inf
        return grads, [0, 3]
    if name == "inf_in_a_tiny_row":  # the other entries of the row underflow when squared
        grads[1] *= 1e-30
        grads[1, 4] = inf
        return grads, [1]
    raise ValueError(name)


PATTERNS = [
    "plus_and_minus_inf",
    "inf_where_others_are_zero",
    "nan_row",
    "two_bad_rows",
    "inf_in_a_tiny_row",
]


@pytest.mark.parametrize("cls", AGGREGATORS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_nonfinite_patterns_are_caught_and_named(cls, pattern, dtype):
    """The check reads the squared row norms (Gram diagonal or row norms), not every entry:
    any NaN/inf entry must still make its row's norm non-finite and be named."""
    grads, bad = _pattern(pattern)
    with pytest.raises(FloatingPointError, match=re.escape(f"tasks {bad}")):
        cls()(grads.to(dtype))


@pytest.mark.parametrize("cls", AGGREGATORS, ids=lambda c: c.__name__)
def test_finite_gradients_whose_norms_overflow_are_not_a_fault(cls):
    """float32 rows whose sum of squares overflows are finite gradients: no error."""
    grads = torch.randn(3, 9, generator=torch.Generator().manual_seed(2)) * 1e25
    update = cls()(grads)
    assert torch.isfinite(update).all()
