"""Custom targets: a loss component on nequip's ``virial`` field and a
``field: null`` metric of the whole data dict are tasks like any other, in every module
and callback of ours. The snippets are those of ``docs/custom_targets.md``: its Python
block is written to a module ``my_targets``, its ``loss:`` block pasted into a tiny
config. The EMT test data carry stress, not virial labels: a transform adds them
(``virial = -stress * volume``, nequip's convention)."""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import get_class

import nequip_mtl.train as mtl
from nequip_mtl.aggregators import MomentumConFIG, UPGrad
from nequip_mtl.train.callbacks import GradientConflictMonitor, SoftAdapt
from tests._harness import CoeffRecorder, datamodule, module_kwargs, params, trainer
from tests.test_guards_module import DirectGradients

PAGE = (Path(__file__).resolve().parents[1] / "docs" / "custom_targets.md").read_text()
PYTHON = re.findall(r"```python\n(.*?)```", PAGE, flags=re.S)
YAML = re.findall(r"```yaml\n(.*?)```", PAGE, flags=re.S)
TASKS = ["per_atom_energy_mse", "forces_mse", "virial_mse", "force_direction"]


class StressToVirial(torch.nn.Module):
    """Virial labels from the stress labels (the inverse of nequip's VirialToStressTransform)."""

    def forward(self, data):
        volume = torch.linalg.det(data["cell"]).abs()
        data["virial"] = -data["stress"] * volume.view(-1, 1, 1)
        return data


def virial_data(batch_size: int = 4):
    return datamodule(
        batch_size=batch_size,
        extra_transforms=[{"_target_": "tests.test_custom_targets.StressToVirial"}],
    )


@pytest.fixture
def snippet(tmp_path, monkeypatch) -> dict:
    """The page's ``training_module`` config, with ``my_targets`` importable."""
    assert len(PYTHON) == 1 and len(YAML) == 1
    (tmp_path / "my_targets.py").write_text(PYTHON[0])
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_targets", raising=False)
    return yaml.safe_load(YAML[0])["training_module"]


def _module(cfg: dict, cls=None, **overrides):
    cfg = copy.deepcopy(cfg)
    target = cfg.pop("_target_")
    if cls is not None:  # the same loss block in another module
        cfg.pop("aggregator", None)
    cfg.update(overrides)
    torch.manual_seed(0)
    return (cls or get_class(target))(**module_kwargs(**cfg))


def _fit(tmp_path, module, callbacks=(), epochs=1):
    tr = trainer(tmp_path, max_epochs=epochs, callbacks=list(callbacks))
    tr.fit(module, datamodule=virial_data())
    return tr


def test_the_page_snippet_trains_with_upgrad_and_the_update_is_upgrads(snippet, tmp_path):
    """Four tasks, four backward passes; the applied update is UPGrad's on the task
    gradients computed here with torch.autograd."""
    module = _module(snippet)
    assert isinstance(module, mtl.MultitaskLightningModule)
    rec = DirectGradients(TASKS)
    _fit(tmp_path, module, [rec])
    assert rec.passes == [4, 4]
    assert module.task_gradient_statistics.names == TASKS
    assert bool((module.task_gradient_statistics.gram.diagonal() > 0).all())
    for step in range(2):
        rows = rec.rows[step]
        want = UPGrad().weights(rows @ rows.T, rec.coeff_tensor(step)) @ rows
        torch.testing.assert_close(rec.updates[step], want, rtol=1e-9, atol=1e-12)
    assert set(module.applied_task_weights) == set(TASKS)
    assert module.skipped_steps == 0


def test_custom_targets_with_momentum_config(snippet, tmp_path):
    """Round robin over the four tasks, two per step: the update is a MomentumConFIG run
    here on the directly computed task gradients."""
    agg = {
        "_target_": "nequip_mtl.aggregators.MomentumConFIG",
        "tasks_per_step": 2,
        "second_moment": False,
    }
    module = _module(snippet, aggregator=agg)
    rec = DirectGradients(TASKS)
    _fit(tmp_path, module, [rec], epochs=2)
    assert rec.passes == [2, 2, 2, 2]
    replay = MomentumConFIG(tasks_per_step=2, second_moment=False)
    for step in range(4):
        sel = replay.select_tasks(4)
        want = replay.aggregate_subset(rec.rows[step][sel], rec.coeff_tensor(step), sel)
        torch.testing.assert_close(rec.updates[step], want, rtol=1e-9, atol=1e-12)


def test_custom_targets_with_famo(snippet, tmp_path):
    module = _module(snippet, cls=mtl.FAMOLightningModule)
    tr = _fit(tmp_path, module, epochs=2)
    assert set(module.applied_task_weights) == set(TASKS)
    assert sum(module.applied_task_weights.values()) == pytest.approx(1.0)
    logits = [float(tr.callback_metrics[f"famo/logit/{n}"]) for n in TASKS]
    assert torch.tensor(logits).double().allclose(module.famo.logits)
    assert all(abs(x) > 1e-6 for x in logits)  # every task's logit moved


def test_custom_targets_with_uncertainty_weighting(snippet, tmp_path):
    module = _module(snippet, cls=mtl.UncertaintyWeightingLightningModule)
    start = module.log_variances.detach().clone()
    tr = _fit(tmp_path, module)
    logged = [float(tr.callback_metrics[f"uncertainty/log_variance/{n}"]) for n in TASKS]
    assert len(logged) == 4
    assert bool(((module.log_variances.detach() - start).abs() > 1e-6).all())


def test_custom_targets_with_softadapt_and_the_conflict_monitor(snippet, tmp_path):
    """SoftAdapt sets all four coefficients; the monitor logs the cosines of every pair,
    equal to those of the task gradients computed here."""
    module = _module(snippet)
    soft = SoftAdapt(beta=1.0, interval="batch", frequency=1)
    monitor, coeffs = GradientConflictMonitor(interval="batch", frequency=1), CoeffRecorder()
    rec = DirectGradients(TASKS)
    start = params(module)
    _fit(tmp_path, module, [soft, monitor, coeffs, rec], epochs=2)
    assert not torch.equal(params(module), start)
    distinct = coeffs.distinct()
    assert len(distinct) >= 2 and all(set(c) == set(TASKS) for c in distinct)
    assert all(v is not None and v > 0 for v in distinct[-1].values())
    rows = rec.rows[monitor.last_step]
    unit = rows / rows.norm(dim=1, keepdim=True)
    cos = unit @ unit.T
    for i in range(4):
        for j in range(i + 1, 4):
            key = f"grad_conflict/cos/{TASKS[i]}~{TASKS[j]}"
            assert monitor.last_metrics[key] == pytest.approx(float(cos[i, j]), abs=1e-9), key
