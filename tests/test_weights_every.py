"""Periodic aggregation weights (``weights_every: k``): per-task gradients and new weights
on every k-th optimizer step, one backward pass of ``sum_i w_i L_i`` in between."""

import copy

import pytest
import torch
from lightning.pytorch.callbacks import Callback

import nequip_mtl.train as mtl
from nequip_mtl.aggregators import ConFIG, UPGrad
from nequip_mtl.train.callbacks import GradientConflictMonitor, LossCoefficientScheduler
from tests._harness import datamodule, module_kwargs, params, trainer

NAMES = ["per_atom_energy_mse", "forces_mse", "stress_mse"]


class StepRecorder(Callback):
    """Per optimizer step: backward passes of the window, the applied update (``.grad``),
    the held weights, and the update computed directly from per-task autograd gradients of
    the step's batch at the step's parameters."""

    def __init__(self, aggregator):
        self.aggregator = aggregator
        self.passes, self.updates, self.expected, self.refresh = [], [], [], []
        self.rows = []  # the direct per-task gradient matrix of every step
        self._batches = []

    def on_train_start(self, trainer, pl_module):
        self._loss = copy.deepcopy(pl_module.loss)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx % trainer.accumulate_grad_batches == 0:
            self._batches = []
        self._batches.append((copy.deepcopy(batch), batch_idx))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        window = pl_module.engine.window
        self.passes.append(window.backward_passes)
        self.refresh.append(window.weights is None)
        params = [p for p in pl_module.model.parameters() if p.requires_grad]
        self.updates.append(torch.cat([p.grad.flatten() for p in params]))
        # direct per-task gradients of the window (mean over its micro-batches)
        rows = torch.zeros(len(NAMES), sum(p.numel() for p in params), dtype=torch.float64)
        for batch, idx in self._batches:
            target = pl_module.process_target(copy.deepcopy(batch), idx)
            out = pl_module(copy.deepcopy(batch))
            losses = self._loss(out, target)
            for i, name in enumerate(NAMES):
                g = torch.autograd.grad(losses[name], params, retain_graph=True)
                rows[i] += torch.cat([x.flatten() for x in g]) / len(self._batches)
        self.rows.append(rows)
        if window.weights is None:
            coeffs = torch.tensor([pl_module.loss.entries[n].coeff for n in NAMES]).double()
            w = self.aggregator.weights(rows @ rows.T, coeffs)
        else:
            held = pl_module.engine.held.weights
            w = torch.tensor([held[n] for n in NAMES], dtype=torch.float64)
        self.expected.append(w @ rows)


def _fit(tmp_path, k, epochs=4, aggregator=ConFIG, callbacks=(), accumulate=1, **kw):
    torch.manual_seed(0)
    agg = {"_target_": f"nequip_mtl.aggregators.{aggregator.__name__}"}
    module = mtl.MultitaskLightningModule(weights_every=k, aggregator=agg, **module_kwargs(**kw))
    rec = StepRecorder(aggregator())
    tr = trainer(
        tmp_path,
        max_epochs=epochs,
        callbacks=[rec, *callbacks],
        accumulate_grad_batches=accumulate,
    )
    tr.fit(module, datamodule=datamodule(batch_size=4 // accumulate))
    return module, rec


@pytest.mark.parametrize("aggregator", [ConFIG, UPGrad])
def test_refresh_and_held_steps_apply_the_documented_update(tmp_path, aggregator):
    module, rec = _fit(tmp_path, k=3, aggregator=aggregator)
    assert rec.refresh == [True, False, False, True, False, False, True, False]
    assert rec.passes == [3, 1, 1, 3, 1, 1, 3, 1]
    for step, (got, want) in enumerate(zip(rec.updates, rec.expected)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=f"step {step}")
    # the held steps really used the old weights: fresh ones would give another update
    assert module.skipped_steps == 0


def test_weights_every_1_refreshes_every_step_and_equals_the_default(tmp_path):
    default, rec1 = _fit(tmp_path / "a", k=1)
    assert rec1.passes == [3] * 8 and all(rec1.refresh)
    torch.manual_seed(0)
    plain = mtl.ConFIGLightningModule(**module_kwargs())
    trainer(tmp_path / "b", max_epochs=4).fit(plain, datamodule=datamodule())
    assert torch.equal(params(default), params(plain))


def test_first_step_equals_the_every_step_run_then_diverges(tmp_path):
    every, rec1 = _fit(tmp_path / "a", k=1, epochs=1)
    held, rec4 = _fit(tmp_path / "b", k=4, epochs=1)
    assert torch.equal(rec1.updates[0], rec4.updates[0])  # a refresh is today's update
    assert not torch.equal(rec1.updates[1], rec4.updates[1])  # held weights differ


def test_refreshes_per_accumulation_window(tmp_path):
    module, rec = _fit(tmp_path, k=2, epochs=2, accumulate=2)
    assert rec.refresh == [True, False, True, False]
    assert rec.passes == [6, 2, 6, 2]  # 3 tasks x 2 micro-batches, then 1 x 2
    for got, want in zip(rec.updates, rec.expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_a_coefficient_change_forces_a_refresh(tmp_path):
    sched = LossCoefficientScheduler({2: {"forces_mse": 3.0}}, interval="batch")
    module, rec = _fit(tmp_path, k=4, callbacks=[sched])
    assert rec.refresh == [True, False, True, False, False, False, True, False]
    for got, want in zip(rec.updates, rec.expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_a_change_of_the_active_set_forces_a_refresh(tmp_path):
    sched = LossCoefficientScheduler({1: {"stress_mse": None}}, interval="batch")
    torch.manual_seed(0)
    module = mtl.MultitaskLightningModule(weights_every=4, **module_kwargs())
    rec = StepRecorder(ConFIG())

    class Passes(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            rec.passes.append(pl_module.engine.window.backward_passes)

    trainer(tmp_path, max_epochs=2, callbacks=[sched, Passes()]).fit(
        module, datamodule=datamodule()
    )
    assert rec.passes == [3, 2, 1, 1]
    assert set(module.engine.held.weights) == {"per_atom_energy_mse", "forces_mse"}


def test_conflict_monitor_sees_refresh_steps_only(tmp_path):
    """Between refreshes there are no per-task gradients: the monitor measures refresh
    steps only, at no extra cost (no extra backward passes)."""
    monitor, measured = GradientConflictMonitor(interval="batch", frequency=1), []

    class AfterMonitor(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            measured.append(monitor.last_step)

    module, rec = _fit(tmp_path, k=3, callbacks=[monitor, AfterMonitor()])
    assert rec.passes == [3, 1, 1, 3, 1, 1, 3, 1]
    assert sorted(set(measured)) == [s for s, r in enumerate(rec.refresh) if r] == [0, 3, 6]


def test_weights_every_needs_a_gram_aggregator():
    with pytest.raises(ValueError, match="`weights_every`=4 needs an aggregator whose update"):
        mtl.MultitaskLightningModule(
            weights_every=4,
            aggregator={"_target_": "nequip_mtl.aggregators.MomentumConFIG"},
            **module_kwargs(),
        )


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "8"])
def test_bad_weights_every(value):
    with pytest.raises(ValueError, match="`weights_every` must be an integer >= 1"):
        mtl.ConFIGLightningModule(weights_every=value, **module_kwargs())
