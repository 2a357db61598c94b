"""Behaviours of ``MultitaskLightningModule`` that earlier tests let through.

Everything here goes through public behaviour only: the parameters after each step, the
``.grad`` an optimizer sees (a callback's ``on_before_optimizer_step``), the number of
backward passes (a tensor hook on a parameter), ``skipped_steps``,
``applied_task_weights`` and ``task_gradient_statistics``. Expected updates are computed
independently: per-task gradients with ``torch.autograd`` on each step's batch at that
step's parameters, and a fresh aggregator run on them.
"""

from __future__ import annotations

import copy

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import MixedPrecision

import nequip_mtl.train as mtl
from nequip_mtl.aggregators import ConFIG, MomentumConFIG, UPGrad
from nequip_mtl.train.callbacks import LossCoefficientScheduler
from tests._harness import datamodule, loss_config, module_kwargs, params, trainer

NAMES = ["per_atom_energy_mse", "forces_mse", "stress_mse"]


def _flat_grads(module) -> torch.Tensor:
    ps = [p for p in module.model.parameters() if p.requires_grad]
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in ps]
    )


class DirectGradients(Callback):
    """Per optimizer step: the applied update (``.grad`` as the optimizer sees it), the
    backward passes the module ran (a hook on one parameter, silent during our own
    autograd calls), the coefficients of the step, and the per-task gradient matrix of
    the step's batch computed directly with ``torch.autograd`` at the step's parameters."""

    def __init__(self, names=NAMES):
        self.names = list(names)
        self.updates, self.rows, self.coeffs, self.passes = [], [], [], []
        self._batches, self._count, self._counting = [], 0, True

    def on_train_start(self, trainer, pl_module):
        self._loss = copy.deepcopy(pl_module.loss)
        # the largest weight: every loss component reaches it
        p = max(pl_module.model.parameters(), key=lambda q: q.numel())
        self._hook = p.register_hook(self._on_grad)

    def on_train_end(self, trainer, pl_module):
        self._hook.remove()

    def _on_grad(self, grad):
        if self._counting:
            self._count += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx % trainer.accumulate_grad_batches == 0:
            self._batches, self._count = [], 0
        self._batches.append((copy.deepcopy(batch), batch_idx))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.passes.append(self._count)
        self.updates.append(_flat_grads(pl_module))
        self.coeffs.append({n: pl_module.loss.entries[n].coeff for n in self.names})
        ps = [p for p in pl_module.model.parameters() if p.requires_grad]
        rows = torch.zeros(len(self.names), sum(p.numel() for p in ps), dtype=torch.float64)
        self._counting = False
        try:
            for batch, idx in self._batches:
                target = pl_module.process_target(copy.deepcopy(batch), idx)
                losses = self._loss(pl_module(copy.deepcopy(batch)), target)
                for i, name in enumerate(self.names):
                    g = torch.autograd.grad(losses[name], ps, retain_graph=True, allow_unused=True)
                    flat = [
                        (x if x is not None else torch.zeros_like(p)).flatten()
                        for x, p in zip(g, ps)
                    ]
                    rows[i] += torch.cat(flat).double() / len(self._batches)
        finally:
            self._counting = True
        self.rows.append(rows)

    def active(self, step: int) -> list[int]:
        return [i for i, n in enumerate(self.names) if self.coeffs[step][n] is not None]

    def coeff_tensor(self, step: int) -> torch.Tensor:
        names = self.names
        return torch.tensor([self.coeffs[step][names[i]] for i in self.active(step)]).double()


def _fit(tmp_path, cls=mtl.MultitaskLightningModule, epochs=4, callbacks=(), plugins=None, **kw):
    torch.manual_seed(0)
    module = cls(**module_kwargs(**kw))
    rec = DirectGradients()
    tr = trainer(tmp_path, max_epochs=epochs, callbacks=[rec, *callbacks], plugins=plugins)
    tr.fit(module, datamodule=datamodule())
    return module, rec, tr


def _held_expectation(rec, aggregator, pattern):
    """The documented update of every step for a refresh pattern (``True``: refresh):
    fresh weights of ``aggregator`` at a refresh, the last refresh's weights applied to
    the current step's task gradients in between. Also returns, per held step, the update
    that fresh weights would have given (to check that the test can tell them apart)."""
    expected, fresh_alternative, held = [], [], None
    for step, refresh in enumerate(pattern):
        active = rec.active(step)
        rows = rec.rows[step][active]
        fresh = aggregator.weights(rows @ rows.T, rec.coeff_tensor(step))
        if refresh:
            held = {active[j]: float(w) for j, w in enumerate(fresh)}
            expected.append(fresh @ rows)
        else:
            w = torch.tensor([held.get(i, 0.0) for i in active], dtype=torch.float64)
            expected.append(w @ rows)
            fresh_alternative.append((step, fresh @ rows))
    return expected, fresh_alternative


def _assert_updates(rec, expected, rtol=1e-9):
    assert len(rec.updates) == len(expected)
    for step, (got, want) in enumerate(zip(rec.updates, expected)):
        torch.testing.assert_close(got, want, rtol=rtol, atol=1e-12, msg=f"step {step}")


def _gap(a, b) -> float:
    return float((a - b).norm() / a.norm())


def _assert_distinguishable(expected, alternatives, *, every=True):
    """The expected update is far (beyond the comparison tolerance) from an alternative
    (``every``: at each listed step, else at one at least): the check can fail."""
    gaps = [_gap(expected[step], alt) for step, alt in alternatives]
    assert (min(gaps) if every else max(gaps)) > 1e-4, gaps


# --------------------------------------------------------------------- held weights


@pytest.mark.parametrize("aggregator", [ConFIG, UPGrad])
def test_held_steps_apply_independently_computed_weights(tmp_path, aggregator):
    """``weights_every: 3``: refresh steps apply ``aggregator.weights`` of the step's own
    task gradients; the two steps after apply *the refresh's* weights to their own task
    gradients (one backward pass each)."""
    agg = {"_target_": f"nequip_mtl.aggregators.{aggregator.__name__}"}
    module, rec, _ = _fit(tmp_path, weights_every=3, aggregator=agg)
    pattern = [True, False, False] * 2 + [True, False]
    assert rec.passes == [3 if r else 1 for r in pattern]
    expected, alternatives = _held_expectation(rec, aggregator(), pattern)
    # held weights differ from fresh ones on some held step (UPGrad's weights are
    # constant while no pair of tasks conflicts)
    _assert_distinguishable(expected, alternatives, every=False)
    _assert_updates(rec, expected)
    assert module.skipped_steps == 0


@pytest.mark.parametrize(
    "initial, change",
    [(None, 0.0), (0.0, None)],
    ids=["null-to-zero", "zero-to-null"],
)
def test_held_weights_are_invalidated_by_a_change_of_the_active_set(tmp_path, initial, change):
    """The stress component is switched between ``null`` (masked) and ``0.0`` at step 2:
    the active set changes but the other coefficients keep their values (0.5, 0.5), so
    only the change of the active set can force the refresh at step 2."""
    coeffs = {"total_energy": 1.0, "forces": 1.0, "stress": initial}
    sched = LossCoefficientScheduler({2: {"stress_mse": change}}, interval="batch")
    module, rec, _ = _fit(tmp_path, weights_every=3, loss=loss_config(coeffs), callbacks=[sched])
    assert rec.coeffs[1]["forces_mse"] == rec.coeffs[2]["forces_mse"] == 0.5
    assert rec.coeffs[1]["stress_mse"] == initial and rec.coeffs[2]["stress_mse"] == change
    pattern = [True, False, True, False, False, True, False, False]
    expected, _ = _held_expectation(rec, ConFIG(), pattern)
    # without the forced refresh, step 2 would apply step 0's weights
    stale, _ = _held_expectation(rec, ConFIG(), [True, False, False] * 2 + [True, False])
    _assert_distinguishable(expected, [(2, stale[2])])
    _assert_updates(rec, expected)
    refresh_passes = [2 if initial is None else 3] + [3 if initial is None else 2] * 2
    assert rec.passes == [refresh_passes[0], 1, refresh_passes[1], 1, 1, refresh_passes[2], 1, 1]


def test_a_zero_coefficient_stays_a_task(tmp_path):
    """``coeff: 0.0`` (not null) is an active task: it gets its own backward pass, enters
    the Gram matrix and constrains the update (ConFIG with ``b_stress = 0``)."""
    coeffs = {"total_energy": 1.0, "forces": 1.0, "stress": 0.0}
    module, rec, _ = _fit(tmp_path, epochs=1, loss=loss_config(coeffs))
    assert rec.passes == [3, 3]
    assert module.task_gradient_statistics.names == NAMES
    assert set(module.applied_task_weights) == set(NAMES)
    expected, without = [], []
    for step in range(2):
        rows, c = rec.rows[step], rec.coeff_tensor(step)
        assert c.tolist() == [0.5, 0.5, 0.0]
        expected.append(ConFIG().weights(rows @ rows.T, c) @ rows)
        two = rows[:2]
        without.append(ConFIG().weights(two @ two.T, c[:2]) @ two)
    _assert_distinguishable(expected, list(enumerate(without)))
    _assert_updates(rec, expected)
    # the update is orthogonal to the zero-coefficient task's gradient (ConFIG: A x ∝ b)
    last = rec.rows[1]
    cos = (last[2] @ rec.updates[1]) / (last[2].norm() * rec.updates[1].norm())
    assert abs(float(cos)) < 1e-8


# --------------------------------------------------------------------- aggregator state


def test_aggregator_state_is_reset_when_the_active_set_changes(tmp_path):
    """At step 2 a schedule swaps the masked component (stress null -> forces null). The
    number of active tasks stays 2, so only the module's reset tells MomentumConFIG that
    its second momentum row now belongs to another task. Checked against a fresh
    MomentumConFIG run on the directly computed task gradients, restarted at the swap."""
    coeffs = {"total_energy": 1.0, "forces": 1.0, "stress": None}
    sched = LossCoefficientScheduler({2: {"forces_mse": None, "stress_mse": 1.0}}, interval="batch")
    agg = {
        "_target_": "nequip_mtl.aggregators.MomentumConFIG",
        "tasks_per_step": 2,
        "second_moment": False,
    }
    _, rec, _ = _fit(
        tmp_path, epochs=3, aggregator=agg, loss=loss_config(coeffs), callbacks=[sched]
    )
    assert [rec.active(s) for s in range(6)] == [[0, 1]] * 2 + [[0, 2]] * 4
    expected, stale = [], []
    replay = MomentumConFIG(tasks_per_step=2, second_moment=False)
    never_reset = MomentumConFIG(tasks_per_step=2, second_moment=False)
    for step in range(6):
        if step == 2:
            replay = MomentumConFIG(tasks_per_step=2, second_moment=False)
        rows, c = rec.rows[step][rec.active(step)], rec.coeff_tensor(step)
        for agg_, out in ((replay, expected), (never_reset, stale)):
            sel = agg_.select_tasks(2)
            out.append(agg_.aggregate_subset(rows[sel], c, sel))
    _assert_distinguishable(expected, [(s, stale[s]) for s in range(2, 6)])
    _assert_updates(rec, expected)


# --------------------------------------------------------------------- skipped steps


class StressFaultAt(mtl.MultitaskLightningModule):
    """NaN stress labels on the optimizer steps in ``fault_steps``."""

    fault_steps: frozenset[int] = frozenset()

    def process_target(self, batch, batch_idx, dataloader_idx=0):
        target = super().process_target(batch, batch_idx, dataloader_idx)
        if self.training and self.trainer.global_step in self.fault_steps:
            target["stress"] = torch.full_like(target["stress"], float("nan"))
        return target


class OddStepFaults(StressFaultAt):
    fault_steps = frozenset({1, 3, 5})


class StepTwoFault(StressFaultAt):
    fault_steps = frozenset({2})


class ParamsAfterStep(Callback):
    def __init__(self):
        self.after, self.grads_none = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads_none.append(all(p.grad is None for p in pl_module.parameters()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append(params(pl_module))


def test_an_applied_step_resets_the_consecutive_skip_count(tmp_path):
    """skip, apply, skip, apply, skip with ``max_consecutive_skips: 2``: never two skips
    in a row, so the run completes."""
    torch.manual_seed(0)
    module = OddStepFaults(max_consecutive_skips=2, **module_kwargs())
    rec = ParamsAfterStep()
    with pytest.warns(RuntimeWarning, match="'stress_mse' has a NaN gradient"):
        trainer(tmp_path, max_epochs=3, callbacks=[rec]).fit(module, datamodule=datamodule())
    assert module.skipped_steps == 3
    assert rec.grads_none == [False, True] * 3
    assert len(rec.after) == 6


def test_a_skipped_step_leaves_grad_none_and_adam_untouched(tmp_path):
    """Adam with weight decay and two steps of moment history: a skipped step must hand
    it ``.grad = None`` (zeros would still move every parameter through the moments and
    the decay), so the parameters are bit-identical across it."""
    torch.manual_seed(0)
    adam = {"_target_": "torch.optim.Adam", "lr": 0.01, "weight_decay": 0.1}
    module = StepTwoFault(**module_kwargs(optimizer=adam))
    rec = ParamsAfterStep()
    with pytest.warns(RuntimeWarning, match="'stress_mse' has a NaN gradient"):
        trainer(tmp_path, max_epochs=2, callbacks=[rec]).fit(module, datamodule=datamodule())
    assert module.skipped_steps == 1
    assert rec.grads_none == [False, False, True, False]
    assert torch.equal(rec.after[2], rec.after[1])
    assert not torch.equal(rec.after[3], rec.after[2])
    assert not torch.equal(rec.after[1], rec.after[0])


# --------------------------------------------------------------------- mixed precision


def _delta(tmp_path, plugin, agg):
    torch.manual_seed(0)
    module = mtl.MultitaskLightningModule(
        aggregator=agg,
        **module_kwargs(dtype="float32", optimizer={"_target_": "torch.optim.SGD", "lr": 0.05}),
    )
    start = params(module)
    trainer(tmp_path, max_epochs=2, plugins=[plugin] if plugin else None).fit(
        module, datamodule=datamodule()
    )
    return module, params(module) - start


@pytest.mark.parametrize("tasks_per_step", [1, 3])
def test_16_mixed_momentum_config_without_second_moment_sees_unscaled_gradients(
    tmp_path, tasks_per_step
):
    """Without the second moment MomentumConFIG is homogeneous of degree 1: momenta built
    from scaled gradients would change the update by the loss scale (65536). The 16-mixed
    run with a GradScaler must match the float32 run."""
    agg = {
        "_target_": "nequip_mtl.aggregators.MomentumConFIG",
        "second_moment": False,
        "tasks_per_step": tasks_per_step,
    }
    _, delta32 = _delta(tmp_path / "32", None, agg)
    scaler = torch.amp.GradScaler("cpu")
    plugin = MixedPrecision(precision="16-mixed", device="cpu", scaler=scaler)
    module, delta16 = _delta(tmp_path / "16", plugin, agg)
    assert scaler.get_scale() == 65536.0  # no overflow: the scale was never lowered
    assert module.skipped_steps == 0
    assert delta32.norm() > 1e-4
    assert float((delta16 - delta32).norm() / delta32.norm()) < 2e-2
