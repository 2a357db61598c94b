"""Labels a dataset lacks and NaN labels blamed on the wrong component: refused at setup, naming
the component, dataset, field and frames. Labels the frames hold and no component trains on
(the stress of periodic frames under an energy and forces loss): warned about at setup, naming
the dataset, field, frames and the key that trains them."""

from __future__ import annotations

import functools
import math
import re
import warnings

import pytest
import torch
from nequip.data import AtomicDataDict
from nequip.data.dataset import EMTTestDataset
from nequip.train import EnergyForceLoss, NequIPLightningModule

import nequip_mtl.train as mtl
from nequip_mtl.data.keys import DATASET_INDEX_KEY
from nequip_mtl.train.callbacks import CheckTrainingLabels
from nequip_mtl.train.label_checks import (
    UnusedLabelWarning,
    check_training_labels,
    nonfinite_model_state,
)
from tests import _harness as harness
from tests import _mfid as mfid
from tests import _per_dataset as pd

NAN_FORCES = [{"_target_": "tests._per_dataset.NaNLabels", "field": "forces"}]


def _frames(n: int, index: int | None = None) -> list[dict]:
    ds = EMTTestDataset(transforms=[], supercell=(1, 1, 1), num_frames=n, seed=3)
    out = []
    for i in range(n):
        f = dict(ds[i])
        if index is not None:
            f[DATASET_INDEX_KEY] = torch.tensor([index])
        out.append(f)
    return out


# ---------------------------------------------------------------- the check itself


def test_partial_nan_labels_are_counted_and_refused_unless_ignore_nan():
    frames = _frames(5)
    for i in (1, 3):
        frames[i][AtomicDataDict.FORCE_KEY] = frames[i][AtomicDataDict.FORCE_KEY].clone()
        frames[i][AtomicDataDict.FORCE_KEY][0, 0] = math.nan
    with pytest.raises(ValueError, match=r"'forces_mse'.*`forces` is non-finite .* 2 of 5 frames"):
        check_training_labels(EnergyForceLoss(), frames)
    masked = mtl.EnergyForceStressLoss(ignore_nan={"forces": True})
    counts = check_training_labels(masked, frames)
    assert counts[None].frames == 5 and counts[None].nonfinite == {"forces": 2}


def test_infinite_labels_are_refused_even_with_ignore_nan():
    """nequip's `ignore_nan` masks NaN labels only: an inf label would give an inf loss.
    With `ignore_nan` (or `ignore_missing`, which implies it) a NaN force label is
    accepted, an inf one refused, naming the component, field, dataset and frames."""
    frames = _frames(4, index=0) + _frames(3, index=1)
    for i, bad in ((5, math.nan), (6, -math.inf)):  # dataset `new`: a NaN and an inf frame
        frames[i][AtomicDataDict.FORCE_KEY] = frames[i][AtomicDataDict.FORCE_KEY].clone()
        frames[i][AtomicDataDict.FORCE_KEY][0, 1] = bad
    masked = mtl.PerDatasetLoss(["pretrain", "new"], ignore_nan={"new": {"forces": True}})
    with pytest.raises(
        ValueError,
        match=r"'new/forces_mse': the label `forces` is infinite in 1 of 3 frames of training "
        r"dataset 'new'; `ignore_nan` masks NaN labels only",
    ):
        check_training_labels(masked, frames)
    frames[6][AtomicDataDict.FORCE_KEY][0, 1] = math.nan  # NaN instead: masked, accepted
    counts = check_training_labels(masked, frames)
    assert counts[1].nonfinite == {"forces": 2} and counts[1].infinite == {}
    # a dataset whose forces are all inf does not lack them: `ignore_missing` refuses too
    for f in frames[4:]:
        f[AtomicDataDict.FORCE_KEY] = torch.full_like(f[AtomicDataDict.FORCE_KEY], math.inf)
    skip = mtl.PerDatasetLoss(["pretrain", "new"], ignore_missing={"new": {"forces": True}})
    with pytest.raises(ValueError, match=r"`forces` is infinite in 3 of 3 frames of training"):
        check_training_labels(skip, frames)


def test_absent_label_is_refused_naming_component_and_field():
    frames = _frames(3)
    for f in frames:
        del f[AtomicDataDict.STRESS_KEY]
    with pytest.raises(ValueError, match=r"'stress_mse' needs the label `stress`.*absent in all 3"):
        check_training_labels(mtl.EnergyForceStressLoss(), frames)
    check_training_labels(EnergyForceLoss(), frames)  # no stress component: fine


def test_energy_only_dataset_with_forces_component_names_the_dataset():
    frames = _frames(4, index=0) + _frames(2, index=1)
    for f in frames[4:]:  # dataset `new`: energies only (NaN-filled forces in a mixed batch)
        f[AtomicDataDict.FORCE_KEY] = torch.full_like(f[AtomicDataDict.FORCE_KEY], math.nan)
    loss = mtl.PerDatasetLoss(datasets=["pretrain", "new"])
    with pytest.raises(ValueError) as err:
        check_training_labels(loss, frames)
    msg = str(err.value)
    assert "'new/forces_mse' needs the label `forces`, which training dataset 'new' lacks" in msg
    assert "all 2 of 2 frames" in msg and "pretrain" not in msg.split("\n- ", 1)[1]
    # ignore_nan alone is not enough: a dataset with no forces at all is not "partial labels"
    with pytest.raises(ValueError, match="dataset 'new' lacks"):
        check_training_labels(mtl.PerDatasetLoss(["pretrain", "new"], ignore_nan=True), frames)
    # the explicit opt-in lets the component skip that dataset
    ok = mtl.PerDatasetLoss(["pretrain", "new"], ignore_missing={"new": {"forces": True}})
    check_training_labels(ok, frames)
    # a plain component over both datasets names the dataset by the data module's names
    with pytest.raises(ValueError, match="training dataset 'new' lacks"):
        check_training_labels(EnergyForceLoss(), frames, dataset_names=["pretrain", "new"])


def test_per_dataset_loss_without_dataset_index_in_frames_is_refused():
    with pytest.raises(ValueError, match="carry no `dataset_index`.*MultiDatasetDataModule"):
        check_training_labels(mtl.PerDatasetLoss(["A", "B"]), _frames(2))


def test_ignore_missing_component_skips_an_absent_label_key_in_the_batch():
    loss = mtl.PerDatasetLoss(
        ["A"], coeffs={"total_energy": 1.0, "stress": 1.0}, ignore_missing=True
    )
    target = AtomicDataDict.batched_from_list(_frames(2, index=0))
    del target[AtomicDataDict.STRESS_KEY]
    preds = dict(target)
    preds[AtomicDataDict.STRESS_KEY] = torch.zeros(2, 3, 3, requires_grad=True)
    out = loss(preds, target)
    assert float(out["A/stress_mse"].detach()) == 0.0
    assert math.isnan(loss.metrics_values_step["A/stress_mse"])


def test_nonfinite_model_state_names_parameters_and_buffers():
    model = torch.nn.Linear(2, 2)
    model.register_buffer("scales", torch.tensor([1.0, 2.0, 3.0]))
    model.register_buffer("count", torch.tensor([3]))  # integers are never non-finite
    assert nonfinite_model_state(model) == []
    model.register_buffer("scales", torch.tensor([1.0, math.nan, math.inf]))
    with torch.no_grad():
        model.bias[1] = math.nan
    assert nonfinite_model_state(model) == [
        "bias (parameter, 1 of 2 entries non-finite)",
        "scales (buffer, 2 of 3 entries non-finite)",
    ]


# ---------------------------------------------------------------- nequip's usual setup


def _stats_setup(extra=NAN_FORCES):
    """nequip-train's order: data module set up, statistics computed with nequip's
    CommonDataStatisticsManager, model built with `${training_data_stats:forces_rms}`
    as its per-type energy scale."""
    data = pd.mixed_datamodule(
        [pd.emt(None, 8, (1, 1, 1), seed=1, extra=extra)],
        stats_manager={
            "_target_": "nequip.data.CommonDataStatisticsManager",
            "type_names": ["Cu"],
        },
    )
    data.prepare_data()
    data.setup("fit")
    stats = data.get_statistics(dataset="train")
    model = harness.model_config()
    model["per_type_energy_scales"] = {"Cu": float(stats["forces_rms"])}
    return data, model, stats


@pytest.mark.parametrize(
    "module_cls, callbacks",
    [
        (mtl.FAMOLightningModule, []),
        (mtl.UncertaintyWeightingLightningModule, []),
        (NequIPLightningModule, [CheckTrainingLabels()]),
        pytest.param(
            mtl.MultitaskLightningModule,
            [],
        ),
    ],
)
def test_nan_forces_with_usual_statistics_are_named_at_setup(tmp_path, module_cls, callbacks):
    data, model, stats = _stats_setup()
    assert math.isnan(float(stats["forces_rms"]))  # nequip's statistic is poisoned
    kwargs = harness.module_kwargs(
        model=model,
        loss={"_target_": "nequip_mtl.train.EnergyForceLoss"},
        optimizer={"_target_": "torch.optim.Adam", "lr": 0.01},
    )
    torch.manual_seed(0)
    module = module_cls(**kwargs)
    # the per-type scale is NaN, so every output is: the model state names the cause
    bad = nonfinite_model_state(module.model)
    assert bad and all("scale" in b for b in bad), bad
    tr = harness.trainer(tmp_path, callbacks=callbacks)
    with pytest.raises(ValueError) as err:
        tr.fit(module, datamodule=data)
    msg = str(err.value)
    assert "'forces_mse' needs the label `forces`" in msg
    assert "non-finite (NaN/inf) in all 8 of 8 frames" in msg
    assert "per_atom_energy_mse" not in msg
    assert tr.global_step == 0  # refused before any step


def test_finite_labels_with_usual_statistics_pass_the_check(tmp_path):
    data, model, stats = _stats_setup(extra=())
    assert math.isfinite(float(stats["forces_rms"]))
    module = NequIPLightningModule(**harness.module_kwargs(model=model))
    tr = harness.trainer(tmp_path, callbacks=[CheckTrainingLabels()], limit_train_batches=1)
    tr.fit(module, datamodule=data)
    assert tr.global_step == 1


# ---------------------------------------------------------------- labels no component trains


def _unused(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, UnusedLabelWarning)]


def _per_dataset_fit(tmp_path, module_cls, callbacks, coeffs, data=None):
    """One step of a real trainer on the two EMT Cu datasets of ``tests/_mfid.py`` (lo: 6
    training frames, hi: 4, all periodic with stress labels), loss a ``PerDatasetLoss``."""
    kwargs = harness.module_kwargs(
        model=mfid.model_config(),
        loss={"_target_": "nequip_mtl.train.PerDatasetLoss", "datasets": ["lo", "hi"],
              "coeffs": coeffs},
        val_metrics=None,
        num_datasets={"train": 1, "val": 2, "test": 0, "predict": 0},
    )  # fmt: skip
    if module_cls is mtl.MultitaskLightningModule:
        kwargs.update(tasks="datasets", aggregator={"_target_": "nequip_mtl.aggregators.UPGrad"})
    torch.manual_seed(0)
    module = module_cls(**kwargs)
    tr = harness.trainer(tmp_path, callbacks=callbacks, limit_train_batches=1, limit_val_batches=0)
    with pytest.warns() as record:
        tr.fit(module, datamodule=data or mfid.data_module())
    assert tr.global_step == 1
    return _unused(record)


EF = {"total_energy": 1.0, "forces": 1.0}
EFS = {**EF, "stress": 1.0}


@pytest.mark.parametrize(
    "module_cls, callbacks",
    [(NequIPLightningModule, [CheckTrainingLabels()]), (mtl.MultitaskLightningModule, [])],
    ids=["nequip_callback", "multitask"],
)
def test_stress_labels_of_periodic_frames_no_component_trains_are_named(
    tmp_path, module_cls, callbacks
):
    """Periodic EMT frames hold stress labels; an energy and forces loss trains none: one
    warning per dataset, naming it, the field, its frames and the key that trains it."""
    messages = _per_dataset_fit(tmp_path, module_cls, callbacks, {"lo": EF, "hi": EF})
    assert len(messages) == 2, messages
    lo, hi = sorted(messages, key=lambda m: "'hi'" in m)
    assert lo.startswith("training dataset 'lo': 6 of 6 training frames with a periodic cell")
    assert hi.startswith("training dataset 'hi': 4 of 4 training frames with a periodic cell")
    for name, msg in (("lo", lo), ("hi", hi)):
        assert "hold `stress` labels, but no loss component trains on them" in msg
        assert f"`training_module.loss.coeffs.{name}.stress`" in msg


def test_a_dataset_whose_loss_reads_stress_is_not_named(tmp_path):
    """The check is per dataset: stress trained on `lo` only leaves `hi`'s named; trained
    on both, nothing; with a zero coefficient it is read but not trained, and named."""
    fit = functools.partial(_per_dataset_fit, tmp_path, NequIPLightningModule,
                            [CheckTrainingLabels()])  # fmt: skip
    (msg,) = fit({"lo": EFS, "hi": EF})
    assert msg.startswith("training dataset 'hi': 4 of 4") and "`stress`" in msg
    assert fit({"lo": EFS, "hi": EFS}) == []
    (msg,) = fit({"lo": EFS, "hi": {**EF, "stress": 0.0}})
    assert msg.startswith("training dataset 'hi'")
    assert "(read by 'hi/stress_mse' with a coefficient of 0 or null)" in msg


def test_frames_without_the_label_or_without_a_periodic_cell_are_not_named(tmp_path):
    """No warning where no frame holds a finite stress (NaN-filled labels), nor for stress
    labels of frames without a periodic cell (pbc off), even though the loss trains none."""
    nan_stress = [{"_target_": "tests._per_dataset.NaNLabels", "field": "stress"}]
    frames = _frames(3)
    assert "stress" in frames[0] and bool(frames[0]["pbc"].all())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        check_training_labels(EnergyForceLoss(), frames)
        for f in frames:
            f[AtomicDataDict.PBC_KEY] = torch.zeros_like(f[AtomicDataDict.PBC_KEY])
        check_training_labels(EnergyForceLoss(), frames)
    (msg,) = _unused(record)  # the periodic frames only
    assert msg.startswith("the training data: 3 of 3 training frames with a periodic cell")
    assert "nequip.train.EnergyForceStressLoss" in msg
    data = pd.mixed_datamodule([pd.emt(None, 4, (1, 1, 1), seed=1, extra=nan_stress)])
    loss = harness.loss_config(EF, target="nequip.train.EnergyForceLoss")
    module = NequIPLightningModule(**harness.module_kwargs(loss=loss, val_metrics=None))
    tr = harness.trainer(
        tmp_path, callbacks=[CheckTrainingLabels()], limit_train_batches=1, limit_val_batches=0
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        tr.fit(module, data)
    assert tr.global_step == 1 and _unused(record) == []


def test_forces_and_virial_labels_no_component_trains_are_named():
    """Energy and forces count on every frame, a virial on periodic frames only; a label
    PerDatasetLoss has no coefficient for (virial) is named with where to add it."""
    frames = _frames(2, index=0) + _frames(3, index=1)
    for f in frames[:2]:
        f[AtomicDataDict.VIRIAL_KEY] = -f[AtomicDataDict.STRESS_KEY]
        f[AtomicDataDict.PBC_KEY] = torch.zeros_like(f[AtomicDataDict.PBC_KEY])
    for f in frames[2:]:
        f[AtomicDataDict.VIRIAL_KEY] = -f[AtomicDataDict.STRESS_KEY]
    frames = frames[2:] + frames[:2]  # B's frames first: the warnings still go by index
    energy_only = mtl.PerDatasetLoss(["A", "B"], coeffs={"total_energy": 1.0})
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        counts = check_training_labels(energy_only, frames)
    assert counts[0].held == {"total_energy": 2, "forces": 2}  # no periodic cell in A
    assert counts[1].held == {"total_energy": 3, "forces": 3, "stress": 3, "virial": 3}
    messages = _unused(record)
    assert [m.split(":")[0] for m in messages] == ["training dataset 'A'"] + [
        "training dataset 'B'"
    ] * 3
    fields = [re.search(r"hold `(\w+)` labels", m).group(1) for m in messages]
    assert fields == ["forces", "forces", "stress", "virial"]
    assert "2 of 2 training frames hold `forces`" in messages[0]
    assert "`training_module.loss.coeffs.B.stress`" in messages[2]
    assert "add a component on `virial` to `training_module.loss`" in messages[3]
