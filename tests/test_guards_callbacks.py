"""Behaviours of the coefficient callbacks and FAMO that earlier tests let
through: calibration length with gradient accumulation, calibrated coefficients
re-applied after ``load_state_dict``, and FAMO's logit rule replayed from the logged
losses through :class:`~nequip_mtl.weighting.famo.FAMOLogits`."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from nequip.train import NequIPLightningModule

from nequip_mtl.train import FAMOLightningModule
from nequip_mtl.train.callbacks import CalibrateLossCoefficients
from nequip_mtl.weighting.famo import FAMOLogits
from tests._harness import (
    CoeffRecorder,
    MemoryLogger,
    datamodule,
    loss_config,
    module_kwargs,
    trainer,
)

NAMES = ["per_atom_energy_mse", "forces_mse", "stress_mse"]
C0 = {"total_energy": 1.0, "forces": 3.0, "stress": 2.0}


def _fit(tmp_path, callbacks, *, cls=NequIPLightningModule, epochs=2, data=None, **kw):
    kw.setdefault("loss", loss_config(C0))
    torch.manual_seed(0)
    module = cls(**module_kwargs(**kw))
    logger = MemoryLogger()
    tr = trainer(tmp_path, max_epochs=epochs, callbacks=callbacks, logger=logger, **(data or {}))
    return module, tr, logger


# --------------------------------------------------------------------- calibration


@pytest.mark.parametrize("train_frames", [8, 6], ids=["4-batches", "3-batches"])
def test_calibration_epochs_count_optimizer_steps_with_accumulation(tmp_path, train_frames):
    """``epochs: 1`` with ``accumulate_grad_batches: 2`` and batch 2: 4 (or 3) micro-batches
    make 2 optimizer steps, so calibration measures 2 steps and the new coefficients are
    used from global step 2, the first step of the second epoch."""
    cal, coeffs = CalibrateLossCoefficients(rule="gradnorm", epochs=1), CoeffRecorder()
    module, tr, logger = _fit(
        tmp_path, [cal, coeffs], data={"accumulate_grad_batches": 2}, epochs=2
    )
    tr.fit(
        module, datamodule=datamodule(num_frames=train_frames + 4, train=train_frames, batch_size=2)
    )
    assert tr.global_step == 4
    assert cal.calibration.num_steps == 2
    assert logger.values("calibration/steps") == [(2, 2.0)]
    by_step = {}
    for step, c in coeffs.records:
        by_step.setdefault(step, c)
        assert by_step[step] == c  # every micro-batch of a step uses the same ones
    chosen = {n: pytest.approx(v, rel=1e-12) for n, v in cal.coefficients.items()}
    assert by_step[0] == by_step[1] != chosen
    assert by_step[2] == by_step[3] == chosen


def test_calibrated_coefficients_are_reapplied_after_load_state_dict(tmp_path):
    """A finished calibration restored with ``load_state_dict`` into a run whose module was
    built with other coefficients: from the very first step the module trains with the
    calibrated coefficients, and nothing is measured again."""
    first = CalibrateLossCoefficients(rule="gradnorm", steps=2)
    module, tr, _ = _fit(tmp_path / "a", [first], epochs=1)
    tr.fit(module, datamodule=datamodule())
    assert first.done
    calibrated = dict(first.coefficients)
    assert calibrated != {n: c for n, c in zip(NAMES, [1 / 6, 3 / 6, 2 / 6])}

    restored = CalibrateLossCoefficients(rule="gradnorm", steps=2)
    restored.load_state_dict(first.state_dict())
    coeffs = CoeffRecorder()
    module, tr, logger = _fit(tmp_path / "b", [restored, coeffs], epochs=1)
    tr.fit(module, datamodule=datamodule())
    expected = {n: pytest.approx(v, rel=1e-12) for n, v in calibrated.items()}
    assert [c for _, c in coeffs.records] == [expected] * 2
    assert logger.values("calibration/steps") == []  # no second calibration


# --------------------------------------------------------------------- FAMO


class LoggedValues(Callback):
    """Per micro-batch: the optimizer step it belongs to, and what the module logged in
    its ``training_step`` (the unweighted loss components and FAMO's logits)."""

    def __init__(self):
        self.records: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        m = trainer.callback_metrics
        losses = torch.tensor([float(m[f"train_loss_step/{n}"]) for n in NAMES]).double()
        logits = torch.tensor([float(m[f"famo/logit/{n}"]) for n in NAMES]).double()
        self.records.append((self._step, losses, logits))


def _replay(records, *, lr, weight_decay, sign=1.0, last_only=False):
    """FAMO's rule through FAMOLogits: at the first micro-batch of each optimizer step,
    one update from the previous step's mean loss to this micro-batch's loss."""
    famo = FAMOLogits(len(NAMES), lr=lr, weight_decay=weight_decay)
    steps: dict[int, list[torch.Tensor]] = {}
    for step, losses, _ in records:
        steps.setdefault(step, []).append(losses)
    out, prev = {}, None
    for step in sorted(steps):
        first = steps[step][0]
        if prev is not None:
            if sign > 0:
                famo.update(prev, first)
            else:
                famo.update(first, prev)
        out[step] = famo.logits.clone()
        window = steps[step]
        prev = window[-1] if last_only else torch.stack(window).mean(0)
    return out


def test_famo_logits_follow_a_replay_of_the_logged_losses(tmp_path):
    """Accumulation over 2 micro-batches, 6 optimizer steps: the logged logits are those of
    FAMOLogits fed with the logged losses, the previous step averaged over its window.
    A replay with the opposite sign, or with the last micro-batch instead of the mean,
    gives other logits (so the comparison can fail)."""
    rec = LoggedValues()
    lr, wd = 0.05, 1e-3
    module, tr, _ = _fit(
        tmp_path,
        [rec],
        cls=FAMOLightningModule,
        epochs=3,
        data={"accumulate_grad_batches": 2},
        loss=loss_config(),
        logit_lr=lr,
        logit_weight_decay=wd,
    )
    tr.fit(module, datamodule=datamodule(batch_size=2))
    assert tr.global_step == 6 and len(rec.records) == 12
    expected = _replay(rec.records, lr=lr, weight_decay=wd)
    for step, _, logged in rec.records:
        torch.testing.assert_close(logged, expected[step], rtol=1e-6, atol=1e-9)
    assert not torch.allclose(expected[5], torch.zeros(3, dtype=torch.float64))
    # the sign, in closed form: the first logit update is Adam's first step from xi = 0,
    # -lr * g / (|g| + eps) with g = z (delta - z . delta), z = 1/3, delta the decrease of
    # log L from step 0's mean to step 1's first micro-batch: the task that improved
    # least gains weight
    prev = torch.stack([r[1] for r in rec.records if r[0] == 0]).mean(0)
    first = next(r for r in rec.records if r[0] == 1)
    delta = prev.log() - first[1].log()
    g = (delta - delta.mean()) / 3
    torch.testing.assert_close(first[2], -lr * g / (g.abs() + 1e-8), rtol=1e-6, atol=1e-9)
    assert int(first[2].argmax()) == int(delta.argmin())
    for wrong in (
        _replay(rec.records, lr=lr, weight_decay=wd, sign=-1.0),
        _replay(rec.records, lr=lr, weight_decay=wd, last_only=True),
    ):
        gap = max(float((wrong[s] - expected[s]).abs().max()) for s in expected)
        assert gap > 1e-4
