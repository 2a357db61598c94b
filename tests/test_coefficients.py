"""Strict coefficient updates: nequip's MetricsManager vs MultitaskMetricsManager and the
drop-in loss wrappers."""

from __future__ import annotations

import math

import nequip.train as nt
import pytest
import torch

import nequip_mtl.train as mt
from nequip_mtl.train.coefficients import current_coeffs, update_coeffs
from tests._harness import datamodule

NAMES = ["per_atom_energy_mse", "forces_mse", "stress_mse"]


def _managers(coeffs=None):
    coeffs = coeffs or {"total_energy": 1.0, "forces": 1.0, "stress": 2.0}
    return nt.EnergyForceStressLoss(coeffs=coeffs), mt.EnergyForceStressLoss(coeffs=coeffs)


@pytest.mark.parametrize("which", [0, 1], ids=["nequip_manager", "multitask_manager"])
def test_update_coeffs_is_strict_and_partial_on_both_managers(which):
    manager = _managers()[which]
    assert current_coeffs(manager) == pytest.approx(
        {n: c for n, c in zip(NAMES, (0.25, 0.25, 0.5))}
    )
    # partial: forces set to 0.75, the others keep 0.25 and 0.5; then renormalised
    update_coeffs(manager, {"forces_mse": 0.75}, "test")
    assert current_coeffs(manager) == pytest.approx(
        {"per_atom_energy_mse": 0.25 / 1.5, "forces_mse": 0.75 / 1.5, "stress_mse": 0.5 / 1.5}
    )
    # null removes a term
    update_coeffs(manager, {"stress_mse": None}, "test")
    assert current_coeffs(manager) == pytest.approx(
        {"per_atom_energy_mse": 0.25, "forces_mse": 0.75, "stress_mse": None}
    )
    assert manager.do_weighted_sum
    before = current_coeffs(manager)
    with pytest.raises(ValueError, match=r"unknown loss component 'force_mse'.*forces_mse"):
        update_coeffs(manager, {"force_mse": 1.0}, "schedule[3]")
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"schedule\[3\].*finite and >= 0"):
            update_coeffs(manager, {"forces_mse": bad}, "schedule[3]")
    with pytest.raises(TypeError, match="must be a number or null"):
        update_coeffs(manager, {"forces_mse": "1"}, "schedule[3]")
    with pytest.raises(ValueError, match="at least one loss coefficient must be positive"):
        update_coeffs(manager, {"forces_mse": None, "per_atom_energy_mse": 0.0}, "schedule[3]")
    assert current_coeffs(manager) == before  # failed updates change nothing


def test_nequip_set_coeffs_defects_and_ours():
    """nequip's set_coeffs drops unlisted names, ignores unknown ones, takes negatives."""
    theirs, ours = _managers()
    theirs.set_coeffs({"forces_mse": 1.0})
    assert theirs.entries["per_atom_energy_mse"].coeff is None  # silently dropped
    theirs.set_coeffs({"forces_mse": 1.0, "force_mse": 5.0, "per_atom_energy_mse": 1.0})
    assert theirs.entries["forces_mse"].coeff == 0.5  # typo silently ignored
    theirs.set_coeffs({"forces_mse": 2.0, "per_atom_energy_mse": -1.0})
    assert theirs.entries["per_atom_energy_mse"].coeff == -1.0  # gradient ascent on energy

    ours.set_coeffs({"forces_mse": 1.0})
    assert current_coeffs(ours) == pytest.approx(
        {"per_atom_energy_mse": 0.25 / 1.75, "forces_mse": 1 / 1.75, "stress_mse": 0.5 / 1.75}
    )
    with pytest.raises(ValueError, match="unknown loss component 'force_mse'"):
        ours.set_coeffs({"force_mse": 5.0})
    with pytest.raises(ValueError, match="finite and >= 0"):
        ours.set_coeffs({"per_atom_energy_mse": -1.0})


def test_multitask_manager_validates_initial_coeffs():
    metric = {"name": "forces_mse", "field": "forces", "metric": nt.MeanSquaredError()}
    with pytest.raises(ValueError, match="'forces_mse'.*finite and >= 0"):
        mt.MultitaskMetricsManager([{**metric, "coeff": -1.0}])
    # metrics without coefficients (monitoring only) stay allowed
    m = mt.MultitaskMetricsManager([{**metric, "coeff": None}])
    assert not m.do_weighted_sum


@pytest.mark.parametrize(
    "coeffs, match",
    [
        ({"total_energy": 1.0, "forces": 1.0}, "missing: \\['stress'\\]"),
        (
            {"total_energy": 1.0, "forces": 1.0, "stress": 1.0, "virial": 1.0},
            "unknown: \\['virial'\\]",
        ),
        ({"total_energy": 1.0, "forces": -1.0, "stress": 1.0}, "finite and >= 0"),
        (
            {"total_energy": 0.0, "forces": 0.0, "stress": None},
            "EnergyForceStressLoss.coeffs: at least one loss coefficient must be positive",
        ),
    ],
)
def test_wrapper_coeffs_are_strict(coeffs, match):
    with pytest.raises(ValueError, match=match):
        mt.EnergyForceStressLoss(coeffs=coeffs)


def test_energy_force_wrapper_rejects_extra_keys_nequip_ignores():
    coeffs = {"total_energy": 1.0, "forces": 1.0, "stress": 1.0}
    nt.EnergyForceLoss(coeffs=coeffs)  # nequip: stress silently ignored
    with pytest.raises(ValueError, match="unknown: \\['stress'\\]"):
        mt.EnergyForceLoss(coeffs=coeffs)


@pytest.fixture(scope="module")
def batch():
    dm = datamodule(batch_size=4)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("EnergyForceLoss", {"coeffs": {"total_energy": 1.0, "forces": 3.0}}),
        ("EnergyForceStressLoss", {"coeffs": {"total_energy": 1.0, "forces": 3.0, "stress": 0.5}}),
        ("EnergyForceStressLoss", {"per_atom_energy": False, "ignore_nan": {"stress": True}}),
        ("EnergyOnlyLoss", {}),
    ],
)
def test_wrappers_match_nequip_on_a_real_batch(name, kwargs, batch):
    theirs = getattr(nt, name)(**kwargs)
    ours = getattr(mt, name)(**kwargs)
    assert isinstance(ours, mt.MultitaskMetricsManager)
    assert list(ours.entries) == list(theirs.entries)
    assert current_coeffs(ours) == current_coeffs(theirs)
    g = torch.Generator().manual_seed(0)
    preds = {
        k: (v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype))
        if v.is_floating_point()
        else v
        for k, v in batch.items()
    }
    a, b = theirs(preds, batch), ours(preds, batch)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_extra_state_roundtrip_and_mismatch():
    ours = mt.EnergyForceStressLoss()
    ours.set_coeffs({"stress_mse": None, "forces_mse": 2.0})
    state = ours.get_extra_state()
    fresh = mt.EnergyForceStressLoss()
    fresh.set_extra_state(state)
    assert current_coeffs(fresh) == current_coeffs(ours)
    other = mt.EnergyForceLoss()
    with pytest.raises(ValueError, match="do not match"):
        other.set_extra_state(state)
    assert math.isclose(sum(v for v in current_coeffs(fresh).values() if v is not None), 1.0)
