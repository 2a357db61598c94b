"""The step engine alone, without a Trainer: each test runs in milliseconds.

Parameters are two plain tensors and the task losses closed-form functions of them, so
every expected gradient is computed independently with ``torch.autograd.grad`` and every
expected update by calling the aggregator on that matrix.
"""

from __future__ import annotations

import pytest
import torch

from nequip_mtl.aggregators import ConFIG, MomentumConFIG, Sum, UPGrad
from nequip_mtl.step import StepEngine, TaskGradients

torch.set_default_dtype(torch.float64)
NAMES = ["energy", "forces", "stress"]


def make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(3, generator=g)),
        torch.nn.Parameter(torch.randn(2, generator=g)),
    ]


def task_losses(params, x: float = 1.0) -> dict[str, torch.Tensor]:
    a, b = params
    return {
        "energy": (a.sum() * x - 1.0) ** 2,
        "forces": (a[0] * b[0] + x) ** 2 + b[1] ** 2,
        "stress": ((a - x) ** 2).sum() * 0.1 + b.sum(),
    }


def grads_of(loss: torch.Tensor, params) -> torch.Tensor:
    gs = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    return torch.cat([torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)])


def grad_vector(params) -> torch.Tensor | None:
    if all(p.grad is None for p in params):
        return None
    return torch.cat(
        [(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in params]
    )


COEFFS = {"energy": 0.5, "forces": 0.3, "stress": 0.2}


def step(engine, params, coeffs=COEFFS, xs=(1.0,), s=0, **begin):
    engine.begin(coeffs, params, accumulate=len(xs), **begin)
    for x in xs:
        engine.add(task_losses(params, x))
    outcome = engine.finish(s)
    update = grad_vector(params)
    engine.end()
    return outcome, update


def expected_matrix(params, xs=(1.0,), names=NAMES) -> torch.Tensor:
    rows = torch.zeros(len(names), sum(p.numel() for p in params))
    for x in xs:
        losses = task_losses(params, x)
        rows += torch.stack([grads_of(losses[n], params) for n in names]) / len(xs)
    return rows


def test_update_is_the_aggregator_applied_to_independent_gradients():
    params = make_params()
    outcome, update = step(StepEngine(UPGrad()), params)
    matrix = expected_matrix(params)
    coeffs = torch.tensor([COEFFS[n] for n in NAMES])
    torch.testing.assert_close(update, UPGrad()(matrix, coeffs), rtol=1e-12, atol=1e-14)
    assert outcome.applied and outcome.cause is None
    torch.testing.assert_close(outcome.statistics.gram, matrix @ matrix.T, rtol=1e-12, atol=0)
    weights = torch.tensor([outcome.weights[n] for n in NAMES])
    torch.testing.assert_close(weights @ matrix, update, rtol=1e-12, atol=1e-14)


def test_accumulation_sums_micro_batches_with_one_over_k():
    params = make_params(1)
    _, update = step(StepEngine(Sum()), params, xs=(1.0, 0.5, -2.0))
    matrix = expected_matrix(params, xs=(1.0, 0.5, -2.0))
    coeffs = torch.tensor([COEFFS[n] for n in NAMES])
    torch.testing.assert_close(update, coeffs @ matrix, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "aggregator",
    [ConFIG, Sum, lambda: MomentumConFIG(second_moment=False, tasks_per_step=3)],
    ids=["ConFIG", "Sum", "MomentumConFIG_first_moment_only"],
)
def test_a_loss_scale_scales_grad_but_not_the_aggregation(aggregator):
    """Under a GradScaler the rows hold scaled gradients; the aggregator and the recorded
    statistics must see unscaled ones (MomentumConFIG without a second moment is not scale
    invariant) and `.grad` is the scaled update, for the scaler to unscale."""
    params = make_params(2)
    plain_outcome, plain = step(StepEngine(aggregator()), params)
    outcome, scaled = step(StepEngine(aggregator()), params, scale=1024.0, loss_scaled=True)
    torch.testing.assert_close(scaled / 1024.0, plain, rtol=1e-12, atol=1e-14)
    matrix = expected_matrix(params)
    torch.testing.assert_close(outcome.statistics.gram, matrix @ matrix.T, rtol=1e-12, atol=0)


def test_window_lives_from_begin_to_end_and_rows_start_at_zero():
    params = make_params()
    engine = StepEngine(ConFIG())
    assert engine.window is None
    step(engine, params)
    assert engine.window is None
    window = engine.begin(COEFFS, params)
    assert engine.window is window and window.tasks == NAMES
    assert all(bool((g.rows == 0).all()) for g in engine.rows.groups)  # the last step's rows
    engine.end()
    assert engine.window is None


def test_rows_are_released_after_the_step():
    """After the step no parameter's `.grad` aliases a task-gradient row (the next
    window's zeroing must not change the applied update), and a skip leaves `.grad` None."""
    params = make_params()
    engine = StepEngine(ConFIG())
    _, update = step(engine, params)
    engine.begin(COEFFS, params)  # zeroes the rows
    assert torch.equal(grad_vector(params), update)
    engine.end()
    bad = StepEngine(ConFIG())
    bad.begin(COEFFS, params)
    losses = task_losses(params)
    losses["forces"] = losses["forces"] * float("nan")
    bad.add(losses)
    outcome = bad.finish(3)
    assert not outcome.applied and "'forces' has a NaN gradient at global step 3" in outcome.cause
    assert all(p.grad is None for p in params)


def test_zero_gradient_task_is_dropped_and_the_rest_aggregated():
    params = make_params()
    engine = StepEngine(UPGrad())
    engine.begin(COEFFS, params)
    losses = task_losses(params)
    losses["stress"] = losses["stress"].detach() * 0  # no labels: no gradient
    engine.add(losses)
    outcome = engine.finish(0)
    matrix = expected_matrix(params, names=["energy", "forces"])
    expected = UPGrad()(matrix, torch.tensor([0.5, 0.3]))
    torch.testing.assert_close(grad_vector(params), expected, rtol=1e-12, atol=1e-14)
    assert outcome.dropped == [("stress", None)] and set(outcome.weights) == {"energy", "forces"}


def test_a_task_absent_from_every_add_is_dropped():
    """Dataset tasks: a task with no frames in the window is never added."""
    params = make_params()
    engine = StepEngine(UPGrad())
    engine.begin(COEFFS, params)
    losses = task_losses(params)
    engine.add({"energy": losses["energy"], "forces": losses["forces"]})
    outcome = engine.finish(0)
    assert outcome.applied and outcome.dropped == [("stress", None)]


def test_sub_batch_adds_equal_one_shared_graph():
    """Tasks whose losses come from their own forward pass (one `add` per graph) give the
    same update as one graph holding all of them."""
    params = make_params(3)
    _, shared = step(StepEngine(ConFIG()), params)
    engine = StepEngine(ConFIG())
    engine.begin(COEFFS, params)
    for name in NAMES:  # three separate forward passes
        engine.add({name: task_losses(params)[name]})
    engine.finish(0)
    torch.testing.assert_close(grad_vector(params), shared, rtol=0, atol=0)


@pytest.mark.parametrize("policy", ["skip", "zero_task", "raise"])
def test_nonfinite_policies(policy):
    params = make_params()
    engine = StepEngine(UPGrad(), on_nonfinite=policy)
    engine.begin(COEFFS, params)
    losses = task_losses(params)
    losses["energy"] = losses["energy"] * float("inf")
    if policy == "raise":
        with pytest.raises(FloatingPointError, match="'energy' has"):
            engine.add(losses) or engine.finish(5)
        return
    engine.add(losses)
    outcome = engine.finish(5)
    if policy == "skip":
        assert not outcome.applied and all(p.grad is None for p in params)
    else:
        assert outcome.applied and outcome.dropped[0][0] == "energy"
        matrix = expected_matrix(params, names=["forces", "stress"])
        expected = UPGrad()(matrix, torch.tensor([0.3, 0.2]))
        torch.testing.assert_close(grad_vector(params), expected, rtol=1e-12, atol=1e-14)


def test_every_task_nonfinite_is_reported_as_such():
    params = make_params()
    engine = StepEngine(UPGrad(), on_nonfinite="zero_task")
    engine.begin(COEFFS, params)
    engine.add({n: v * float("nan") for n, v in task_losses(params).items()})
    outcome = engine.finish(0)
    assert not outcome.applied and outcome.all_nonfinite


def test_held_weights_between_refreshes():
    """weights_every=3: refresh, held, held, refresh; a held step's update is the
    refresh's weights applied to that step's own (independent) task gradients."""
    params = make_params(4)
    engine = StepEngine(UPGrad(), weights_every=3)
    kinds, held_weights = [], None
    for s, x in enumerate([1.0, 0.7, -0.3, 0.2]):
        outcome, update = step(engine, params, xs=(x,), s=s)
        kinds.append("held" if outcome.held else "refresh")
        matrix = expected_matrix(params, xs=(x,))
        if outcome.held:
            w = torch.tensor([held_weights[n] for n in NAMES])
            torch.testing.assert_close(update, w @ matrix, rtol=1e-12, atol=1e-14)
        else:
            coeffs = torch.tensor([COEFFS[n] for n in NAMES])
            held_weights = dict(zip(NAMES, UPGrad().weights(matrix @ matrix.T, coeffs).tolist()))
            torch.testing.assert_close(update, UPGrad()(matrix, coeffs), rtol=1e-10, atol=1e-14)
        with torch.no_grad():
            for p in params:
                p -= 0.05 * p.grad
    assert kinds == ["refresh", "held", "held", "refresh"]


def test_a_refresh_with_a_zero_task_gradient_still_holds_the_next_steps():
    """weights_every=3; on the refresh `stress` has an exactly zero gradient (no labels in
    the batch) and is dropped: the next two steps are still held, one backward pass each,
    on the weights of the two tasks that entered, applied to their own gradients.

    Fails if the dropped task invalidates the held weights (e.g. ``HeldWeights`` keeping
    the coefficients of the kept tasks only, so ``valid_for`` never matches: a refresh,
    three backward passes, every step)."""
    params = make_params(5)
    engine = StepEngine(UPGrad(), weights_every=3)
    kinds, passes, held_weights = [], [], None
    for s, x in enumerate([1.0, 0.7, -0.3, 0.2]):
        window = engine.begin(COEFFS, params)
        losses = task_losses(params, x)
        if s == 0:
            losses["stress"] = losses["stress"].detach() * 0
        engine.add(losses)
        outcome = engine.finish(s)
        update = grad_vector(params)
        engine.end()
        kinds.append("held" if outcome.held else "refresh")
        passes.append(window.backward_passes)
        if s == 0:
            assert outcome.dropped == [("stress", None)]
            held_weights = outcome.weights
        elif outcome.held:
            names = ["energy", "forces"]
            w = torch.tensor([held_weights[n] for n in names])
            expected = w @ expected_matrix(params, xs=(x,), names=names)
            torch.testing.assert_close(update, expected, rtol=1e-12, atol=1e-14)
    assert kinds == ["refresh", "held", "held", "refresh"]
    assert passes == [2, 1, 1, 3]


def test_a_nonfinite_held_step_forces_a_refresh_that_names_the_task():
    """A held step's single gradient cannot say which task is non-finite: the step is
    skipped and the next step refreshes, whose per-task gradients name `forces`.

    Fails if the held weights survive the non-finite held step (``self.held = None``
    removed from ``_finish_held``): the next step is held again and names no task."""
    params = make_params(6)
    engine = StepEngine(UPGrad(), weights_every=4)
    first, _ = step(engine, params)
    assert not first.held and first.applied

    def nan_forces(s):
        engine.begin(COEFFS, params)
        losses = task_losses(params)
        losses["forces"] = losses["forces"] * float("nan")
        engine.add(losses)
        outcome = engine.finish(s)
        engine.end()
        return outcome

    held = nan_forces(1)
    assert held.held and not held.applied and "the next step refreshes" in held.cause
    assert all(p.grad is None for p in params)
    refresh = nan_forces(2)
    assert not refresh.held and not refresh.applied
    assert "loss component 'forces' has a NaN gradient at global step 2" in refresh.cause


def test_zero_forgets_which_parameters_the_last_window_reached():
    """A parameter the last window reached but this one does not gets ``.grad = None``
    (as after a plain ``loss.backward()``), not a zero gradient that weight decay and
    momentum would act on.

    Fails if ``TaskGradients.zero_()`` keeps the reached flags of the last window."""
    params = make_params()
    a, b = params
    rows = TaskGradients(params, 1)
    rows.zero_()
    rows.backward(0, a.sum() * b.sum(), retain_graph=False)
    rows.apply_weights(torch.ones(1))
    assert a.grad is not None and b.grad is not None
    rows.zero_()
    rows.backward(0, (a**2).sum(), retain_graph=False)  # does not reach b
    rows.apply_weights(torch.ones(1))
    assert b.grad is None
    torch.testing.assert_close(a.grad, 2 * a.detach(), rtol=0, atol=0)
    rows.close()


@pytest.mark.parametrize(
    "change",
    [
        {"energy": 0.5, "forces": 0.4, "stress": 0.1},  # coefficients
        {"energy": 0.5, "forces": 0.5, "stress": None},  # the active set
    ],
    ids=["coefficients", "active_set"],
)
def test_held_weights_are_invalidated_by_a_change(change):
    params = make_params()
    engine = StepEngine(UPGrad(), weights_every=4)
    first, _ = step(engine, params)
    second, _ = step(engine, params, coeffs=change)
    assert not first.held and not second.held  # the change forces a refresh
    third, _ = step(engine, params, coeffs=change)
    assert third.held


def test_the_aggregator_is_reset_when_the_active_set_changes():
    params = make_params()
    resets = []

    class Recording(ConFIG):  # stateless: only the engine calls reset
        def reset(self):
            resets.append(True)

    engine = StepEngine(Recording())
    step(engine, params)
    step(engine, params)
    assert resets == []
    step(engine, params, coeffs={"energy": 1.0, "forces": None, "stress": 1.0})
    assert resets == [True]


def test_a_zero_coefficient_stays_a_task():
    params = make_params()
    window = StepEngine(UPGrad()).begin({"energy": 1.0, "forces": 0.0, "stress": None}, params)
    assert window.active == ["energy", "forces"] and window.tasks == ["energy", "forces"]


def test_one_active_task_is_its_plain_gradient():
    params = make_params()
    _, update = step(
        StepEngine(UPGrad()), params, coeffs={"energy": None, "forces": 1.0, "stress": None}
    )
    torch.testing.assert_close(update, grads_of(task_losses(params)["forces"], params))


def test_injected_reduce_sees_the_window_rows_before_aggregation():
    params = make_params()
    engine = StepEngine(ConFIG())
    seen = []

    def reduce(rows: TaskGradients, n: int) -> None:
        seen.append(n)
        for g in rows.groups:
            g.rows[:n] *= 2.0  # as if another rank had the same gradients: mean x2 = sum

    engine.begin(COEFFS, params)
    engine.add(task_losses(params))
    outcome = engine.finish(0, reduce)
    matrix = expected_matrix(params) * 2.0
    torch.testing.assert_close(outcome.statistics.gram, matrix @ matrix.T, rtol=1e-12, atol=0)
    assert seen == [3]


def test_state_dict_round_trip_keeps_held_weights():
    params = make_params()
    engine = StepEngine(UPGrad(), weights_every=3)
    step(engine, params)
    restored = StepEngine(UPGrad(), weights_every=3)
    restored.load_state_dict(engine.state_dict())
    assert restored.held == engine.held and restored.last_active == NAMES
    outcome, _ = step(restored, params)
    assert outcome.held


def test_observer_rows_equal_autograd_and_leave_grad_alone():
    """``add_gradient`` (the gradient-conflict probe's path) fills the engine's rows with
    the task gradients, summed over calls, across parameter groups of two dtypes; ``gram``
    and ``dots`` equal the products of independently computed vectors; no ``.grad`` is
    read or written and, with ``track_reach=False``, no hook is left on a parameter.
    Fails if ``add_gradient`` writes ``.grad`` or skips a group, or ``dots`` pairs a
    group's rows with another group's entries."""
    a, b = make_params()
    c = torch.nn.Parameter(torch.tensor([0.5, -1.5], dtype=torch.float32))
    params = [a, c, b]  # groups: (a, b) float64, (c,) float32: row order != param order
    before = [torch.full_like(p, 7.0) for p in params]
    for p, g in zip(params, before):
        p.grad = g
    rows = TaskGradients(params, 2, track_reach=False)
    expected = torch.zeros(2, 7)
    for x in (1.0, -0.5):  # two micro-batches
        losses = task_losses([a, b], x)
        losses = [losses["energy"] + (c.double() ** 2).sum(), losses["stress"]]
        for j, loss in enumerate(losses):
            expected[j] += grads_of(loss, params)
            rows.add_gradient(j, loss, retain_graph=j == 0)
    for p, g in zip(params, before):
        assert p.grad is g and torch.equal(g, torch.full_like(p, 7.0))
    u = [torch.randn(p.shape, dtype=p.dtype) for p in params]
    u[1] = None  # no update for c: zero
    flat_u = torch.cat([torch.zeros(2) if v is None else v.double() for v in u])
    assert torch.allclose(rows.gram(2), expected @ expected.T, rtol=1e-6)
    assert torch.allclose(rows.dots(2, u), expected @ flat_u, rtol=1e-6)
    assert not any(p._post_accumulate_grad_hooks for p in params)
    rows.close()
