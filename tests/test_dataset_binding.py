"""Datasets are bound by name, not by position: a per-dataset loss, per-dataset metrics and
per-dataset references and readout heads read the frames of the data module's dataset of the
name they give, whatever order they list the names in; a name the data module lacks is
refused at setup, naming the key and the closest dataset.

Evidence: a run whose loss lists the datasets in swapped order trains the same model as the
run in the data module's order (float64, SGD: the two weighted sums differ only in the order
of their terms); every per-dataset loss component of a real step equals the MSE computed
independently on the frames of the dataset of its name; a model whose references and heads
list the datasets in swapped order predicts what the model in data-module order predicts.
"""

from __future__ import annotations

import copy

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from nequip.train import NequIPLightningModule

import nequip_mtl.train as mtl
from nequip_mtl.data import bind_dataset_names
from nequip_mtl.data.binding import unknown_dataset_message
from nequip_mtl.model import PerDatasetEnergyReferences
from tests import _mfid as F
from tests._harness import module_kwargs, multi, params, trainer

BALANCED = {"mode": "balanced", "frames_per_batch": {"a": 2, "b": 1}}
#: different coefficients per dataset: a loss that gave `a`'s to `b` would train otherwise
COEFFS = {"a": {"total_energy": 1.0, "forces": 3.0}, "b": {"total_energy": 2.0, "forces": 0.5}}
SGD = {"_target_": "torch.optim.SGD", "lr": 0.02}


def loss(names, coeffs=None) -> dict:
    coeffs = coeffs or {n: COEFFS[n] for n in names}
    return {"_target_": "nequip_mtl.train.PerDatasetLoss", "datasets": list(names),
            "coeffs": coeffs}  # fmt: skip


class ComponentsReadTheirDatasets(Callback):
    """On every step: each per-dataset forces component of the loss equals the forces MSE
    computed here, independently, over the atoms of the frames whose ``dataset_index`` is the
    position of the component's dataset *name* in the data module."""

    def __init__(self):
        self.checked = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with torch.enable_grad():
            out = pl_module(copy.copy(batch))
        self.batch, self.forces = batch, out["forces"].detach()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        names = trainer.datamodule.dataset_names
        index = self.batch["dataset_index"].reshape(-1)[self.batch["batch"]]
        for name, value in pl_module.loss.metrics_values_step.items():
            dataset, _, component = name.partition("/")
            if component != "forces_mse":
                continue
            atoms = index == names.index(dataset)
            diff = self.forces[atoms] - self.batch["forces"][atoms]
            expected = float((diff.double() ** 2).mean())
            # float64: the same sum in another order; float32: the model's own rounding of
            # a few hundred squared terms, each O(eps) relative
            rel = 1e-10 if diff.dtype == torch.float64 else 1e-4
            assert float(value) == pytest.approx(expected, rel=rel), name
            self.checked += 1


def fit(names, tmp_path, callbacks=(), cls=NequIPLightningModule, coeffs=None, **kw):
    torch.manual_seed(0)
    kw.setdefault("optimizer", SGD)
    module = cls(**module_kwargs(loss=loss(names, coeffs), val_metrics=None, **kw))
    tr = trainer(tmp_path, max_epochs=2, callbacks=list(callbacks), limit_val_batches=0)
    tr.fit(module, datamodule=multi(sampling=BALANCED))
    return module


def test_a_swapped_dataset_list_trains_the_model_of_the_data_modules_order(tmp_path):
    """Fails if the loss reads the i-th dataset for the i-th name (the swapped run then gives
    `a`'s coefficients to `b`'s frames, and its per-component check fails on step 1)."""
    check = ComponentsReadTheirDatasets()
    swapped = fit(["b", "a"], tmp_path / "swapped", callbacks=[check])
    ordered = fit(["a", "b"], tmp_path / "ordered")
    assert check.checked >= 4
    # float64 sums of the same terms in another order: rounding of O(1e-16) per step
    torch.testing.assert_close(params(swapped), params(ordered), rtol=1e-10, atol=1e-12)


def test_dataset_tasks_bind_by_name(tmp_path):
    """Dataset tasks (UPGrad, one forward per dataset) with the names swapped: each task's
    components read its own dataset (checked on every step)."""
    check = ComponentsReadTheirDatasets()
    module = fit(
        ["b", "a"],
        tmp_path,
        callbacks=[check],
        cls=mtl.MultitaskLightningModule,
        aggregator={"_target_": "nequip_mtl.aggregators.UPGrad"},
        tasks="datasets",
    )
    assert check.checked >= 4
    bound = {e.field.dataset: e.field.dataset_index for e in module.loss.entries.values()}
    assert bound == {"a": 0, "b": 1}


@pytest.mark.parametrize(
    "names, cls, extra",
    [
        (["a", "bb"], NequIPLightningModule, {}),
        # the primary names the dataset correctly: the loss's typo is what is blamed
        (
            ["a", "bb"],
            mtl.MultitaskLightningModule,
            {
                "tasks": "datasets",
                "aggregator": {
                    "_target_": "nequip_mtl.aggregators.PrimaryConstrained",
                    "primary": "b",
                },
            },
        ),  # fmt: skip
    ],
)
def test_a_misspelt_dataset_is_refused_before_any_step(names, cls, extra, tmp_path):
    """Fails if an unknown name is accepted (it trained silently with the weighted sum, and
    PrimaryConstrained blamed `aggregator.primary`)."""
    coeffs = {"a": COEFFS["a"], "bb": COEFFS["b"]}
    with pytest.raises(ValueError) as err:
        fit(names, tmp_path, cls=cls, coeffs=coeffs, **extra)
    message = str(err.value)
    assert "`training_module.loss.datasets` names the dataset 'bb'" in message
    assert "['a', 'b']" in message and "did you mean 'b'?" in message
    assert "primary" not in message


def test_a_training_dataset_no_loss_component_reads_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"training dataset\(s\) \['b'\], which no component"):
        fit(["a"], tmp_path)


def test_per_dataset_metrics_bind_by_name_too():
    metrics = mtl.PerDatasetMetrics(datasets=["b", "a"])
    assert bind_dataset_names(torch.nn.ModuleDict({"val_metrics": metrics}), ["a", "b"]) == 1
    bound = {e.field.dataset: e.field.dataset_index for e in metrics.entries.values()}
    assert bound == {"a": 0, "b": 1}
    with pytest.raises(ValueError, match=r"`training_module.val_metrics.datasets` names the "
                       r"dataset 'b'.*did you mean 'bb'"):  # fmt: skip
        bind_dataset_names(torch.nn.ModuleDict({"val_metrics": metrics}), ["a", "bb"])


def test_an_unbound_named_component_refuses_to_guess():
    """A modifier with a name only reads a dataset once a data module bound the name."""
    field = mtl.DatasetModifier("forces", dataset="new")
    batch = {"dataset_index": torch.tensor([0, 1]), "forces": torch.zeros(2, 3),
             "batch": torch.tensor([0, 1]), "pos": torch.zeros(2, 3)}  # fmt: skip
    with pytest.raises(RuntimeError, match="no data module has bound that name"):
        field(batch, batch)
    assert field.bind(["old", "new"]) and field.dataset_index == 1
    assert not field.bind(["old", "neww"])


def test_the_message_names_the_closest_dataset():
    assert "did you mean 'new'?" in unknown_dataset_message("k", "neww", ["pretrain", "new"])
    assert "did you mean" not in unknown_dataset_message("k", "zzz", ["pretrain", "new"])


# ------------------------------------------------------------------ references and heads

REFS = {"lo": {"Cu": -2.5}, "hi": {"Cu": -6.25}}


def model(names, parts: str):
    return PerDatasetEnergyReferences(
        F.model_config("float64"), names, REFS, trainable=True,
        readout_heads=parts != "shifts", fidelity_embedding=parts == "trunk",
    )  # fmt: skip


@pytest.mark.parametrize("parts", ["shifts", "heads", "trunk"])
def test_swapped_references_and_heads_predict_what_the_ordered_model_predicts(parts):
    """Fails if a frame's `dataset_index` picks the model's row of that position rather than
    of that name (then the swapped model gives `lo` frames `hi`'s reference, head or type-
    embedding correction)."""
    batch = F.batch(F.data_module())  # dataset_index 0 = lo, 1 = hi
    ordered, swapped = model(["lo", "hi"], parts), model(["hi", "lo"], parts)
    for m in (ordered, swapped):  # parts that differ per dataset, the same per name
        for x in m.modules():
            if type(x).__name__ == "DatasetReadoutHeads":
                for name, head in zip(x.dataset_names, x.heads):
                    with torch.no_grad():
                        head.weight.mul_(2.0 if name == "hi" else 0.5)
            if type(x).__name__ == "DatasetTypeEmbedding":
                for row, name in enumerate(x.dataset_names):
                    with torch.no_grad():
                        x.corrections[row].fill_(0.3 if name == "hi" else -0.2)
    for m in (ordered, swapped):
        assert bind_dataset_names(m, ["lo", "hi"], prefix="training_module.model") >= 1
    out_o, out_s = ordered(F.clone(batch)), swapped(F.clone(batch))
    torch.testing.assert_close(out_s["total_energy"], out_o["total_energy"], rtol=0, atol=0)
    torch.testing.assert_close(out_s["forces"], out_o["forces"], rtol=0, atol=0)
    # unbound, the swapped model reads the rows by position: another prediction
    fresh = model(["hi", "lo"], parts)
    assert not torch.allclose(fresh(F.clone(batch))["total_energy"], out_o["total_energy"])


def test_a_data_module_dataset_the_model_lacks_is_refused_at_setup(tmp_path):
    torch.manual_seed(0)
    kw = module_kwargs(loss=None, val_metrics=None)
    kw["loss"] = {"_target_": "nequip_mtl.train.PerDatasetLoss", "datasets": ["lo", "hi"]}
    kw["model"] = {"_target_": "nequip_mtl.model.PerDatasetEnergyReferences",
                   "model": F.model_config("float64"), "datasets": ["lo", "high"],
                   "references": {"lo": REFS["lo"], "high": REFS["hi"]}}  # fmt: skip
    module = NequIPLightningModule(**kw)
    tr = trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    with pytest.raises(ValueError, match=r"dataset 'hi' \(`data.datasets`\) is not one of the "
                       r"datasets \['lo', 'high'\] of `training_module.model.datasets`"):  # fmt: skip
        tr.fit(module, datamodule=F.data_module())
