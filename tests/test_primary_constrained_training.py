"""PrimaryConstrained in a real training run: the applied update meets its guarantee
against per-task gradients computed here with torch.autograd.grad on each step's batch."""

from __future__ import annotations

import copy

import pytest
import torch
from lightning.pytorch.callbacks import Callback

import nequip_mtl.train as mtl
from tests._harness import datamodule, module_kwargs, trainer

NAMES = ["per_atom_energy_mse", "forces_mse", "stress_mse"]
PRIMARY = 1  # the forces; energy and stress only constrain


class StepRecorder(Callback):
    """Per optimizer step: the applied update (``.grad`` before the optimizer uses it), the
    coefficients, and the direct per-task gradients of the step's batch at its parameters."""

    def __init__(self):
        self.updates, self.rows, self.coeffs = [], [], []

    def on_train_start(self, trainer, pl_module):
        self._loss = copy.deepcopy(pl_module.loss)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._batch = (copy.deepcopy(batch), batch_idx)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        params = [p for p in pl_module.model.parameters() if p.requires_grad]
        self.updates.append(torch.cat([p.grad.flatten() for p in params]).double())
        batch, idx = self._batch
        target = pl_module.process_target(copy.deepcopy(batch), idx)
        losses = self._loss(pl_module(copy.deepcopy(batch)), target)
        rows = []
        for name in NAMES:
            g = torch.autograd.grad(losses[name], params, retain_graph=True)
            rows.append(torch.cat([x.flatten() for x in g]).double())
        self.rows.append(torch.stack(rows))
        self.coeffs.append(
            torch.tensor([pl_module.loss.entries[n].coeff for n in NAMES], dtype=torch.float64)
        )


def test_applied_update_is_the_projection_of_the_primary_gradient(tmp_path):
    torch.manual_seed(0)
    module = mtl.MultitaskLightningModule(
        aggregator={"_target_": "nequip_mtl.aggregators.PrimaryConstrained", "primary": PRIMARY},
        **module_kwargs(optimizer={"_target_": "torch.optim.Adam", "lr": 0.01}),
    )
    rec = StepRecorder()
    trainer(tmp_path, max_epochs=3, callbacks=[rec]).fit(module, datamodule=datamodule())
    assert len(rec.updates) == 6 and module.skipped_steps == 0
    cons = [i for i in range(len(NAMES)) if i != PRIMARY]
    pushed = 0
    for step, (u, g, c) in enumerate(zip(rec.updates, rec.rows, rec.coeffs)):
        gp, gc = c[PRIMARY] * g[PRIMARY], g[cons]
        scale = gp.norm() * gc.norm(dim=1)
        # the guarantee: no constraint conflicts with the applied update
        assert (gc @ u >= -1e-10 * scale).all(), (step, (gc @ u / scale).tolist())
        # the minimal change (KKT): u - g_p = sum_c lambda_c g_c, lambda >= 0, and
        # lambda_c > 0 only for constraints the update is orthogonal to
        lam = torch.linalg.lstsq(gc.T, (u - gp).unsqueeze(1)).solution.squeeze(1)
        assert (gc.T @ lam - (u - gp)).norm() <= 1e-10 * gp.norm(), step
        assert (lam >= -1e-10 * gp.norm() / gc.norm(dim=1)).all(), (step, lam.tolist())
        active = lam * gc.norm(dim=1) > 1e-8 * gp.norm()
        assert ((gc @ u)[active].abs() <= 1e-10 * scale[active]).all(), step
        if not active.any():  # nothing conflicted: the primary's scaled gradient itself
            torch.testing.assert_close(u, gp, rtol=1e-10, atol=1e-14 * gp.norm())
        pushed += int(active.any())
    # the run exercised both branches: steps with and without a conflict to remove
    assert 0 < pushed < len(rec.updates), pushed


def test_primary_by_name_in_a_real_run_and_a_typo_refused_at_fit_start(tmp_path):
    """The engine names the tasks: `primary: forces_mse` equals `primary: 1` (the forces
    are the second component), and an unknown name fails before the first step."""
    from nequip_mtl.train import MultitaskLightningModule
    from tests._harness import fit, params

    by = {}
    for key, primary in (("name", "forces_mse"), ("position", 1)):
        agg = {"_target_": "nequip_mtl.aggregators.PrimaryConstrained", "primary": primary}
        module, _ = fit(MultitaskLightningModule, tmp_path / key, aggregator=agg)
        by[key] = params(module)
    assert torch.equal(by["name"], by["position"])
    agg = {"_target_": "nequip_mtl.aggregators.PrimaryConstrained", "primary": "force_mse"}
    with pytest.raises(ValueError, match="force_mse"):
        fit(MultitaskLightningModule, tmp_path / "typo", aggregator=agg, data=datamodule())
