"""Datasets as tasks: ``tasks: datasets`` with a per-dataset loss and several training
datasets, through real nequip models and real Lightning trainers.

Expected updates are computed independently: per-dataset task gradients by autograd on
the whole batch (the frames of the other datasets masked by the per-dataset loss), not on
the per-dataset sub-batches the module forwards, then the aggregator applied to them.
"""

from __future__ import annotations

import copy

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from nequip.train import NequIPLightningModule

import nequip_mtl.train as mtl
from nequip_mtl.aggregators import UPGrad
from nequip_mtl.step import DatasetTasks
from tests._harness import (
    module_kwargs,
    multi,
    params,
    skip_inductor_under_default_capability,
    trainer,
)

BALANCED = {"mode": "balanced", "frames_per_batch": {"a": 2, "b": 1}}
COEFFS = {
    "a": {"total_energy": 1.0, "forces": 3.0},
    "b": {"total_energy": 2.0, "forces": 2.0},
    "c": {"total_energy": 0.5, "forces": 1.0},
}


def loss(names=("a", "b"), coeffs=COEFFS) -> dict:
    return {
        "_target_": "nequip_mtl.train.PerDatasetLoss",
        "datasets": list(names),
        "coeffs": {n: coeffs[n] for n in names},
    }


def kwargs(**kw) -> dict:
    kw.setdefault("optimizer", {"_target_": "torch.optim.SGD", "lr": 0.01})
    kw.setdefault("loss", loss())
    kw.setdefault("val_metrics", None)
    return module_kwargs(**kw)


def fit(cls, tmp_path, epochs=2, callbacks=(), data=None, trainer_kw=None, **kw):
    torch.manual_seed(0)
    module = cls(**kwargs(**kw))
    tr = trainer(
        tmp_path,
        max_epochs=epochs,
        callbacks=list(callbacks),
        limit_val_batches=0,
        **(trainer_kw or {}),
    )
    tr.fit(module, datamodule=data or multi(sampling=BALANCED))
    return module, tr


class TaskGradientRows(Callback):
    """Per step: the applied ``.grad`` and each task's gradient by autograd on the whole
    batch at the step's parameters (before the update), the active loss components grouped
    into tasks by ``kind`` (``{task: (its coefficient, its gradient row)}``)."""

    def __init__(self, kind):
        self.kind = kind
        self.grads, self.tasks = [], []

    def on_train_start(self, trainer, pl_module):
        self._loss = copy.deepcopy(pl_module.loss)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        params = [p for p in pl_module.parameters() if p.requires_grad]
        self._loss.reset()
        values = self._loss(pl_module(batch), pl_module.process_target(batch, batch_idx))
        groups: dict[str, dict[str, float]] = {}
        for name, entry in pl_module.loss.entries.items():
            if entry.coeff is not None:
                task = self.kind.task_of(name, getattr(entry.field, "dataset", None))
                groups.setdefault(task, {})[name] = entry.coeff
        rows = {}
        for task, coeffs in groups.items():
            total = sum(coeffs.values())
            value = sum(c / total * values[n] for n, c in coeffs.items())
            grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
            flat = [
                (torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, params)
            ]
            rows[task] = (total, torch.cat(flat))
        self.tasks.append(rows)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        params = [p for p in pl_module.parameters() if p.requires_grad]
        self.grads.append(torch.cat([p.grad.flatten() for p in params]).clone())


class ForwardCounter(Callback):
    """Training forward passes of the model (one per sub-batch)."""

    calls = 0

    def on_train_start(self, trainer, pl_module):
        def count(*_):
            if pl_module.training:
                self.calls += 1

        pl_module.register_forward_hook(count)


@pytest.mark.parametrize(
    "names, frames",
    [(("a", "b"), {"a": 2, "b": 1}), (("a", "b", "c"), {"a": 2, "b": 1, "c": 1})],
    ids=["2_datasets", "3_datasets"],
)
def test_dataset_task_update_is_the_aggregator_on_independent_dataset_gradients(
    tmp_path, names, frames
):
    rec, counter = TaskGradientRows(DatasetTasks()), ForwardCounter()
    module, tr = fit(
        mtl.MultitaskLightningModule,
        tmp_path,
        callbacks=[rec, counter],
        data=multi(
            names,
            sampling={"mode": "balanced", "frames_per_batch": frames},
            train_dataloader={},
        ),
        loss=loss(names),
        tasks="datasets",
        aggregator={"_target_": "nequip_mtl.aggregators.UPGrad"},
    )
    assert tr.global_step == len(rec.grads) >= 4 and module.skipped_steps == 0
    # by default one forward per dataset's sub-batch (the callback's own forward counts too)
    assert counter.calls == (len(names) + 1) * tr.global_step
    assert set(module.applied_task_weights) == set(names)
    assert module.task_gradient_statistics.names == list(names)
    for grad, rows in zip(rec.grads, rec.tasks):
        coeffs = torch.tensor([rows[n][0] for n in names])
        matrix = torch.stack([rows[n][1] for n in names])
        torch.testing.assert_close(
            grad, UPGrad()(matrix, coeffs / coeffs.sum()), rtol=1e-9, atol=1e-12
        )


def test_a_dataset_absent_from_a_forwarded_apart_batch_is_dropped_exactly(tmp_path):
    """3 datasets, proportional batches of 2 frames: most batches hold 2 of the 3 datasets,
    forwarded one sub-batch each; the absent dataset's task has no graph and is dropped, and
    the update is UPGrad on the present datasets' independently computed gradients."""
    names = ("a", "b", "c")
    rec = TaskGradientRows(DatasetTasks())
    module, tr = fit(
        mtl.MultitaskLightningModule,
        tmp_path,
        callbacks=[rec],
        data=multi(names, sampling={"mode": "proportional"}, train_dataloader={"batch_size": 2}),
        loss=loss(names),
        tasks="datasets",
        aggregator={"_target_": "nequip_mtl.aggregators.UPGrad"},
    )
    assert tr.global_step == len(rec.grads) >= 8 and module.skipped_steps == 0
    two = 0
    for grad, rows in zip(rec.grads, rec.tasks):
        present = [n for n in names if rows[n][1].abs().sum() > 0]
        two += len(present) == 2
        # the loss's coefficients (nequip normalises them over all three datasets): an
        # absent dataset contributes nothing, as in the weighted sum
        coeffs = torch.tensor([rows[n][0] for n in present])
        matrix = torch.stack([rows[n][1] for n in present])
        torch.testing.assert_close(grad, UPGrad()(matrix, coeffs), rtol=1e-9, atol=1e-12)
    assert two >= 2  # the case this test is about happened


def test_sum_of_dataset_tasks_is_nequips_weighted_sum(tmp_path):
    """tasks: datasets with the Sum aggregator trains exactly like nequip's own module on the
    same per-dataset loss: sum_d C_d L_d is the loss's weighted sum."""
    ours, _ = fit(
        mtl.MultitaskLightningModule,
        tmp_path / "ours",
        tasks="datasets",
        aggregator={"_target_": "nequip_mtl.aggregators.Sum"},
    )
    nequip, _ = fit(NequIPLightningModule, tmp_path / "nequip")
    torch.testing.assert_close(params(ours), params(nequip), rtol=0, atol=1e-10)
    assert (
        params(ours) - params(fit(NequIPLightningModule, tmp_path / "x", epochs=1)[0])
    ).abs().max() > 1e-6


@pytest.mark.parametrize("tasks", ["datasets", "components"])
def test_forward_per_dataset_changes_nothing_but_the_cost(tmp_path, tasks):
    """One forward per dataset's sub-batch gives the trajectory of one forward of the batch."""
    runs, forwards = {}, {}
    for split in (True, False):
        counter = ForwardCounter()
        module, tr = fit(
            mtl.MultitaskLightningModule,
            tmp_path / str(split),
            callbacks=[counter],
            tasks=tasks,
            forward_per_dataset=split,
            aggregator={"_target_": "nequip_mtl.aggregators.UPGrad"},
            optimizer={"_target_": "torch.optim.Adam", "lr": 0.01},
        )
        runs[split], forwards[split] = params(module), counter.calls / tr.global_step
    torch.testing.assert_close(runs[True], runs[False], rtol=0, atol=1e-10)
    assert forwards == {True: 2.0, False: 1.0}  # balanced batches: both datasets every step


def test_a_batch_without_a_dataset_drops_its_task_and_does_not_skip(tmp_path):
    """Proportional sampling with a batch of 1: most batches hold one dataset only."""
    data = multi(sampling={"mode": "proportional"}, train_dataloader={"batch_size": 1})
    module, tr = fit(
        mtl.MultitaskLightningModule,
        tmp_path,
        data=data,
        epochs=1,
        tasks="datasets",
        aggregator={"_target_": "nequip_mtl.aggregators.UPGrad"},
    )
    assert module.skipped_steps == 0 and tr.global_step == 12
    assert sum(module.faults.dropped.values()) == 12  # every step dropped the absent dataset
    assert torch.isfinite(params(module)).all()


def test_tasks_datasets_needs_a_per_dataset_loss():
    with pytest.raises(ValueError, match="belong to no dataset.*PerDatasetLoss"):
        mtl.MultitaskLightningModule(
            **kwargs(loss={"_target_": "nequip_mtl.train.EnergyForceLoss"}, tasks="datasets")
        )
    with pytest.raises(ValueError, match="training_module.tasks"):
        mtl.MultitaskLightningModule(**kwargs(tasks="dataset"))


@pytest.mark.parametrize(
    "extra",
    [
        {"trainer_kw": {"accumulate_grad_batches": 2}},
        {"weights_every": 2},
        {"aggregator": {"_target_": "nequip_mtl.aggregators.MomentumConFIG"}},
        {"aggregator": {"_target_": "nequip_mtl.aggregators.PrimaryConstrained", "primary": "b"}},
    ],
    ids=["accumulate", "weights_every", "momentum_config", "primary_constrained"],
)
def test_dataset_tasks_in_combination(tmp_path, extra):
    extra = dict(extra)
    extra.setdefault("aggregator", {"_target_": "nequip_mtl.aggregators.UPGrad"})
    module, tr = fit(mtl.MultitaskLightningModule, tmp_path, tasks="datasets", **extra)
    assert module.skipped_steps == 0 and tr.global_step > 0
    assert torch.isfinite(params(module)).all()


def test_plots_show_dataset_tasks_by_name(tmp_path):
    """The loss panels draw each dataset's components under the dataset's name, against
    the logged values, and the share panel names the dataset tasks."""
    import numpy as np
    from lightning.pytorch.loggers import CSVLogger

    from nequip_mtl.plot import build_figures, load_run

    torch.manual_seed(0)
    module = mtl.MultitaskLightningModule(
        **kwargs(tasks="datasets", aggregator={"_target_": "nequip_mtl.aggregators.UPGrad"})
    )
    tr = trainer(
        tmp_path,
        max_epochs=2,
        limit_val_batches=0,
        logger=CSVLogger(str(tmp_path), name="logs", version=""),
        log_every_n_steps=1,
    )
    tr.fit(module, datamodule=multi(sampling=BALANCED))
    logs = load_run(tmp_path)
    figures = build_figures(logs)
    forces = next(ax for ax in figures["losses.png"].axes if ax.get_title().startswith("forces"))
    lines = {ln.get_label(): ln for ln in forces.get_lines()}
    for dataset in ("a", "b"):
        series = logs.series[f"train_loss_step/{dataset}/forces_mse"]
        line = lines[f"{dataset}: train (per step)"]
        np.testing.assert_array_equal(np.asarray(line.get_xdata(), float), series.step)
        np.testing.assert_allclose(np.asarray(line.get_ydata(), float), series.value, rtol=1e-12)
    (shares,) = figures["loss_coefficients.png"].axes
    assert {ln.get_label() for ln in shares.get_lines()} >= {"a", "b"}


def test_a_restart_mid_epoch_resumes_dataset_tasks_exactly(tmp_path):
    """Interrupted after 3 steps (mid-epoch, between weight refreshes) and resumed: the
    parameters equal the uninterrupted run's (sampler, held weights, optimizer restored)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(root, ckpt_path=None, **trainer_kw):
        torch.manual_seed(0)
        module = mtl.MultitaskLightningModule(
            **kwargs(
                tasks="datasets",
                weights_every=2,
                aggregator={"_target_": "nequip_mtl.aggregators.UPGrad"},
                optimizer={"_target_": "torch.optim.Adam", "lr": 0.01},
            )
        )
        ckpt = ModelCheckpoint(dirpath=str(root), save_last=True, every_n_train_steps=3)
        tr = trainer(
            root,
            max_epochs=2,
            callbacks=[ckpt],
            enable_checkpointing=True,
            limit_val_batches=0,
            **trainer_kw,
        )
        tr.fit(module, datamodule=multi(sampling=BALANCED), ckpt_path=ckpt_path)
        return module, tr

    full, tr = run(tmp_path / "full")
    assert tr.global_step == 8
    run(tmp_path / "part", max_steps=3)
    resumed, tr = run(tmp_path / "resumed", ckpt_path=str(tmp_path / "part" / "last.ckpt"))
    assert tr.global_step == 8
    torch.testing.assert_close(params(resumed), params(full), rtol=0, atol=1e-12)


@pytest.mark.slow
@skip_inductor_under_default_capability
def test_dataset_tasks_under_train_time_compile_match_eager(tmp_path):
    """`compile_mode: compile` with one forward per dataset's sub-batch (sub-batches of
    several sizes through one compiled graph) and per-task backward passes."""
    from tests._harness import model_config

    runs = {}
    for mode in ("eager", "compile"):
        model = model_config("float64")
        model["compile_mode"] = mode
        module, _ = fit(
            mtl.MultitaskLightningModule,
            tmp_path / mode,
            epochs=1,
            # >= 2 frames of each dataset: nequip runs a sub-batch of one frame eagerly
            data=multi(
                sampling={"mode": "balanced", "frames_per_batch": {"a": 2, "b": 2}},
                train_dataloader={},
            ),
            model=model,
            tasks="datasets",
            aggregator={"_target_": "nequip_mtl.aggregators.UPGrad"},
        )
        runs[mode] = params(module)
    torch.testing.assert_close(runs["compile"], runs["eager"], rtol=0, atol=1e-10)


def test_calibration_and_the_conflict_monitor_on_dataset_tasks(tmp_path):
    """Calibrate-then-freeze sets per-component coefficients (measured per component,
    though the module's tasks are datasets); the monitor logs the dataset tasks' cosines."""
    from nequip_mtl.train.callbacks import CalibrateLossCoefficients, GradientConflictMonitor

    calib = CalibrateLossCoefficients(steps=2, rule="gradnorm")
    monitor = GradientConflictMonitor(interval="batch", frequency=1)
    module, tr = fit(
        mtl.MultitaskLightningModule,
        tmp_path,
        callbacks=[calib, monitor],
        tasks="datasets",
        aggregator={"_target_": "nequip_mtl.aggregators.Sum"},  # calibrating a weighted sum
    )
    assert calib.done and module.skipped_steps == 0
    coeffs = {n: e.coeff for n, e in module.loss.entries.items()}
    assert set(calib.coefficients) == set(coeffs) and coeffs == pytest.approx(calib.coefficients)
    assert coeffs != pytest.approx({n: 0.25 for n in coeffs})  # the calibration moved them
    assert monitor.last_statistics.names == ["a", "b"]
    assert "grad_conflict/cos/a~b" in monitor.last_metrics


def test_the_dataset_task_snippet_in_docs_trains_with_the_pages_data_block(tmp_path):
    import re
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    page = (Path(__file__).resolve().parents[1] / "docs" / "datasets.md").read_text()
    data = re.search(r"```yaml\n(data:\n.*?)```", page, re.S).group(1)
    block = re.search(r"```yaml\n(training_module:\n.*?)```", page, re.S).group(1)
    snippet = OmegaConf.to_container(OmegaConf.create(block).training_module)
    dm = instantiate(OmegaConf.create(data).data, _recursive_=False)  # as nequip-train
    cls = snippet.pop("_target_")
    assert cls == "nequip_mtl.train.MultitaskLightningModule"
    torch.manual_seed(0)
    module = mtl.MultitaskLightningModule(**kwargs(**snippet))
    tr = trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    tr.fit(module, datamodule=dm)
    assert tr.global_step == 4 and module.skipped_steps == 0
    assert set(module.applied_task_weights) == {"pretrain", "new"}


class NanForcesOfB(mtl.MultitaskLightningModule):
    """NaN force labels on the frames of dataset ``b`` (``dataset_index`` 1) at step 1."""

    def process_target(self, batch, batch_idx, dataloader_idx=0):
        target = super().process_target(batch, batch_idx, dataloader_idx)
        if self.training and self.trainer.global_step == 1:
            frame_of_atom = target["batch"].reshape(-1)
            in_b = target["dataset_index"].reshape(-1)[frame_of_atom] == 1
            target["forces"] = torch.where(in_b[:, None], float("nan"), target["forces"])
        return target


@pytest.mark.parametrize("policy", ["skip", "zero_task"])
def test_a_nonfinite_dataset_task_is_named_as_a_dataset(tmp_path, policy):
    """The skip (or drop) names the dataset whose gradient is NaN, as a dataset."""
    with pytest.warns(RuntimeWarning, match=r"dataset 'b' has a NaN gradient") as record:
        module, tr = fit(
            NanForcesOfB,
            tmp_path,
            epochs=1,
            tasks="datasets",
            on_nonfinite=policy,
            aggregator={"_target_": "nequip_mtl.aggregators.UPGrad"},
        )
    assert not [w for w in record if "loss component 'b'" in str(w.message)]
    assert module.skipped_steps == (1 if policy == "skip" else 0)
    assert module.faults.dropped.get("b", 0) == (0 if policy == "skip" else 1)
