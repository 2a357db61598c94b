"""benchmarks/held_form.py (issue 12): between refreshes the applied update is
``sum_i w_i(ref) * sqrt(L_i(ref) / L_i(t)) * g_i``; refresh steps are the raw-weights
module's. Every expected value is computed directly from per-task autograd gradients and
losses of the step's batch, and the aggregator's weights of the refresh step's Gram."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Callback

import nequip_mtl.train as mtl
from benchmarks import held_form as H
from benchmarks import methods as C
from nequip_mtl.aggregators import ConFIG, UPGrad
from tests._harness import datamodule, module_kwargs, trainer

NAMES = ["per_atom_energy_mse", "forces_mse", "stress_mse"]
EMA = 0.9


class DirectRecorder(Callback):
    """Per optimizer step: the applied update (``.grad``), the refresh flag, and the update
    expected from direct per-task gradients and losses of the step's batch."""

    def __init__(self, aggregator, loss_ema=None):
        self.aggregator, self.loss_ema = aggregator, loss_ema
        self.updates, self.expected, self.refresh, self.passes = [], [], [], []
        self._ref = None  # (weights, losses) of the last refresh
        self._avg = None

    def on_train_start(self, trainer, pl_module):
        self._loss = copy.deepcopy(pl_module.loss)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._batch = (copy.deepcopy(batch), batch_idx)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        window = pl_module.engine.window
        refresh = window.weights is None
        self.refresh.append(refresh)
        self.passes.append(window.backward_passes)
        params = [p for p in pl_module.model.parameters() if p.requires_grad]
        self.updates.append(torch.cat([p.grad.flatten() for p in params]))
        batch, idx = self._batch
        target = pl_module.process_target(copy.deepcopy(batch), idx)
        losses = self._loss(pl_module(copy.deepcopy(batch)), target)
        rows, values = [], []
        for name in NAMES:
            g = torch.autograd.grad(losses[name], params, retain_graph=True)
            rows.append(torch.cat([x.flatten() for x in g]))
            values.append(float(losses[name].detach()))
        rows, values = torch.stack(rows), torch.tensor(values, dtype=torch.float64)
        if self.loss_ema is not None:
            b = self.loss_ema
            self._avg = values if self._avg is None else b * self._avg + (1 - b) * values
            values = self._avg
        if refresh:
            coeffs = torch.tensor([pl_module.loss.entries[n].coeff for n in NAMES]).double()
            w = self.aggregator.weights(rows @ rows.T, coeffs)
            self._ref = (w, values)
        else:
            w_ref, l_ref = self._ref
            w = w_ref * (l_ref / values).sqrt()
        self.expected.append(w @ rows)


def _fit(tmp_path, cls, aggregator, k=3, epochs=4, loss_ema=None, **kw):
    torch.manual_seed(0)
    agg = {"_target_": f"nequip_mtl.aggregators.{aggregator.__name__}"}
    if loss_ema is not None:
        kw["loss_ema"] = loss_ema
    module = cls(weights_every=k, aggregator=agg, **module_kwargs(), **kw)
    rec = DirectRecorder(aggregator(), loss_ema)
    trainer(tmp_path, max_epochs=epochs, callbacks=[rec]).fit(module, datamodule=datamodule())
    return module, rec


@pytest.mark.parametrize(
    "aggregator, loss_ema",
    [(UPGrad, None), (ConFIG, None), (UPGrad, EMA)],
    ids=["upgrad-batch", "config-batch", "upgrad-ema"],
)
def test_held_steps_apply_loss_scaled_weights(tmp_path, aggregator, loss_ema):
    module, rec = _fit(
        tmp_path / "ls", H.LossScaledHeldWeightsModule, aggregator, loss_ema=loss_ema
    )
    assert rec.refresh == [True, False, False, True, False, False, True, False]
    assert rec.passes == [3, 1, 1, 3, 1, 1, 3, 1]  # one backward pass between refreshes
    for step, (got, want) in enumerate(zip(rec.updates, rec.expected)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=f"step {step}")
    assert module.skipped_steps == 0
    # the scaling really changes the held steps: raw weights would give another update
    held_raw = module.engine.held.weights
    assert any(not math.isclose(module.scaled_weights[n], held_raw[n], rel_tol=1e-6) for n in NAMES)
    assert module.applied_task_weights == module.scaled_weights

    # refresh steps are the raw-weights module's: the same first step, then each refresh
    # is the aggregator's update of the step's own task gradients (checked above)
    raw, raw_rec = _fit(tmp_path / "raw", mtl.MultitaskLightningModule, aggregator)
    assert raw_rec.refresh == rec.refresh and raw_rec.passes == rec.passes
    assert torch.equal(rec.updates[0], raw_rec.updates[0])
    assert not torch.allclose(rec.updates[1], raw_rec.updates[1], rtol=1e-6, atol=0)


def test_refuses_accumulation_and_ddp(tmp_path):
    module = H.LossScaledHeldWeightsModule(weights_every=2, **module_kwargs())
    tr = trainer(tmp_path, accumulate_grad_batches=2)
    with pytest.raises(ValueError, match="needs accumulate_grad_batches=1, got 2"):
        tr.fit(module, datamodule=datamodule())
    with pytest.raises(ValueError, match=r"does not support DDP \(world_size=2\)"):
        H.check_supported(SimpleNamespace(accumulate_grad_batches=1, world_size=2))
    with pytest.raises(ValueError, match="`loss_ema` must be null or in"):
        H.LossScaledHeldWeightsModule(loss_ema=1.0, **module_kwargs())


def test_benchmark_methods_are_the_k8_methods_with_the_held_form_module():
    table = C.methods()
    for name in ("upgrad", "config"):
        base = table[f"{name}_k8"]
        ls, lsm = table[f"{name}_k8_ls"], table[f"{name}_k8_lsm"]
        assert ls.module == lsm.module == "benchmarks.held_form.LossScaledHeldWeightsModule"
        assert ls.kwargs == base.kwargs and ls.kwargs["weights_every"] == 8
        assert lsm.kwargs == {**base.kwargs, "loss_ema": 0.9}
        assert not C.missing_methods([f"{name}_k8_ls", f"{name}_k8_lsm"], table)
