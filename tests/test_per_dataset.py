"""Per-dataset loss components and metrics: exactness against nequip's
own loss on each dataset's sub-batch, absent datasets, and every kind of training module
and coefficient callback."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from nequip.data import AtomicDataDict
from nequip.data.dataset import EMTTestDataset
from nequip.train import EnergyForceStressLoss, NequIPLightningModule

import nequip_mtl.train as mtl
import nequip_mtl.train.callbacks as mtl_callbacks
from nequip_mtl.data.keys import DATASET_INDEX_KEY
from tests import _harness as harness
from tests import _per_dataset as pd
from tests._harness import CoeffRecorder

ALL3 = {"total_energy": 1.0, "forces": 1.0, "stress": 1.0}


# ---------------------------------------------------------------- exactness (float64)


LABELS = (AtomicDataDict.TOTAL_ENERGY_KEY, AtomicDataDict.FORCE_KEY, AtomicDataDict.STRESS_KEY)


def _frames(index: int, n: int, supercell, seed: int) -> list[tuple[dict, dict]]:
    """(labels, predictions) of the frames of one dataset, in float64; the predictions
    are the labels plus noise."""
    ds = EMTTestDataset(transforms=[], supercell=supercell, num_frames=n, seed=seed)
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        f = {k: (v.double() if v.is_floating_point() else v) for k, v in ds[i].items()}
        f[DATASET_INDEX_KEY] = torch.tensor([index])
        p = dict(f)
        for key in LABELS:
            p[key] = f[key] + torch.randn(f[key].shape, generator=g, dtype=torch.float64)
        out.append((f, p))
    return out


def _batch(frames: list[tuple[dict, dict]], leaf: bool = False) -> tuple[dict, dict]:
    """(preds, target) of a batch of frames (predictions as leaves, when ``leaf``)."""
    target = AtomicDataDict.batched_from_list([dict(f) for f, _ in frames])
    preds = AtomicDataDict.batched_from_list([dict(p) for _, p in frames])
    for key in LABELS:
        preds[key] = preds[key].requires_grad_(leaf)
    return preds, target


A = _frames(0, 3, (2, 1, 1), seed=1)  # 8 atoms a frame
B = _frames(1, 2, (1, 1, 1), seed=2)  # 4 atoms a frame: per-frame and per-atom means differ


def _nequip_values(frames_per_batch: list[list[dict]]) -> tuple[list[dict], dict]:
    """nequip's own EnergyForceStressLoss on sub-batches: step values and epoch value."""
    ref = EnergyForceStressLoss(coeffs=ALL3)
    steps = [{k: float(v) for k, v in ref(*_batch(frames)).items()} for frames in frames_per_batch]
    return steps, {k: float(v) for k, v in ref.compute().items()}


def test_per_dataset_loss_equals_nequip_loss_on_each_datasets_sub_batch():
    loss = mtl.PerDatasetLoss(datasets=["A", "B"], coeffs=ALL3)
    mixed = [A[0], B[0], A[1], B[1], A[2]]
    only_a = [A[1], A[0]]
    step1 = loss(*_batch(mixed))
    step2 = loss(*_batch(only_a))
    epoch = loss.compute()

    a_steps, a_epoch = _nequip_values([[A[0], A[1], A[2]], only_a])
    b_steps, b_epoch = _nequip_values([[B[0], B[1]]])
    for comp in ("per_atom_energy_mse", "forces_mse", "stress_mse"):
        assert float(step1[f"A/{comp}"]) == pytest.approx(a_steps[0][comp], rel=1e-12)
        assert float(step1[f"B/{comp}"]) == pytest.approx(b_steps[0][comp], rel=1e-12)
        assert float(step2[f"A/{comp}"]) == pytest.approx(a_steps[1][comp], rel=1e-12)
        # epoch: the mean over every element of that dataset seen in the epoch
        assert float(epoch[f"A/{comp}"]) == pytest.approx(a_epoch[comp], rel=1e-12)
        # B was absent from the second batch: its epoch value is its one batch, undiluted
        assert float(epoch[f"B/{comp}"]) == pytest.approx(b_epoch[comp], rel=1e-12)
    # sanity of the reference: per-atom means really differ from per-frame means here
    assert a_steps[0]["forces_mse"] != pytest.approx(b_steps[0]["forces_mse"])


def test_absent_dataset_is_an_exact_zero_with_zero_gradient_and_nan_step_value():
    loss = mtl.PerDatasetLoss(datasets=["A", "B"], coeffs=ALL3)
    preds, target = _batch([A[0], A[1]], leaf=True)
    out = loss(preds, target)
    leaves = [preds[k] for k in ("total_energy", "forces", "stress")]
    for comp in ("per_atom_energy_mse", "forces_mse", "stress_mse"):
        value = out[f"B/{comp}"]
        assert float(value.detach()) == 0.0 and value.requires_grad
        grads = torch.autograd.grad(value, leaves, retain_graph=True, allow_unused=True)
        assert all(g is None or bool((g == 0).all()) for g in grads)
        assert any(g is not None for g in grads)  # connected, so a backward pass works
        # not observed on this step (what the loss-history callbacks skip)
        assert math.isnan(loss.metrics_values_step[f"B/{comp}"])
        assert loss.metrics_values_step[f"A/{comp}"] > 0
    # the weighted sum is finite: each of the 6 coefficients is 1/6
    expected = sum(
        float(out[f"A/{c}"].detach()) for c in ("per_atom_energy_mse", "forces_mse", "stress_mse")
    )
    assert float(out["weighted_sum"]) == pytest.approx(expected / 6, rel=1e-12)
    # an epoch without B: its components are NaN (nothing to average), left out of the sum
    epoch = loss.compute()
    assert math.isnan(float(epoch["B/forces_mse"]))
    assert float(epoch["weighted_sum"]) == pytest.approx(expected / 6, rel=1e-12)


def test_components_are_named_per_dataset_and_configurable_per_dataset():
    loss = mtl.PerDatasetLoss(
        datasets=["pretrain", "new"],
        coeffs={"pretrain": {"total_energy": 1.0, "forces": 3.0}, "new": {"forces": 1.0}},
        per_atom_energy=False,
    )
    coeffs = {k: e.coeff for k, e in loss.entries.items()}
    assert coeffs == {
        "pretrain/total_energy_mse": pytest.approx(0.2),
        "pretrain/forces_mse": pytest.approx(0.6),
        "new/forces_mse": pytest.approx(0.2),
    }


def test_ignore_missing_also_masks_the_nan_labels_of_that_component():
    """A dataset without stresses holds NaN stress labels once batched with frames that
    have them: `ignore_missing` for B's stress masks them, so B/stress_mse is the exact 0
    of an empty selection and the weighted sum is A's three components and B's other two
    (equal coefficients 1/6); A's stress component, without the flag, keeps unmasked.

    Fails if ``ignore_missing`` does not imply ``ignore_nan`` for its component (``or
    skip`` dropped in ``_expand``): B/stress_mse and the weighted sum are NaN."""
    loss = mtl.PerDatasetLoss(
        datasets=["A", "B"], coeffs=ALL3, ignore_missing={"B": {"stress": True}}
    )
    assert loss.entries["B/stress_mse"].ignore_nan and not loss.entries["A/stress_mse"].ignore_nan
    b = [(dict(f, stress=torch.full_like(f["stress"], math.nan)), p) for f, p in B]
    out = loss(*_batch([A[0], b[0], A[1], b[1]]))
    assert float(out["B/stress_mse"].detach()) == 0.0
    comps = ("per_atom_energy_mse", "forces_mse", "stress_mse")
    terms = [f"A/{c}" for c in comps] + ["B/per_atom_energy_mse", "B/forces_mse"]
    expected = sum(float(out[t].detach()) for t in terms) / 6
    assert float(out["weighted_sum"].detach()) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"datasets": "A"}, "non-empty list of dataset names"),
        ({"datasets": ["A", "A"]}, "duplicate names \\['A'\\]"),
        ({"datasets": ["A", ""]}, "must be non-empty"),
        ({"datasets": ["A"], "coeffs": {"force": 1.0}}, "unknown keys: \\['force'\\]"),
        ({"datasets": ["A"], "coeffs": {"A": {"forces": -1.0}}}, "finite and >= 0"),
        ({"datasets": ["A", "B"], "coeffs": {"A": {"forces": 1.0}}}, "dataset 'B' has no comp"),
        ({"datasets": ["A"], "coeffs": {"A": {"forces": 0.0}}}, "must be positive"),
        ({"datasets": ["A"], "ignore_nan": {"A": {"forces": "yes"}}}, "true/false"),
    ],
)
def test_bad_config_is_refused_with_the_key(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        mtl.PerDatasetLoss(**kwargs)


def test_per_dataset_metrics_mae_rmse_match_nequip_on_sub_batches():
    from nequip.train import EnergyForceStressMetrics

    metrics = mtl.PerDatasetMetrics(datasets=["A", "B"], fields=["total_energy", "forces"])
    out = metrics(*_batch([A[0], B[0], A[1]]))
    ref = EnergyForceStressMetrics(
        coeffs={"per_atom_energy_rmse": 1.0, "per_atom_energy_mae": None, "forces_rmse": None}
    )(*_batch([B[0]]))
    for comp in ("per_atom_energy_rmse", "per_atom_energy_mae", "forces_rmse", "forces_mae"):
        assert float(out[f"B/{comp}"]) == pytest.approx(float(ref[comp]), rel=1e-12)


def test_batch_without_dataset_index_names_the_data_module():
    loss = mtl.PerDatasetLoss(datasets=["A", "B"])
    preds, target = _batch([A[0]])
    del target[DATASET_INDEX_KEY]
    with pytest.raises(KeyError, match="MultiDatasetDataModule"):
        loss(preds, target)


# ---------------------------------------------------------------- real training


def _module_kwargs(loss: dict, lr: float = 0.01, optimizer: str = "torch.optim.SGD") -> dict:
    return harness.module_kwargs(
        loss=loss,
        optimizer={"_target_": optimizer, "lr": lr},
        val_metrics={"_target_": "nequip_mtl.train.PerDatasetMetrics", "datasets": ["A", "B"]},
    )


def _fit(module, tmp_path, data=None, callbacks=(), max_epochs=1, **kw):
    tr = harness.trainer(tmp_path, max_epochs=max_epochs, callbacks=list(callbacks), **kw)
    tr.fit(module, datamodule=data or pd.mixed_datamodule(pd.two_datasets()))
    return tr


PER_DATASET = {
    "_target_": "nequip_mtl.train.PerDatasetLoss",
    "datasets": ["A", "B"],
    "coeffs": {"total_energy": 1.0, "forces": 1.0},
}


def test_nequip_module_weighted_sum_on_a_batch_without_b_equals_nequip_loss_of_a(tmp_path):
    """First batch holds A only: the per-dataset weighted sum is (L_e + L_f)/4, nequip's
    EnergyForceLoss is (L_e + L_f)/2, so SGD with twice the learning rate takes the same
    step: nequip's own classes side by side."""
    torch.manual_seed(0)
    ours = NequIPLightningModule(**_module_kwargs(PER_DATASET, lr=0.02))
    _fit(ours, tmp_path, limit_train_batches=1)
    torch.manual_seed(0)
    plain = NequIPLightningModule(
        **_module_kwargs(
            {"_target_": "nequip.train.EnergyForceLoss", "coeffs": PER_DATASET["coeffs"]},
            lr=0.01,
        )
    )
    _fit(plain, tmp_path, limit_train_batches=1)
    p0 = harness.params(NequIPLightningModule(**_module_kwargs(PER_DATASET)))
    assert not torch.equal(harness.params(ours), p0)  # it trained
    torch.testing.assert_close(harness.params(ours), harness.params(plain), rtol=1e-10, atol=0)


def test_nequip_module_batch_without_the_only_trained_dataset_is_a_zero_step(tmp_path):
    """Only B's components have coefficients; the first batch holds A only: the weighted
    sum is an exact 0 that still back-propagates (no "does not require grad" error) and
    plain SGD leaves every parameter as it was."""
    loss = dict(PER_DATASET, coeffs={"A": {"total_energy": None}, "B": {"forces": 1.0}})
    torch.manual_seed(0)
    module = NequIPLightningModule(**_module_kwargs(loss))
    before = harness.params(module)
    _fit(module, tmp_path, limit_train_batches=1)
    assert torch.equal(harness.params(module), before)
    # the second batch has B: it trains
    _fit(module, tmp_path, limit_train_batches=2)
    assert not torch.equal(harness.params(module), before)


class _Applied(Callback):
    def __init__(self):
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(dict(pl_module.applied_task_weights))


def test_multitask_module_drops_absent_dataset_tasks_without_nan_or_skip(tmp_path):
    torch.manual_seed(0)
    module = mtl.MultitaskLightningModule(
        aggregator={"_target_": "nequip_mtl.aggregators.UPGrad"},
        **_module_kwargs(PER_DATASET, optimizer="torch.optim.Adam"),
    )
    applied = _Applied()
    with pytest.warns(RuntimeWarning, match="zero gradient"):
        _fit(module, tmp_path, callbacks=[applied])
    assert module.skipped_steps == 0
    assert torch.isfinite(harness.params(module)).all()
    # batch 1: A only -> only A's tasks enter the update; batch 2: all four
    assert sorted(applied.steps[0]) == ["A/forces_mse", "A/per_atom_energy_mse"]
    assert sorted(applied.steps[1]) == sorted(
        ["A/forces_mse", "A/per_atom_energy_mse", "B/forces_mse", "B/per_atom_energy_mse"]
    )


def test_coefficient_callbacks_address_per_dataset_components(tmp_path):
    from nequip.train.callbacks import LossCoefficientScheduler as NequipScheduler

    torch.manual_seed(0)
    module = NequIPLightningModule(**_module_kwargs(PER_DATASET))
    rec = CoeffRecorder()
    ours = mtl_callbacks.LossCoefficientScheduler(schedule={1: {"B/forces_mse": 3.0}})
    _fit(module, tmp_path, callbacks=[ours, rec], max_epochs=2)
    by_step = rec.by_step()
    assert by_step[0]["B/forces_mse"] == pytest.approx(0.25)
    # a partial update: the other three keep their normalised 1/4 each -> 3 / (3/4 + 3)
    assert by_step[2]["B/forces_mse"] == pytest.approx(0.8)
    assert by_step[2]["A/forces_mse"] == pytest.approx(0.25 / 3.75)

    torch.manual_seed(0)
    module = NequIPLightningModule(**_module_kwargs(PER_DATASET))
    rec = CoeffRecorder()
    theirs = NequipScheduler(
        schedule={
            1: {
                "A/per_atom_energy_mse": 1.0,
                "A/forces_mse": 1.0,
                "B/per_atom_energy_mse": 1.0,
                "B/forces_mse": 3.0,
            }
        }
    )
    _fit(module, tmp_path, callbacks=[theirs, rec], max_epochs=2)
    assert rec.by_step()[2]["B/forces_mse"] == pytest.approx(0.5)  # 3 / (1 + 1 + 1 + 3)


def test_softadapt_batch_interval_skips_steps_without_a_dataset(tmp_path):
    """SoftAdapt observes step losses; the A-only steps have NaN (not 0) for B, which its
    history skips, so the coefficients stay finite and B's is not driven by fake zeros."""
    torch.manual_seed(0)
    module = mtl.MultitaskLightningModule(
        aggregator={"_target_": "nequip_mtl.aggregators.Sum"},
        **_module_kwargs(PER_DATASET, optimizer="torch.optim.Adam"),
    )
    cb = mtl_callbacks.SoftAdapt(beta=1.0, interval="batch", frequency=1)
    rec = CoeffRecorder()
    with pytest.warns(RuntimeWarning, match="zero gradient"):
        _fit(module, tmp_path, callbacks=[cb, rec], max_epochs=3)
    for _, coeffs in rec.records:
        assert all(v is not None and math.isfinite(v) for v in coeffs.values())
    assert cb.num_updates > 0


# ---------------------------------------------------------------- the docs page


def _yaml_blocks(page: str) -> tuple[list[dict], str]:
    import re
    from pathlib import Path

    import yaml

    text = (Path(__file__).resolve().parents[1] / "docs" / page).read_text()
    return [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)], text


def test_docs_snippets_build_the_components_the_page_names():
    from hydra.utils import instantiate

    blocks, text = _yaml_blocks("per_dataset_losses.md")
    module = blocks[0]["training_module"]
    loss = instantiate(module["loss"])
    named = [
        "pretrain/per_atom_energy_mse",
        "pretrain/forces_mse",
        "new/per_atom_energy_mse",
        "new/forces_mse",
        "new/stress_mse",
    ]
    assert list(loss.entries) == named
    assert all(f"`{n}`" in text for n in named)
    metrics = instantiate(module["val_metrics"])
    assert "new/forces_rmse" in metrics.entries and "pretrain/per_atom_energy_mae" in metrics
    instantiate(module["aggregator"])
    (callback,) = [instantiate(c) for c in blocks[1]["trainer"]["callbacks"]]
    assert isinstance(callback, mtl_callbacks.CheckTrainingLabels)


# ---------------------------------------------------------------- DDP (gloo, 2 ranks)


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        loss = mtl.PerDatasetLoss(datasets=["A", "B"], coeffs=ALL3)
        for metric in loss.values():
            metric.dist_sync_on_step = True  # what NequIPLightningModule sets for the loss
        # step 1: B only on rank 0; step 2: no B on any rank
        step1 = loss(*_batch([A[0], B[0]] if rank == 0 else [A[1], A[2]]))
        step2 = loss(*_batch([A[0]] if rank == 0 else [A[1]]))
        epoch = loss.compute()
        record = {
            "step1": {k: float(v.detach()) for k, v in step1.items()},
            "step2": {k: float(v.detach()) for k, v in step2.items()},
            "epoch": {k: float(v) for k, v in epoch.items()},
        }
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(record, f)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_two_ranks_give_the_global_batch_values_and_agree_on_absent_datasets(tmp_path):
    import json
    import time

    import torch.multiprocessing as mp

    from tests._ddp import free_port

    ctx = mp.spawn(_ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:  # ranks waiting in mismatched collectives
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("the two ranks hung: they did not take the same collective calls")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    ref = mtl.PerDatasetLoss(datasets=["A", "B"], coeffs=ALL3)
    expected = {
        "step1": {k: float(v) for k, v in ref(*_batch([A[0], B[0], A[1], A[2]])).items()},
        "step2": {k: float(v) for k, v in ref(*_batch([A[0], A[1]])).items()},
    }
    expected["epoch"] = {k: float(v) for k, v in ref.compute().items()}
    for got in ranks:
        for when in ("step1", "step2", "epoch"):
            assert got[when] == pytest.approx(expected[when], rel=1e-12), when
    assert ranks[0]["step2"]["B/forces_mse"] == 0.0  # absent everywhere: 0, no deadlock
