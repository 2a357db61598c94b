"""Uncertainty weighting and FAMO training modules in real NequIP runs."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from nequip_mtl.train import FAMOLightningModule, UncertaintyWeightingLightningModule
from tests._harness import LOSS_NAMES, last_ckpt, nequip_fit
from tests._harness import mtl_loss_config as loss_config


class StateRecorder(Callback):
    """Records a module attribute (as a list) after every training step."""

    def __init__(self, get):
        self.get = get
        self.records: list[tuple[int, list[float]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.records.append((trainer.global_step, self.get(pl_module)))


def _log_vars(m):
    return m.log_variances.detach().tolist()


def _logits(m):
    return m.famo.logits.tolist() + list(m.applied_task_weights.values())


# ------------------------------------------------------------------ uncertainty weighting


def test_uncertainty_init_from_coefficients_and_zero_coefficient_error():
    from tests._harness import adam_module_kwargs as module_kwargs

    m = UncertaintyWeightingLightningModule(
        **module_kwargs(loss=loss_config({"total_energy": 1.0, "forces": 1.0, "stress": 2.0}))
    )
    expected = [-math.log(3 * 0.25), -math.log(3 * 0.25), -math.log(3 * 0.5)]
    assert m.log_variances.detach().tolist() == pytest.approx(expected)
    with pytest.raises(ValueError, match="'stress_mse' has coefficient 0.0"):
        UncertaintyWeightingLightningModule(
            **module_kwargs(loss=loss_config({"total_energy": 1.0, "forces": 1.0, "stress": 0.0}))
        )
    with pytest.raises(
        ValueError, match="initial_log_variances.*unknown loss component 'force_mse'"
    ):
        UncertaintyWeightingLightningModule(
            initial_log_variances={"force_mse": 0.0}, **module_kwargs()
        )


def test_uncertainty_first_step_is_the_kendall_gradient(tmp_path):
    # one plain SGD step: s1 = s0 - lr * (-0.5 exp(-s0) L0 + 0.5)
    lr = 0.1
    module, _ = nequip_fit(
        tmp_path,
        module_cls=UncertaintyWeightingLightningModule,
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=0,
        module_kw={"optimizer": {"_target_": "torch.optim.SGD", "lr": lr}},
    )
    losses = torch.tensor(
        [module.loss.metrics_values_step[n] for n in LOSS_NAMES], dtype=torch.float64
    )
    s1 = module.log_variances.detach()
    torch.testing.assert_close(s1, -lr * (-0.5 * losses + 0.5), rtol=1e-10, atol=1e-12)
    # the weights applied in that step: 0.5 exp(-s0) with s0 = 0 (equal coefficients)
    assert module.applied_task_weights == pytest.approx(dict.fromkeys(LOSS_NAMES, 0.5))


def test_uncertainty_log_variances_use_the_configured_optimizer_and_scheduler(tmp_path):
    module, trainer = nequip_fit(
        tmp_path,
        module_cls=UncertaintyWeightingLightningModule,
        max_epochs=2,
        checkpoint=True,
        module_kw={
            "log_variance_lr": 0.05,
            "optimizer": {"_target_": "torch.optim.Adam", "lr": 0.01, "weight_decay": 1e-4},
            "lr_scheduler": {
                "scheduler": {
                    "_target_": "torch.optim.lr_scheduler.StepLR",
                    "step_size": 1,
                    "gamma": 0.5,
                },
                "interval": "epoch",
            },
        },
    )
    groups = trainer.optimizers[0].param_groups
    assert groups[-1]["params"] == [module.log_variances]
    assert groups[-1]["weight_decay"] == 0.0 and groups[0]["weight_decay"] == 1e-4
    assert groups[-1]["lr"] == pytest.approx(0.05 * 0.25)  # scheduled like every group
    assert groups[0]["lr"] == pytest.approx(0.01 * 0.25)
    assert not torch.allclose(module.log_variances.detach(), torch.zeros(3, dtype=torch.float64))
    ckpt = torch.load(last_ckpt(tmp_path), weights_only=False)
    torch.testing.assert_close(ckpt["state_dict"]["log_variances"], module.log_variances.detach())


def test_uncertainty_resume_is_exact(tmp_path):
    full = StateRecorder(_log_vars)
    nequip_fit(
        tmp_path / "full", [full], module_cls=UncertaintyWeightingLightningModule, max_epochs=4
    )
    first = StateRecorder(_log_vars)
    nequip_fit(
        tmp_path / "cut",
        [first],
        module_cls=UncertaintyWeightingLightningModule,
        max_epochs=2,
        checkpoint=True,
    )
    second = StateRecorder(_log_vars)
    nequip_fit(
        tmp_path / "cut",
        [second],
        module_cls=UncertaintyWeightingLightningModule,
        max_epochs=4,
        ckpt_path=last_ckpt(tmp_path / "cut"),
    )
    assert first.records + second.records == full.records


# ------------------------------------------------------------------ FAMO


def test_famo_run_updates_logits_without_extra_passes(tmp_path):
    calls = {"n": 0}

    class CountForward(Callback):
        def on_fit_start(self, trainer, pl_module):
            graph_model = next(iter(pl_module.model.values()))
            graph_model.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))

    module, trainer = nequip_fit(
        tmp_path, [CountForward()], module_cls=FAMOLightningModule, max_epochs=3
    )
    # 2 training + 1 validation batch per epoch: one forward each, nothing extra
    assert calls["n"] == 3 * (2 + 1)
    assert trainer.global_step == 6
    assert not torch.allclose(module.famo.logits, torch.zeros(3, dtype=torch.float64))
    assert (module.famo.steps == 5).all()  # one logit update per step after the first
    assert sum(module.applied_task_weights.values()) == pytest.approx(1.0)


def test_famo_validation_and_coefficient_init():
    from tests._harness import adam_module_kwargs as module_kwargs

    m = FAMOLightningModule(
        **module_kwargs(loss=loss_config({"total_energy": 1.0, "forces": 4.0, "stress": None}))
    )
    assert m.famo.logits.tolist() == pytest.approx([-math.log(2), math.log(2), 0.0])
    with pytest.raises(ValueError, match="min_losses.*unknown loss component 'force_mse'"):
        FAMOLightningModule(min_losses={"force_mse": 0.1}, **module_kwargs())
    with pytest.raises(ValueError, match="logit_lr must be a finite number > 0"):
        FAMOLightningModule(logit_lr=0.0, **module_kwargs())


def test_famo_resume_is_exact(tmp_path):
    full = StateRecorder(_logits)
    nequip_fit(tmp_path / "full", [full], module_cls=FAMOLightningModule, max_epochs=4)
    first = StateRecorder(_logits)
    nequip_fit(
        tmp_path / "cut", [first], module_cls=FAMOLightningModule, max_epochs=2, checkpoint=True
    )
    second = StateRecorder(_logits)
    nequip_fit(
        tmp_path / "cut",
        [second],
        module_cls=FAMOLightningModule,
        max_epochs=4,
        ckpt_path=last_ckpt(tmp_path / "cut"),
    )
    assert first.records + second.records == full.records
