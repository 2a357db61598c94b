"""Real Lightning runs: partial schedules, SoftAdapt with frequency 1, batch intervals,
shapes, composition, logging, exact resume, and the direction of adaptive weighting on a
two-task problem whose lagging task is known."""

from __future__ import annotations

import math

import nequip.train.callbacks as ncb
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

import nequip_mtl.train.callbacks as mcb
from nequip_mtl.train import FAMOLightningModule
from tests._harness import (
    LOSS_NAMES,
    CoeffRecorder,
    MemoryLogger,
    last_ckpt,
    nequip_fit,
    two_task_fit,
)
from tests._harness import mtl_loss_config as loss_config

NEQUIP_LOSS = loss_config(target="nequip.train.EnergyForceStressLoss")


@pytest.mark.parametrize("loss", [None, NEQUIP_LOSS], ids=["multitask_manager", "nequip_manager"])
def test_partial_schedule_keeps_unlisted_terms(tmp_path, loss):
    rec = CoeffRecorder()
    sched = mcb.LossCoefficientScheduler({1: {"forces_mse": 4.0}, 2: {"stress_mse": None}})
    nequip_fit(tmp_path, [sched, rec], max_epochs=3, module_kw={"loss": loss} if loss else None)
    by_step = rec.by_step()  # 2 steps per epoch
    third = 1 / 3
    assert by_step[0] == pytest.approx({n: third for n in LOSS_NAMES})
    assert by_step[2] == pytest.approx(
        {
            "per_atom_energy_mse": third / (2 * third + 4),
            "forces_mse": 4 / (2 * third + 4),
            "stress_mse": third / (2 * third + 4),
        }
    )
    e, f = by_step[2]["per_atom_energy_mse"], by_step[2]["forces_mse"]
    assert by_step[4] == pytest.approx(
        {"per_atom_energy_mse": e / (e + f), "forces_mse": f / (e + f), "stress_mse": None}
    )


def test_nequip_partial_schedule_drops_unlisted_terms(tmp_path):
    """The defect ours fixes: nequip's scheduler silently removes every unlisted term."""
    rec = CoeffRecorder()
    nequip_fit(
        tmp_path,
        [ncb.LossCoefficientScheduler({1: {"forces_mse": 4.0}}), rec],
        max_epochs=2,
        module_kw={"loss": NEQUIP_LOSS},
    )
    assert rec.by_step()[2] == {"per_atom_energy_mse": None, "forces_mse": 1.0, "stress_mse": None}


def test_step_scheduler_batch_interval_uses_global_steps(tmp_path):
    rec = CoeffRecorder()
    nequip_fit(
        tmp_path,
        [mcb.LossCoefficientScheduler({3: {"forces_mse": 2.0}}, interval="batch"), rec],
        max_epochs=2,
    )
    by_step = rec.by_step()
    assert by_step[2]["forces_mse"] == pytest.approx(1 / 3)
    assert by_step[3]["forces_mse"] == pytest.approx(2 / (2 + 2 / 3))


@pytest.mark.parametrize("interval", ["epoch", "batch"])
def test_softadapt_frequency_1_changes_coefficients_in_a_real_run(tmp_path, interval):
    rec = CoeffRecorder()
    nequip_fit(
        tmp_path, [mcb.SoftAdapt(beta=1.1, interval=interval, frequency=1), rec], max_epochs=4
    )
    distinct = rec.distinct()
    # batch: an update after every step from the 2nd on (8 steps; the last one is used by
    # no step); epoch: at the start of every epoch from the 3rd (4 epochs)
    expected = 6 if interval == "batch" else 2
    assert len(distinct) == 1 + expected
    for c in distinct:
        assert sum(c.values()) == pytest.approx(1.0)


def test_nequip_softadapt_frequency_1_never_changes_coefficients(tmp_path):
    rec = CoeffRecorder()
    nequip_fit(
        tmp_path,
        [ncb.SoftAdapt(beta=1.1, interval="batch", frequency=1), rec],
        max_epochs=3,
        module_kw={"loss": NEQUIP_LOSS},
    )
    assert len(rec.distinct()) == 1


def test_linear_scheduler_batch_interval_cosine_shape(tmp_path):
    rec = CoeffRecorder()
    cb = mcb.LinearLossCoefficientScheduler(
        {"forces_mse": 1.0, "per_atom_energy_mse": 0.0, "stress_mse": 0.0},
        interval="batch",
        start_step=1,
        transition_steps=4,
        shape="cosine",
    )
    nequip_fit(tmp_path, [cb, rec], max_epochs=4)
    by_step = rec.by_step()
    third = 1 / 3
    for step in range(8):
        frac = min(max((step - 1) / 4, 0.0), 1.0)
        alpha = 0.5 * (1 - math.cos(math.pi * frac))
        f = third + alpha * (1 - third)
        assert by_step[step]["forces_mse"] == pytest.approx(f, rel=1e-12), step
        assert by_step[step]["stress_mse"] == pytest.approx((1 - f) / 2, rel=1e-12, abs=1e-15)
    assert cb.finished


def test_linear_schedulers_compose_and_fade_in(tmp_path):
    rec = CoeffRecorder()
    loss = loss_config({"total_energy": 1.0, "forces": 1.0, "stress": None})
    first = mcb.LinearLossCoefficientScheduler(
        {"forces_mse": 3.0}, start_epoch=0, transition_epochs=2
    )
    # partial target; stress is inactive at the start and fades in from 0
    second = mcb.LinearLossCoefficientScheduler(
        {"stress_mse": 1.0}, start_epoch=2, transition_epochs=2
    )
    assert first.state_key != second.state_key
    nequip_fit(tmp_path, [first, second, rec], max_epochs=5, module_kw={"loss": loss})
    by_epoch = {s // 2: c for s, c in rec.records}
    assert by_epoch[0] == pytest.approx(
        {"per_atom_energy_mse": 0.5, "forces_mse": 0.5, "stress_mse": None}
    )
    # first target: forces 3.0, energy keeps 0.5 -> {1/7, 6/7}
    assert by_epoch[1]["forces_mse"] == pytest.approx(0.5 + 0.5 * (6 / 7 - 0.5))
    assert by_epoch[2] == pytest.approx(
        {"per_atom_energy_mse": 1 / 7, "forces_mse": 6 / 7, "stress_mse": None}
    )
    # second target: {1/7, 6/7, 1} / 2, stress from 0
    assert by_epoch[3] == pytest.approx(
        {"per_atom_energy_mse": 3 / 28, "forces_mse": 9 / 14, "stress_mse": 0.25}
    )
    assert by_epoch[4] == pytest.approx(
        {"per_atom_energy_mse": 1 / 14, "forces_mse": 3 / 7, "stress_mse": 0.5}
    )


def test_monitor_logs_to_every_logger_with_applied_task_weights(tmp_path):
    memory = MemoryLogger()
    csv = CSVLogger(str(tmp_path / "csv"))
    module, _ = nequip_fit(
        tmp_path,
        [mcb.LossCoefficientMonitor(interval="batch", frequency=2)],
        module_cls=FAMOLightningModule,
        max_epochs=2,
        logger=[memory, csv],
    )
    steps = [s for s, _ in memory.values("loss_coeff/forces_mse")]
    assert steps == [2, 4]
    weights = memory.values("task_weight/forces_mse")
    assert [s for s, _ in weights] == [2, 4]
    assert weights[-1][1] == pytest.approx(module.applied_task_weights["forces_mse"])
    assert sum(module.applied_task_weights.values()) == pytest.approx(1.0)
    csv.save()
    text = (tmp_path / "csv" / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    header = text.splitlines()[0]
    assert "loss_coeff/stress_mse" in header and "task_weight/stress_mse" in header


# ------------------------------------------------------------------ resume from checkpoint


RESUME_CASES = {
    "softadapt_epoch_f2": lambda: [mcb.SoftAdapt(beta=1.1, interval="epoch", frequency=2)],
    "softadapt_batch_f3_loss_weighted": lambda: [
        mcb.SoftAdapt(beta=2.0, interval="batch", frequency=3, variant="loss_weighted")
    ],
    "dwa_batch": lambda: [mcb.DynamicWeightAverage(interval="batch", frequency=2)],
    "rlw_batch": lambda: [mcb.RandomLossWeighting(seed=3)],
    "linear_pair": lambda: [
        mcb.LinearLossCoefficientScheduler(
            {"forces_mse": 3.0}, interval="batch", start_step=1, transition_steps=3
        ),
        mcb.LinearLossCoefficientScheduler(
            {"stress_mse": 2.0}, interval="batch", start_step=4, transition_steps=4, shape="cosine"
        ),
    ],
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_gives_the_uninterrupted_trajectory(tmp_path, case):
    full = CoeffRecorder()
    nequip_fit(tmp_path / "full", [*RESUME_CASES[case](), full], max_epochs=5)

    first = CoeffRecorder()
    nequip_fit(tmp_path / "cut", [*RESUME_CASES[case](), first], max_epochs=2, checkpoint=True)
    second = CoeffRecorder()
    nequip_fit(
        tmp_path / "cut",
        [*RESUME_CASES[case](), second],
        max_epochs=5,
        ckpt_path=last_ckpt(tmp_path / "cut"),
    )
    assert [s for s, _ in second.records] == list(range(4, 10))
    assert len(full.distinct()) > 1  # the coefficients really move after the cut
    assert first.records + second.records == full.records


# ------------------------------------------------------------------ direction on a known two-task problem


@pytest.mark.parametrize(
    "callback",
    [
        lambda: mcb.SoftAdapt(beta=1.0, interval="epoch", frequency=1),
        lambda: mcb.SoftAdapt(beta=1.0, interval="batch", frequency=2, scale_by="none"),
        lambda: mcb.SoftAdapt(beta=0.1, interval="epoch", frequency=1, variant="original"),
        lambda: mcb.SoftAdapt(beta=1.0, interval="epoch", frequency=1, variant="normalized"),
        lambda: mcb.SoftAdapt(beta=1.0, interval="epoch", frequency=1, variant="loss_weighted"),
        lambda: mcb.DynamicWeightAverage(temperature=0.2, interval="epoch"),
        lambda: mcb.DynamicWeightAverage(temperature=0.2, interval="batch", frequency=3),
    ],
    ids=[
        "softadapt",
        "softadapt_batch",
        "softadapt_original",
        "softadapt_normalized",
        "softadapt_loss_weighted",
        "dwa",
        "dwa_batch",
    ],
)
def test_adaptive_callbacks_move_weight_to_the_lagging_task(tmp_path, callback):
    rec = CoeffRecorder()
    two_task_fit(tmp_path, [callback(), rec], max_epochs=8)
    weights_b = [c["task_b"] for c in rec.distinct()[1:]]
    assert weights_b, "no update happened"
    assert all(w > 0.5 for w in weights_b)


@pytest.mark.parametrize("manager", ["nequip", "ours"])
def test_rlw_is_random_and_unbiased_in_a_real_run(tmp_path, manager):
    from nequip.train import MetricsManager

    rec = CoeffRecorder()
    kw = {"manager_cls": MetricsManager} if manager == "nequip" else {}
    two_task_fit(tmp_path, [mcb.RandomLossWeighting(seed=0), rec], max_epochs=200, **kw)
    a = torch.tensor([c["task_a"] for _, c in rec.records])
    assert len(set(a.tolist())) == 200  # a fresh draw every step
    assert float(a.mean()) == pytest.approx(0.5, abs=0.05)
    assert float(a.std()) > 0.1


@pytest.mark.parametrize("module", ["multitask", "uncertainty"])
def test_monitor_logs_task_weights_of_other_weighting_modules(tmp_path, module):
    from nequip_mtl.train import MultitaskLightningModule, UncertaintyWeightingLightningModule

    cls = {
        "multitask": MultitaskLightningModule,
        "uncertainty": UncertaintyWeightingLightningModule,
    }[module]
    memory = MemoryLogger()
    trained, _ = nequip_fit(
        tmp_path,
        [mcb.LossCoefficientMonitor(interval="epoch", frequency=1)],
        module_cls=cls,
        max_epochs=2,
        logger=[memory],
    )
    logged = {n: memory.values(f"task_weight/{n}") for n in LOSS_NAMES}
    assert all(len(v) == 2 for v in logged.values()), logged
    assert {n: v[-1][1] for n, v in logged.items()} == pytest.approx(trained.applied_task_weights)
