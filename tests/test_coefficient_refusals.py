"""Every place that takes loss coefficients refuses a bad one through the one check,
:func:`nequip_mtl.train.coefficients.validate_coeffs`, in the words a user reads there.

Each case goes through the user-facing path it guards (a training module's config, a
loss manager or wrapper, a callback's arguments, a checkpoint, a module argument) and the
whole message is compared: one format, starting with the config key the value came from.
Mutations that make these fail: dropping ``value < 0`` (or ``math.isfinite``) from
``validate_coeffs``; accepting a bool as a number; a ``positive`` check that accepts a zero
sum; the ``exact`` check without ``missing``; a caller that checks on its own again (its
message differs).
"""

from __future__ import annotations

import re

import nequip.train as nt
import pytest

import nequip_mtl.train as mtl
from nequip_mtl.train import callbacks as mcb
from nequip_mtl.train.coefficients import update_coeffs, validate_coeffs
from tests._harness import loss_config, module_kwargs

F = "must be finite and >= 0 (or null), got"


def _module(cls, loss):
    return lambda: cls(**module_kwargs(loss=loss))


def _checkpoint_with(coeffs):
    manager = mtl.EnergyForceLoss()
    state = {**manager.get_extra_state(), "coeff_dict": coeffs}
    return lambda: mtl.EnergyForceLoss().set_extra_state(state)


CASES = {
    "module_config_not_a_number": (
        _module(
            mtl.ConFIGLightningModule,
            loss_config({"total_energy": 1.0, "forces": "1", "stress": 1.0}),
        ),
        TypeError,
        "ConFIGLightningModule: `training_module.loss.coeffs`: coefficient of 'forces' must "
        "be a number or null, got '1'",
    ),
    "module_config_per_dataset": (
        _module(
            mtl.MultitaskLightningModule,
            {
                "_target_": "nequip_mtl.train.PerDatasetLoss",
                "datasets": ["A"],
                "coeffs": {"A": {"total_energy": 1.0, "forces": -1.0}},
            },
        ),
        ValueError,
        f"MultitaskLightningModule: `training_module.loss.coeffs.A`: coefficient of 'forces' "
        f"{F} -1.0",
    ),
    "module_config_metrics_list": (
        _module(
            mtl.FAMOLightningModule,
            {
                "_target_": "nequip.train.MetricsManager",
                "metrics": [
                    {"name": "f", "field": "forces", "coeff": float("nan"), "metric": {}},
                ],
            },
        ),
        ValueError,
        f"FAMOLightningModule: `training_module.loss.metrics[0].coeff`: coefficient of 'f' {F} nan",
    ),
    "manager_metric": (
        lambda: mtl.MultitaskMetricsManager(
            [{"name": "f", "field": "forces", "coeff": -1, "metric": nt.MeanSquaredError()}]
        ),
        ValueError,
        f"MultitaskMetricsManager.metrics[0]: coefficient of 'f' {F} -1.0",
    ),
    "wrapper_not_a_mapping": (
        lambda: mtl.EnergyForceLoss(coeffs=[1.0, 1.0]),
        TypeError,
        "EnergyForceLoss.coeffs: expected a mapping of loss names to coefficients, got [1.0, 1.0]",
    ),
    "wrapper_missing_key": (
        lambda: mtl.EnergyForceLoss(coeffs={"total_energy": 1.0}),
        ValueError,
        "EnergyForceLoss.coeffs: must have exactly the keys ['total_energy', 'forces']; "
        "missing: ['forces']",
    ),
    "wrapper_zero_sum": (
        lambda: mtl.EnergyForceLoss(coeffs={"total_energy": 0.0, "forces": None}),
        ValueError,
        "EnergyForceLoss.coeffs: at least one loss coefficient must be positive, got "
        "{'total_energy': 0.0, 'forces': None}",
    ),
    "per_dataset_loss": (
        lambda: mtl.PerDatasetLoss(datasets=["A"], coeffs={"A": {"forces": float("inf")}}),
        ValueError,
        f"PerDatasetLoss: `coeffs` of dataset 'A': coefficient of 'forces' {F} inf",
    ),
    "scheduler_bool": (
        lambda: mcb.LossCoefficientScheduler({3: {"forces_mse": True}}),
        TypeError,
        "LossCoefficientScheduler.schedule[3]: coefficient of 'forces_mse' must be a number "
        "or null, got True",
    ),
    "linear_scheduler_zero_sum": (
        lambda: mcb.LinearLossCoefficientScheduler({"forces_mse": 0}, transition_epochs=2),
        ValueError,
        "LinearLossCoefficientScheduler.final_coeffs: at least one loss coefficient must be "
        "positive, got {'forces_mse': 0.0}",
    ),
    "update_unknown_name": (
        lambda: update_coeffs(mtl.EnergyForceLoss(), {"force_mse": 1.0}, "SoftAdapt"),
        ValueError,
        "SoftAdapt: unknown loss component 'force_mse'; valid names are "
        "['per_atom_energy_mse', 'forces_mse']",
    ),
    "update_all_null": (
        lambda: update_coeffs(
            mtl.EnergyForceLoss(), {"forces_mse": None, "per_atom_energy_mse": 0.0}, "RLW"
        ),
        ValueError,
        "RLW: at least one loss coefficient must be positive, got "
        "{'per_atom_energy_mse': 0.0, 'forces_mse': None}",
    ),
    "checkpoint": (
        _checkpoint_with({"per_atom_energy_mse": 0.5, "forces_mse": -0.5}),
        ValueError,
        f"checkpoint `coeff_dict`: coefficient of 'forces_mse' {F} -0.5",
    ),
    "famo_min_losses": (
        lambda: mtl.FAMOLightningModule(min_losses={"forces_mse": -1.0}, **module_kwargs()),
        ValueError,
        f"FAMOLightningModule.min_losses: coefficient of 'forces_mse' {F} -1.0",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refusal_through_the_user_facing_path(case):
    factory, exc, message = CASES[case]
    with pytest.raises(exc, match=f"^{re.escape(message)}$"):
        factory()


def test_the_check_itself():
    """The rules, on values whose verdict is plain (the cases above are where they apply)."""
    assert validate_coeffs(["a", "b"], {"a": 1, "b": None}, "w") == {"a": 1.0, "b": None}
    assert validate_coeffs(None, {"z": 0}, "w") == {"z": 0.0}  # zero is a coefficient
    assert type(validate_coeffs(None, {"a": 2}, "w")["a"]) is float
    for bad in (-1e-300, float("-inf"), float("inf"), float("nan")):
        with pytest.raises(ValueError, match="finite and >= 0"):
            validate_coeffs(None, {"a": bad}, "w")
    for bad in (True, "1", [1.0]):
        with pytest.raises(TypeError, match="number or null"):
            validate_coeffs(None, {"a": bad}, "w")
    with pytest.raises(ValueError, match=r"unknown: \['c'\]; missing: \['b'\]"):
        validate_coeffs(["a", "b"], {"a": 1.0, "c": 1.0}, "w", exact=True)
    assert validate_coeffs(["a"], {"a": 1e-300}, "w", positive=True) == {"a": 1e-300}
