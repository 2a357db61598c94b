"""Our gradient-aggregation modules under every Lightning feature, in real Trainer runs."""

import math

import lightning
import nequip.train
import nequip.train.callbacks
import pytest
import torch

import nequip_mtl.train as mtl
from tests._harness import datamodule, fit, params


class RecordingSGD(torch.optim.SGD):
    """A real SGD that records, at every step, the learning rate and the gradient it applies."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.lrs, self.grad_norms, self.grad_max = [], [], []

    def step(self, closure=None):
        loss = super().step(closure)
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.lrs.append(self.param_groups[0]["lr"])
        flat = torch.cat([g.flatten() for g in grads]) if grads else torch.zeros(0)
        self.grad_norms.append(float(flat.norm()) if grads else 0.0)
        self.grad_max.append(float(flat.abs().max()) if grads else 0.0)
        return loss


RECORDING_SGD = {"_target_": "tests.test_module_lightning_features.RecordingSGD", "lr": 0.01}


class PreClipRecorder(lightning.Callback):
    """Records the aggregated gradient norm Lightning sees before clipping."""

    def __init__(self):
        self.norms = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad.flatten() for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.cat(grads).norm()))


def _optimizer(module):
    return module.trainer.optimizers[0]


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_trainer_gradient_clipping(algorithm, tmp_path):
    rec = PreClipRecorder()
    clip = 1e-3
    module, _ = fit(
        mtl.ConFIGLightningModule,
        tmp_path,
        optimizer=RECORDING_SGD,
        trainer_kwargs=dict(
            gradient_clip_val=clip, gradient_clip_algorithm=algorithm, callbacks=[rec]
        ),
    )
    opt = _optimizer(module)
    assert len(opt.grad_norms) == 2
    # clipping was active (the aggregated update was larger than the clip value) ...
    assert min(rec.norms) > clip
    # ... and the applied gradient obeys it
    if algorithm == "norm":
        # torch's clip_grad_norm_ scales by clip / (norm + 1e-6)
        expected = [clip * n / (n + 1e-6) for n in rec.norms]
        assert opt.grad_norms == pytest.approx(expected, rel=1e-9)
    else:
        for m in opt.grad_max:
            assert m <= clip * (1 + 1e-12)


def test_module_level_clipping_like_nequip_and_double_config_error(tmp_path):
    module, _ = fit(
        mtl.ConFIGLightningModule,
        tmp_path / "a",
        optimizer=RECORDING_SGD,
        gradient_clip_val=1e-3,
        gradient_clip_algorithm="norm",
    )
    norms = _optimizer(module).grad_norms
    assert len(norms) == 2 and all(1e-3 * 0.99 < n <= 1e-3 for n in norms)
    with pytest.raises(ValueError, match="gradient clipping is configured twice"):
        fit(
            mtl.ConFIGLightningModule,
            tmp_path / "b",
            gradient_clip_val=1e-3,
            trainer_kwargs=dict(gradient_clip_val=1e-3),
        )


def _reference_lrs(scheduler_factory, steps_per_epoch, epochs, interval):
    """LRs a plain torch loop would apply at each optimizer step."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.01)
    sched = scheduler_factory(opt)
    lrs = []
    for _ in range(epochs):
        for _ in range(steps_per_epoch):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            if interval == "step":
                sched.step()
        if interval == "epoch":
            sched.step()
    return lrs


SCHEDULERS = {
    "cosine_epoch": (
        {
            "scheduler": {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "T_max": 3},
            "interval": "epoch",
        },
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=3),
        "epoch",
    ),
    "warmup_sequential_step": (
        {
            "scheduler": {
                "_target_": "torch.optim.lr_scheduler.SequentialLR",
                "schedulers": [
                    {
                        "_target_": "torch.optim.lr_scheduler.LinearLR",
                        "start_factor": 0.1,
                        "total_iters": 3,
                    },
                    {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "T_max": 4},
                ],
                "milestones": [3],
            },
            "interval": "step",
        },
        lambda o: torch.optim.lr_scheduler.SequentialLR(
            o,
            [
                torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=3),
                torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4),
            ],
            milestones=[3],
        ),
        "step",
    ),
    "steplr_step": (
        {
            "scheduler": {
                "_target_": "torch.optim.lr_scheduler.StepLR",
                "step_size": 2,
                "gamma": 0.5,
            },
            "interval": "step",
        },
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
        "step",
    ),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_lr_follows_schedule(name, tmp_path):
    config, factory, interval = SCHEDULERS[name]
    module, _ = fit(
        mtl.ConFIGLightningModule,
        tmp_path,
        max_epochs=3,
        optimizer=RECORDING_SGD,
        lr_scheduler=config,
    )
    expected = _reference_lrs(factory, steps_per_epoch=2, epochs=3, interval=interval)
    assert len(set(expected)) > 1  # the schedule does change the LR
    assert _optimizer(module).lrs == pytest.approx(expected, rel=1e-12)


def test_reduce_lr_on_plateau_on_val_metric_with_frequency(tmp_path):
    """ReduceLROnPlateau on a validation metric, stepped every 2 epochs."""
    config = {
        "scheduler": {
            "_target_": "torch.optim.lr_scheduler.ReduceLROnPlateau",
            "factor": 0.5,
            "patience": 0,
            # "better" needs value < best * (1 - 10) < 0: every scheduler step is a plateau
            "threshold": 10.0,
        },
        "monitor": "val0_epoch/weighted_sum",
        "interval": "epoch",
        "frequency": 2,
    }
    module, _ = fit(
        mtl.ConFIGLightningModule,
        tmp_path,
        max_epochs=5,
        optimizer=RECORDING_SGD,
        lr_scheduler=config,
    )
    lrs = _optimizer(module).lrs
    per_epoch = [lrs[2 * e] for e in range(5)]
    # with frequency 2 the scheduler steps after epochs 2 and 4 (1-based), halving each time
    assert per_epoch == pytest.approx([0.01, 0.01, 0.005, 0.005, 0.0025])


def test_gradient_accumulation_equals_big_batch(tmp_path):
    """accumulate_grad_batches=2 of batch 4 == one batch of 8 (all frames have 8 atoms)."""
    acc, _ = fit(
        mtl.ConFIGLightningModule,
        tmp_path / "acc",
        max_epochs=2,
        optimizer=RECORDING_SGD,
        data=datamodule(batch_size=4),
        trainer_kwargs=dict(accumulate_grad_batches=2),
    )
    big, _ = fit(
        mtl.ConFIGLightningModule,
        tmp_path / "big",
        max_epochs=2,
        optimizer=RECORDING_SGD,
        data=datamodule(batch_size=8),
    )
    assert len(_optimizer(acc).lrs) == 2  # one optimizer step per 2 batches
    torch.testing.assert_close(params(acc), params(big), rtol=0, atol=1e-12)


def test_float32_model_matches_nequip(tmp_path):
    ours, _ = fit(mtl.ConFIGLightningModule, tmp_path / "a", max_epochs=2, dtype="float32")
    theirs, _ = fit(
        nequip.train.ConFIGLightningModule, tmp_path / "b", max_epochs=2, dtype="float32"
    )
    assert next(ours.model.parameters()).dtype == torch.float32
    torch.testing.assert_close(params(ours), params(theirs), rtol=0, atol=1e-5)


def test_frozen_parameters_get_no_gradient_and_no_weight_decay(tmp_path):
    torch.manual_seed(0)
    from tests._harness import module_kwargs, trainer

    module = mtl.ConFIGLightningModule(
        **module_kwargs(
            optimizer={"_target_": "torch.optim.AdamW", "lr": 0.01, "weight_decay": 0.5}
        )
    )
    frozen = next(module.model.parameters())
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    others_before = params(module)
    trainer(tmp_path, max_epochs=1).fit(module, datamodule=datamodule())
    assert frozen.grad is None
    torch.testing.assert_close(frozen.detach(), before, rtol=0, atol=0)
    assert (params(module) - others_before).abs().max() > 1e-4  # the rest trained


def _two_entry_loss(names):
    """A nequip MetricsManager with only the named EnergyForceStressLoss entries."""
    fields = {
        "per_atom_energy_mse": {"_target_": "nequip.data.PerAtomModifier", "field": "total_energy"},
        "forces_mse": "forces",
        "stress_mse": "stress",
    }
    return {
        "_target_": "nequip.train.MetricsManager",
        "metrics": [
            {
                "name": n,
                "field": fields[n],
                "coeff": 1.0,
                "metric": {"_target_": "nequip.train.MeanSquaredError"},
            }
            for n in names
        ],
    }


@pytest.mark.parametrize("null", ["total_energy", "forces", "stress"])
def test_null_coefficient_in_any_position(null, tmp_path):
    """A null coefficient anywhere == nequip's ConFIG on a loss without that entry.

    (nequip's own module crashes when the null entry comes first: it frees the graph early.)
    """
    coeffs = {"total_energy": 1.0, "forces": 1.0, "stress": 1.0}
    coeffs[null] = None
    ours, _ = fit(
        mtl.ConFIGLightningModule,
        tmp_path / "a",
        loss={"_target_": "nequip.train.EnergyForceStressLoss", "coeffs": coeffs},
    )
    names = {"total_energy": "per_atom_energy_mse", "forces": "forces_mse", "stress": "stress_mse"}
    active = [names[k] for k in coeffs if coeffs[k] is not None]
    theirs, _ = fit(
        nequip.train.ConFIGLightningModule, tmp_path / "b", loss=_two_entry_loss(active)
    )
    torch.testing.assert_close(params(ours), params(theirs), rtol=0, atol=1e-10)


def test_coefficients_changed_by_callback_during_training(tmp_path):
    """nequip's scheduler drops `stress_mse` at epoch 1 and brings it back at epoch 2."""
    schedule = {
        1: {"per_atom_energy_mse": 1.0, "forces_mse": 1.0},  # nequip: unlisted -> null
        2: {"per_atom_energy_mse": 1.0, "forces_mse": 2.0, "stress_mse": 1.0},
    }
    results = []
    for cls, sub in [(mtl.ConFIGLightningModule, "a"), (nequip.train.ConFIGLightningModule, "b")]:
        cb = nequip.train.callbacks.LossCoefficientScheduler(schedule=schedule)
        module, _ = fit(cls, tmp_path / sub, max_epochs=3, trainer_kwargs=dict(callbacks=[cb]))
        results.append(module)
    ours, theirs = results
    assert ours.loss.entries["stress_mse"].coeff == pytest.approx(0.25)
    torch.testing.assert_close(params(ours), params(theirs), rtol=0, atol=1e-10)


def test_single_active_component_is_a_plain_backward(tmp_path):
    loss = {
        "_target_": "nequip.train.EnergyForceStressLoss",
        "coeffs": {"total_energy": None, "forces": 1.0, "stress": None},
    }
    ours, _ = fit(mtl.ConFIGLightningModule, tmp_path / "a", max_epochs=2, loss=loss)
    plain, _ = fit(nequip.train.NequIPLightningModule, tmp_path / "b", max_epochs=2, loss=loss)
    torch.testing.assert_close(params(ours), params(plain), rtol=0, atol=1e-12)
    assert ours.applied_task_weights == {"forces_mse": 1.0}


class LoggedMetrics(lightning.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append(
            {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("mtl/")}
        )


def test_logs_task_gradient_statistics(tmp_path):
    rec = LoggedMetrics()
    module, _ = fit(mtl.ConFIGLightningModule, tmp_path, trainer_kwargs=dict(callbacks=[rec]))
    names = ["per_atom_energy_mse", "forces_mse", "stress_mse"]
    for row in rec.rows:
        cos = [row[f"mtl/cos_update/{n}"] for n in names]
        # ConFIG with equal coefficients: the update makes the same positive angle with each task
        assert min(cos) > 0
        assert max(cos) - min(cos) < 1e-8
        assert all(row[f"mtl/grad_norm/{n}"] > 0 for n in names)
        assert row["mtl/skipped_steps"] == 0
    assert set(module.applied_task_weights) == set(names)
    assert not math.isnan(sum(module.applied_task_weights.values()))
