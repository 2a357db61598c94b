"""Side by side with nequip's callbacks, where nequip's behaviour is right, and the
concrete cases where it is not."""

from __future__ import annotations

import random
from types import SimpleNamespace

import nequip.train as nt
import nequip.train.callbacks as ncb
import pytest

import nequip_mtl.train as mt
import nequip_mtl.train.callbacks as mcb
from nequip_mtl.train.coefficients import current_coeffs
from tests._harness import LOSS_NAMES, CoeffRecorder, MemoryLogger, nequip_fit
from tests._harness import mtl_loss_config as loss_config

NEQUIP_LOSS = loss_config(target="nequip.train.EnergyForceStressLoss")


def _histories(n: int, seed: int = 0) -> list[dict[str, float]]:
    rng = random.Random(seed)
    values = {"per_atom_energy_mse": 5.0, "forces_mse": 1.0, "stress_mse": 0.1}
    out = []
    for _ in range(n):
        values = {k: v * rng.uniform(0.7, 1.05) for k, v in values.items()}
        out.append(dict(values))
    return out


def _drive(cb, manager, hist, interval: str, ours: bool) -> list[dict]:
    """Feed loss history ``hist`` through a callback's hooks exactly as Lightning would."""
    pl_module = SimpleNamespace(loss=manager)
    trainer = SimpleNamespace(callbacks=[cb], current_epoch=0, global_step=0)
    if ours:
        cb.setup(trainer, pl_module, "fit")
    out = []
    for i in range(1, len(hist) + 1):
        if interval == "epoch":
            manager.metrics_values_epoch = hist[i - 1]  # epoch i-1's loss
            trainer.current_epoch = i
            cb.on_train_epoch_start(trainer, pl_module)
        else:
            if ours:  # step i-1 (one micro-batch), observed after its optimizer step ...
                trainer.global_step = i - 1
                cb.on_train_batch_start(trainer, pl_module, None, i - 1)
                manager.metrics_values_step = hist[i - 1]
                trainer.global_step = i
                cb.on_train_batch_end(trainer, pl_module, None, None, i - 1)
            else:  # ... nequip: before step i
                manager.metrics_values_step = hist[i - 1]  # step i-1's loss
                trainer.global_step = i
                cb.on_train_batch_start(trainer, pl_module, None, i)
        out.append(current_coeffs(manager))
    return out


@pytest.mark.parametrize("interval", ["epoch", "batch"])
@pytest.mark.parametrize(
    "manager_factory",
    [
        nt.EnergyForceStressLoss,
        mt.EnergyForceStressLoss,
    ],
    ids=["nequip_manager", "multitask_manager"],
)
def test_softadapt_frequency_2_matches_nequip_on_loss_histories(interval, manager_factory):
    hist = _histories(12)
    theirs = _drive(
        ncb.SoftAdapt(beta=1.1, interval=interval, frequency=2),
        nt.EnergyForceStressLoss(),
        hist,
        interval,
        False,
    )
    ours = _drive(
        mcb.SoftAdapt(beta=1.1, interval=interval, frequency=2, scale_by="current"),
        manager_factory(),
        hist,
        interval,
        True,
    )
    assert len({tuple(c.values()) for c in theirs}) > 3  # coefficients really move
    for a, b in zip(theirs, ours):
        assert b == pytest.approx(a, rel=1e-12)


def test_nequip_softadapt_defects_on_loss_histories():
    hist = _histories(12)
    # frequency 1: nequip never updates (step % 1 == 1 is never true); ours updates each time
    theirs = _drive(
        ncb.SoftAdapt(beta=1.1, interval="epoch", frequency=1),
        nt.EnergyForceStressLoss(),
        hist,
        "epoch",
        False,
    )
    assert all(c == theirs[0] for c in theirs)
    ours = _drive(
        mcb.SoftAdapt(beta=1.1, interval="epoch", frequency=1),
        nt.EnergyForceStressLoss(),
        hist,
        "epoch",
        True,
    )
    assert len({tuple(c.values()) for c in ours}) == len(hist)  # start + one per new observation
    # frequency 3: nequip averages 2 of the 3 candidates of a cycle; ours all 3
    theirs = _drive(
        ncb.SoftAdapt(beta=1.1, interval="epoch", frequency=3),
        nt.EnergyForceStressLoss(),
        hist,
        "epoch",
        False,
    )
    ours = _drive(
        mcb.SoftAdapt(beta=1.1, interval="epoch", frequency=3, scale_by="current"),
        nt.EnergyForceStressLoss(),
        hist,
        "epoch",
        True,
    )
    assert theirs[3] != pytest.approx(ours[3], rel=1e-6)


# ------------------------------------------------------------------ real runs side by side


def _trajectory(tmp_path, callback, **kw):
    rec = CoeffRecorder()
    nequip_fit(tmp_path, [callback, rec], module_kw={"loss": NEQUIP_LOSS}, **kw)
    return rec.records


def _assert_same(theirs, ours, rel=1e-9):
    assert [s for s, _ in theirs] == [s for s, _ in ours]
    for (_, a), (_, b) in zip(theirs, ours):
        assert b == pytest.approx(a, rel=rel)


@pytest.mark.parametrize("interval, batch_size, max_epochs", [("epoch", 4, 6), ("batch", 2, 2)])
def test_softadapt_real_run_matches_nequip(tmp_path, interval, batch_size, max_epochs):
    kw = dict(max_epochs=max_epochs, batch_size=batch_size)
    theirs = _trajectory(
        tmp_path / "a", ncb.SoftAdapt(beta=1.1, interval=interval, frequency=2), **kw
    )
    ours = _trajectory(
        tmp_path / "b",
        mcb.SoftAdapt(beta=1.1, interval=interval, frequency=2, scale_by="current"),
        **kw,
    )
    assert len({tuple(c.values()) for _, c in theirs}) >= 3
    _assert_same(theirs, ours)


def test_step_scheduler_full_dicts_matches_nequip(tmp_path):
    schedule = {
        1: {"per_atom_energy_mse": 1.0, "forces_mse": 5.0, "stress_mse": 1.0},
        2: {"per_atom_energy_mse": 3.0, "forces_mse": 1.0, "stress_mse": 0.5},
    }
    theirs = _trajectory(tmp_path / "a", ncb.LossCoefficientScheduler(schedule), max_epochs=3)
    ours = _trajectory(tmp_path / "b", mcb.LossCoefficientScheduler(schedule), max_epochs=3)
    assert theirs[-1][1] == pytest.approx(
        {"per_atom_energy_mse": 3 / 4.5, "forces_mse": 1 / 4.5, "stress_mse": 0.5 / 4.5}
    )
    _assert_same(theirs, ours, rel=1e-12)


def test_linear_scheduler_full_dict_matches_nequip(tmp_path):
    final = {"per_atom_energy_mse": 1.0, "forces_mse": 5.0, "stress_mse": 1.0}
    theirs = _trajectory(
        tmp_path / "a",
        ncb.LinearLossCoefficientScheduler(final, transition_epochs=2, start_epoch=1),
        max_epochs=4,
    )
    ours = _trajectory(
        tmp_path / "b",
        mcb.LinearLossCoefficientScheduler(final, transition_epochs=2, start_epoch=1),
        max_epochs=4,
    )
    assert theirs[-1][1] == pytest.approx(
        {"per_atom_energy_mse": 1 / 7, "forces_mse": 5 / 7, "stress_mse": 1 / 7}
    )
    _assert_same(theirs, ours, rel=1e-12)


def test_monitor_epoch_values_match_nequip_and_batch_records_are_not_lost(tmp_path):
    schedule = {1: {"per_atom_energy_mse": 1.0, "forces_mse": 2.0, "stress_mse": 1.0}}
    logs = {}
    for name, monitor in (
        ("theirs", ncb.LossCoefficientMonitor),
        ("ours", mcb.LossCoefficientMonitor),
    ):
        logger = MemoryLogger()
        nequip_fit(
            tmp_path / name,
            [ncb.LossCoefficientScheduler(schedule), monitor(interval="epoch", frequency=1)],
            max_epochs=2,
            logger=[logger],
            module_kw={"loss": NEQUIP_LOSS},
        )
        logs[name] = {n: [v for _, v in logger.values(f"loss_coeff/{n}")] for n in LOSS_NAMES}
    for n in LOSS_NAMES:
        assert logs["ours"][n] == pytest.approx(logs["theirs"][n], rel=1e-12)
    assert logs["ours"]["forces_mse"] == pytest.approx([1 / 3, 0.5])

    # batch interval, frequency 1: nequip's values go through LightningModule.log and
    # reach the logger only every `log_every_n_steps`; ours reach it every step
    counts = {}
    for name, monitor in (
        ("theirs", ncb.LossCoefficientMonitor),
        ("ours", mcb.LossCoefficientMonitor),
    ):
        logger = MemoryLogger()
        _, tr = nequip_fit(
            tmp_path / f"{name}_b",
            [monitor(interval="batch", frequency=1)],
            max_epochs=2,
            logger=[logger],
            log_every_n_steps=50,
            module_kw={"loss": NEQUIP_LOSS},
        )
        counts[name] = [s for s, _ in logger.values("loss_coeff/forces_mse")]
    assert counts["ours"] == [1, 2, 3, 4]
    assert counts["theirs"] == []
