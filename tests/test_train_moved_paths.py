"""The old paths of the ``nequip_mtl.train`` modules that moved keep working for configs,
checkpoints and imports, with a DeprecationWarning naming the new path; the package-level
names warn nothing.

Each old ``_target_`` is resolved as Hydra resolves it and must be the very object of the
new path. Mutations that make this fail: deleting a stub (``ImportError``), a stub that
forwards to the wrong module or omits a name, a stub without the warning, or a package
``__init__`` that imports from an old path (a warning on the public name).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from hydra.utils import get_object

REPO = Path(__file__).resolve().parents[1]
#: old dotted path -> new dotted path
MOVED = {
    "nequip_mtl.train.conflict_free.ConFIGLightningModule": (
        "nequip_mtl.train.config_modules.ConFIGLightningModule"
    ),
    "nequip_mtl.train.conflict_free.EMAConFIGLightningModule": (
        "nequip_mtl.train.config_modules.EMAConFIGLightningModule"
    ),
    "nequip_mtl.train.famo.FAMOLightningModule": "nequip_mtl.train.famo_module.FAMOLightningModule",
    "nequip_mtl.train.uncertainty.UncertaintyWeightingLightningModule": (
        "nequip_mtl.train.uncertainty_module.UncertaintyWeightingLightningModule"
    ),
    "nequip_mtl.train.uncertainty.param_groups_with_extra": (
        "nequip_mtl.train.uncertainty_module.param_groups_with_extra"
    ),
    "nequip_mtl.train.loss_components.training_loss_components": (
        "nequip_mtl.train.forward_losses.training_loss_components"
    ),
    "nequip_mtl.train.loss_components.active_names": "nequip_mtl.train.coefficients.active_names",
    "nequip_mtl.train.setup_checks.check_module_arguments": (
        "nequip_mtl.train.arguments.check_module_arguments"
    ),
    "nequip_mtl.train.setup_checks.check_loss_coeffs": (
        "nequip_mtl.train.coefficients.check_loss_coeffs"
    ),
    "nequip_mtl.train.setup_checks.build_aggregator": (
        "nequip_mtl.train.aggregator_spec.build_aggregator"
    ),
    "nequip_mtl.train.setup_checks.active_scaler": "nequip_mtl.train.trainer_checks.active_scaler",
    "nequip_mtl.train.setup_checks.log_train_time_compile": (
        "nequip_mtl.train._compile.log_train_time_compile"
    ),
    "nequip_mtl.train.setup_checks.component_datasets": (
        "nequip_mtl.train.task_kinds.component_datasets"
    ),
}


def _resolve(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("old", list(MOVED))
def test_old_target_resolves_to_the_new_object_with_a_warning(old):
    new = MOVED[old]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        obj = get_object(old)  # what Hydra does with a config's `_target_`
    assert obj is _resolve(new)
    messages = [str(w.message) for w in caught if w.category is DeprecationWarning]
    assert any(f"`{old}` has moved to `{new}`" in m for m in messages), messages


def test_package_names_warn_nothing():
    """In a fresh interpreter (the package is imported once per process), importing the
    packages and reading every public name raises no DeprecationWarning turned error."""
    code = (
        "import nequip_mtl.train as t, nequip_mtl.train.callbacks as c\n"
        "for m in (t, c):\n"
        "    [getattr(m, n) for n in m.__all__]\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-W", "error:`nequip_mtl:DeprecationWarning", "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stderr[-2000:]
