"""The forgetting budget (``ForgettingBudget``) on real NequIP models and Lightning trainers.

Checked against independent computations in the same process: the reference is the
pretrained model's replay loss computed by hand (per-atom energy and force MSE over the
replayed frames); every step's coefficients are those a :class:`DualAscentMultiplier`
fed with the ratios of the recorded step losses gives (the multiplier's own maths is
checked on closed forms in ``tests/unit/test_budget_multiplier.py``); a resumed run equals
the uninterrupted one; bad settings are refused before any step.
"""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from nequip.data import AtomicDataDict
from nequip.train import NequIPLightningModule

import nequip_mtl.train as mtl
from nequip_mtl.data.keys import DATASET_INDEX_KEY
from nequip_mtl.train.callbacks import ForgettingBudget
from nequip_mtl.weighting.budget import DualAscentMultiplier
from tests._harness import (
    SPECS,
    STATS,
    emt,
    multi,
    params,
    skip_inductor_under_default_capability,
    trainer,
)
from tests.test_dataset_tasks import BALANCED, COEFFS, kwargs, loss

#: the ratio from the training batches, paired with the pretrained model's loss on them
BUDGET = {"dataset": "a", "tolerance": 0.01, "every": 1, "step_size": 20.0, "ratio_frames": None}
#: the batch ratio over the pretrained model's mean loss on the reference's frames, unpaired
UNPAIRED_BUDGET = {**BUDGET, "paired": False}
#: the ratio measured on the first three replayed training frames, every second step
FRAMES_BUDGET = {**BUDGET, "every": 2, "ratio_frames": 3}


class Recorder(Callback):
    """Per micro-batch: the loss coefficients it trained with, and its step losses."""

    def __init__(self):
        self.coeffs, self.values, self.replayed = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.coeffs.append({n: e.coeff for n, e in pl_module.loss.entries.items()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(dict(pl_module.loss.metrics_values_step))
        rows = batch[DATASET_INDEX_KEY].reshape(-1).tolist()  # the frames of dataset `a`
        frames = [AtomicDataDict.frame_from_batched(batch, i) for i, d in enumerate(rows) if d == 0]
        self.replayed.append(frames)


def run(
    root,
    module_cls=NequIPLightningModule,
    budget=None,
    epochs=3,
    ckpt=None,
    ckpt_path=None,
    model=None,
    extra_callbacks=(),
    data=None,
    first_callbacks=(),
    **trainer_kw,
):
    torch.manual_seed(0)
    extra = {} if model is None else {"model": model}
    module = module_cls(**kwargs(optimizer={"_target_": "torch.optim.Adam", "lr": 0.02}, **extra))
    start = copy.deepcopy(module)
    cb, rec = ForgettingBudget(**(budget or BUDGET)), Recorder()
    callbacks = [*first_callbacks, cb, rec, *extra_callbacks, *([ckpt] if ckpt else [])]
    tr = trainer(
        root,
        max_epochs=epochs,
        callbacks=callbacks,
        limit_val_batches=0,
        enable_checkpointing=ckpt is not None,
        **trainer_kw,
    )
    data = data or multi(sampling=BALANCED)
    tr.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, start, cb, rec, data, tr


def _by_hand(model, frames, coeffs) -> float:
    """The replay components' loss by hand: sum_c coeff_c * MSE_c over all ``frames``."""
    parts = _parts_by_hand(model, frames, coeffs)
    return float(parts["per_atom_energy_mse"] + parts["forces_mse"])


def _parts_by_hand(model, frames, coeffs) -> dict[str, float]:
    """Each replay component's ``coeff_c * MSE_c`` over all ``frames``, by hand."""
    energy, forces = [], []
    for frame in frames:
        out = model(AtomicDataDict.batched_from_list([frame]))
        n = frame[AtomicDataDict.POSITIONS_KEY].shape[0]
        e_true = frame[AtomicDataDict.TOTAL_ENERGY_KEY].reshape(-1)
        energy.append(((out[AtomicDataDict.TOTAL_ENERGY_KEY].reshape(-1) - e_true) / n).detach())
        forces.append((out[AtomicDataDict.FORCE_KEY] - frame[AtomicDataDict.FORCE_KEY]).detach())
    e_mse = torch.cat(energy).pow(2).mean()
    f_mse = torch.cat(forces).pow(2).mean()
    return {"per_atom_energy_mse": float(coeffs["a/per_atom_energy_mse"] * e_mse),
            "forces_mse": float(coeffs["a/forces_mse"] * f_mse)}  # fmt: skip


@pytest.mark.parametrize("accumulate, proportional", [(1, 0.0), (2, 0.0), (2, 1.5)])
def test_the_replay_weight_is_the_multiplier_of_the_budget(tmp_path, accumulate, proportional):
    """Plain dual ascent, with gradient accumulation, and the PI controller
    (``proportional``); the ratio of each batch unpaired (``paired: false``): its replay
    loss over the reference."""
    budget = {**UNPAIRED_BUDGET, "proportional": proportional}
    module, start, cb, rec, data, tr = run(
        tmp_path, budget=budget, accumulate_grad_batches=accumulate
    )
    base = {n: c for n, c in rec.coeffs[0].items()}
    # the reference: the pretrained model's replay loss on the replayed training frames
    fresh = multi(sampling=BALANCED)  # the same split (the data module frees its own)
    fresh.prepare_data()
    fresh.setup("fit")
    (replayed,) = [d for d in fresh.train_dataset if d.index == 0]
    frames = [replayed[i] for i in range(len(replayed))]
    assert cb.reference == pytest.approx(_by_hand(start, frames, base), rel=1e-10)
    # every micro-batch trained with the coefficients the multiplier gives
    dual = DualAscentMultiplier(1.01, every=1, step_size=20.0, proportional=proportional)
    replay = ["a/per_atom_energy_mse", "a/forces_mse"]
    for i, (coeffs, values) in enumerate(zip(rec.coeffs, rec.values)):
        scaled = {n: (c * dual.multiplier if n in replay else c) for n, c in base.items()}
        total = sum(scaled.values())
        assert coeffs == pytest.approx({n: c / total for n, c in scaled.items()}, rel=1e-12)
        dual.observe(sum(base[n] * values[n] for n in replay) / cb.reference)
        if (i + 1) % accumulate == 0:
            dual.step()
    assert cb.dual.state_dict() == pytest.approx(dual.state_dict(), rel=1e-12, nan_ok=True)
    assert dual.updates >= 4 and dual.multiplier != 1.0  # the budget acted
    assert tr.global_step == len(rec.coeffs) // accumulate
    # when training ended: the trained model's replay loss on the same frames, by hand
    final = _by_hand(module, frames, base) / cb.reference
    assert cb.final_ratio == pytest.approx(final, rel=1e-10)
    assert abs(final - 1.0) > 1e-3  # training moved it: the check can fail


def rattled(tmp_path):
    """``multi()``'s two datasets with a distinct structure in every frame (nequip's
    ``EMTTestDataset`` gives every frame of a dataset the same positions: they share one
    array), rattled Cu cells labelled by EMT, as extxyz files read by nequip's
    ``ASEDataset``."""
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    from nequip_mtl.data import MultiDatasetDataModule

    rng, datasets = np.random.default_rng(7), {}
    for name, (_, train, val) in SPECS.items():
        if name == "c":
            continue
        frames = []
        for _ in range(train + val):
            atoms = bulk("Cu", "fcc", orthorhombic=True)
            atoms.positions += rng.normal(0.0, 0.1, atoms.positions.shape)
            atoms.calc = EMT()
            labels = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces(),
                      "stress": atoms.get_stress()}  # fmt: skip
            atoms.calc = SinglePointCalculator(atoms, **labels)
            frames.append(atoms)
        write(tmp_path / f"{name}.xyz", frames)
        dataset = {"_target_": "nequip.data.dataset.ASEDataset",
                   "file_path": str(tmp_path / f"{name}.xyz"), "transforms": emt(0, 1)["transforms"]}  # fmt: skip
        datasets[name] = {"split_dataset": {"dataset": dataset, "train": train, "val": val}}
    return lambda: MultiDatasetDataModule(
        seed=5, datasets=datasets, sampling=BALANCED, stats_manager=STATS,
        train_dataloader={"batch_size": 3}, val_dataloader={"batch_size": 4},
    )  # fmt: skip


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_paired_ratio_is_each_batchs_loss_over_the_pretrained_models_on_its_frames(
    tmp_path, accumulate
):
    """The default: every micro-batch's replay loss over the pretrained model's loss on the
    same replayed frames (that model run by hand on them), the window's ratio of the summed
    losses; a micro-batch without replayed frames is not observed. Mutations that fail it:
    the batch ratio over the reference (``paired: false``'s), the plain mean of the batch
    ratios (no weights), another frame's recorded predictions (``frame_index`` off by
    one)."""
    data = rattled(tmp_path)
    module, start, cb, rec, _, tr = run(tmp_path, accumulate_grad_batches=accumulate, data=data())
    frames = _replayed_frames(data())
    assert cb.paired and len(cb.pretrained) == len(frames)
    # the reference, from the recorded predictions: the pretrained model's loss by hand
    assert cb.reference == pytest.approx(_by_hand(start, frames, rec.coeffs[0]), rel=1e-10)
    positions = [f[AtomicDataDict.POSITIONS_KEY] for f in frames]
    assert not torch.equal(positions[0], positions[1])  # the frames differ
    base = rec.coeffs[0]
    replay = ["a/per_atom_energy_mse", "a/forces_mse"]
    dual = DualAscentMultiplier(1.01, every=1, step_size=20.0)
    observed = 0
    for i, (coeffs, values, frames) in enumerate(zip(rec.coeffs, rec.values, rec.replayed)):
        scaled = {n: (c * dual.multiplier if n in replay else c) for n, c in base.items()}
        total = sum(scaled.values())
        assert coeffs == pytest.approx({n: c / total for n, c in scaled.items()}, rel=1e-12)
        if frames:
            before = _by_hand(start, frames, base)
            dual.observe(sum(base[n] * values[n] for n in replay) / before, weight=before)
            observed += 1
        if (i + 1) % accumulate == 0:
            dual.step()
    assert observed >= 4
    assert cb.dual.state_dict() == pytest.approx(dual.state_dict(), rel=1e-9, nan_ok=True)
    assert dual.updates >= 4 and dual.multiplier != 1.0  # the budget acted


@pytest.mark.parametrize(
    "budget",
    [
        BUDGET,
        UNPAIRED_BUDGET,
        FRAMES_BUDGET,
        {**BUDGET, "each_component": True},
        {**FRAMES_BUDGET, "tolerance": 0.5, "step_size": 2.0, "sample_replay": True},
    ],
    ids=["paired", "batches", "frames", "each_paired", "sampled"],
)
def test_a_resumed_budget_continues_exactly(tmp_path, budget):
    """Interrupted mid-run and resumed: the reference is restored, not re-measured on the
    fine-tuned model, and the multiplier, the coefficients and the parameters equal the
    uninterrupted run's."""
    full, _, full_cb, full_rec, _, _ = run(tmp_path / "full", budget=budget)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "part"), save_last=True, every_n_train_steps=3)
    run(tmp_path / "part", budget=budget, ckpt=ckpt, max_steps=3)
    resumed, _, cb, rec, _, tr = run(
        tmp_path / "resumed", budget=budget, ckpt_path=str(tmp_path / "part" / "last.ckpt")
    )
    assert cb.references == full_cb.references
    assert cb.ratio_references == full_cb.ratio_references
    assert {g: d.state_dict() for g, d in cb.duals.items()} == {
        g: d.state_dict() for g, d in full_cb.duals.items()
    }
    assert cb.final_ratio == pytest.approx(full_cb.final_ratio, rel=1e-10)
    assert rec.coeffs == full_rec.coeffs[-len(rec.coeffs) :]
    torch.testing.assert_close(params(resumed), params(full), rtol=0, atol=1e-12)


class ModelStates(Callback):
    """The model's parameters after every micro-batch (after the budget's hook)."""

    def __init__(self):
        self.states = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.states.append(copy.deepcopy(pl_module.model.state_dict()))


def _replayed_frames(data=None):
    fresh = data or multi(sampling=BALANCED)  # the split (the data module frees its own)
    fresh.prepare_data()
    fresh.setup("fit")
    (replayed,) = [d for d in fresh.train_dataset if d.index == 0]
    return [replayed[i] for i in range(len(replayed))]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_fixed_frame_ratio_is_the_constraint_at_the_current_parameters(tmp_path, accumulate):
    """``ratio_frames``: at every ``every``-th optimizer step the ratio is the replay loss
    of the model just stepped on the first frames, by hand, over the pretrained model's on
    the same frames; the batches are not observed."""
    states = ModelStates()
    module, start, cb, rec, data, tr = run(
        tmp_path, budget=FRAMES_BUDGET, accumulate_grad_batches=accumulate,
        extra_callbacks=[states],
    )  # fmt: skip
    base, frames = rec.coeffs[0], _replayed_frames()[:3]
    assert cb.ratio_reference == pytest.approx(_by_hand(start, frames, base), rel=1e-10)
    assert cb.reference == pytest.approx(_by_hand(start, _replayed_frames(), base), rel=1e-10)
    assert cb.ratio_reference != pytest.approx(cb.reference, rel=1e-3)  # other frames
    dual = DualAscentMultiplier(1.01, every=2, step_size=20.0)
    replay = ["a/per_atom_energy_mse", "a/forces_mse"]
    model = copy.deepcopy(start)
    for i, (coeffs, state) in enumerate(zip(rec.coeffs, states.states)):
        scaled = {n: (c * dual.multiplier if n in replay else c) for n, c in base.items()}
        total = sum(scaled.values())
        assert coeffs == pytest.approx({n: c / total for n, c in scaled.items()}, rel=1e-12)
        if (i + 1) % accumulate == 0:  # an optimizer step
            if (dual.steps + 1) % 2 == 0:
                model.model.load_state_dict(state)
                dual.observe(_by_hand(model, frames, base) / cb.ratio_reference)
            dual.step()
    assert cb.dual.state_dict() == pytest.approx(dual.state_dict(), rel=1e-10, nan_ok=True)
    assert dual.updates >= 3 and dual.multiplier != 1.0  # the budget acted


EACH = {**FRAMES_BUDGET, "each_component": True}


@pytest.mark.parametrize("accumulate", [1, 2])
def test_each_component_is_bounded_with_its_own_multiplier(tmp_path, accumulate):
    """``each_component``: the energy and the force loss of the replayed dataset each have
    their reference (by hand), their ratio on the fixed frames at every update (by hand, the
    model just stepped) and their multiplier, which scales that component's coefficient
    only; the final ratio is the larger component's. Mutations that fail it: one multiplier
    for both (the sum's ratio), a component's coefficient scaled by the other's multiplier,
    the final ratio of the sum."""
    states = ModelStates()
    module, start, cb, rec, data, tr = run(
        tmp_path, budget=EACH, accumulate_grad_batches=accumulate, extra_callbacks=[states]
    )
    base, frames = rec.coeffs[0], _replayed_frames()
    parts = ["per_atom_energy_mse", "forces_mse"]
    assert cb.groups == {p: [f"a/{p}"] for p in parts}
    assert cb.references == pytest.approx(_parts_by_hand(start, frames, base), rel=1e-10)
    assert cb.ratio_references == pytest.approx(_parts_by_hand(start, frames[:3], base), rel=1e-10)
    duals = {p: DualAscentMultiplier(1.01, every=2, step_size=20.0) for p in parts}
    model = copy.deepcopy(start)
    for i, (coeffs, state) in enumerate(zip(rec.coeffs, states.states)):
        scaled = {n: c * duals[n[2:]].multiplier if n.startswith("a/") else c
                  for n, c in base.items()}  # fmt: skip
        total = sum(scaled.values())
        assert coeffs == pytest.approx({n: c / total for n, c in scaled.items()}, rel=1e-12)
        if (i + 1) % accumulate == 0:  # an optimizer step
            if (duals[parts[0]].steps + 1) % 2 == 0:
                model.model.load_state_dict(state)
                now = _parts_by_hand(model, frames[:3], base)
                for p in parts:
                    duals[p].observe(now[p] / cb.ratio_references[p])
            for dual in duals.values():
                dual.step()
    for p in parts:
        assert cb.duals[p].state_dict() == pytest.approx(duals[p].state_dict(), rel=1e-9)
    multipliers = [d.multiplier for d in duals.values()]
    assert duals[parts[0]].updates >= 3 and multipliers[0] != pytest.approx(multipliers[1])
    final = _parts_by_hand(module, frames, base)
    assert cb.final_ratios == pytest.approx({p: final[p] / cb.references[p] for p in parts})
    assert cb.final_ratio == max(cb.final_ratios.values())


def test_a_checkpoint_of_one_bound_resumes_only_with_one(tmp_path):
    """A budget's state from before ``each_component`` (one ``dual``) loads as the bound on
    the replay loss; a checkpoint of one bound resumed with ``each_component`` is refused,
    naming the setting."""
    cb = ForgettingBudget(**BUDGET)
    cb.duals["loss"].observe(2.0)
    cb.duals["loss"].update()
    old = {"dual": cb.duals["loss"].state_dict(), "reference": 0.5, "ratio_reference": None,
           "base_coeffs": {"a/forces_mse": 1.0}, "final_ratio": 1.02}  # fmt: skip
    again = ForgettingBudget(**BUDGET)
    again.load_state_dict(old)
    assert again.dual.state_dict() == cb.dual.state_dict()
    assert (again.reference, again.ratio_reference, again.final_ratio) == (0.5, None, 1.02)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "part"), save_last=True, every_n_train_steps=3)
    run(tmp_path / "part", budget=FRAMES_BUDGET, ckpt=ckpt, max_steps=3)
    with pytest.raises(ValueError, match=r"bounds \['loss'\], this one.*each_component=True"):
        run(tmp_path / "on", budget=EACH, ckpt_path=str(tmp_path / "part" / "last.ckpt"))


def test_a_fixed_frame_budget_refuses_a_checkpoint_of_batch_ratios(tmp_path):
    """Resuming a batch-ratio budget with ``ratio_frames``: the pretrained model's loss on
    the fixed frames cannot be measured any more; refused, naming the way out."""
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "part"), save_last=True, every_n_train_steps=3)
    run(tmp_path / "part", ckpt=ckpt, max_steps=3)
    with pytest.raises(ValueError, match="ratio_frames=3.*resume with `ratio_frames: null`"):
        run(tmp_path / "on", budget=FRAMES_BUDGET,
            ckpt_path=str(tmp_path / "part" / "last.ckpt"))  # fmt: skip


def test_the_budget_works_with_an_aggregation_module(tmp_path):
    module, _, cb, rec, _, tr = run(tmp_path, module_cls=mtl.MultitaskLightningModule, epochs=2)
    assert cb.dual.updates >= 4 and module.skipped_steps == 0
    assert len({round(c["a/forces_mse"], 12) for c in rec.coeffs}) > 1


def test_sampled_replay_works_with_an_aggregation_module(tmp_path):
    """Dataset tasks on batches that dropped their replayed frames: no step skipped, the
    replayed frames trained in some batches and not in others."""
    module, _, cb, rec, _, tr = run(
        tmp_path, module_cls=mtl.MultitaskLightningModule, budget=SAMPLED, epochs=2
    )
    assert module.skipped_steps == 0 and cb.replay_probability < 1.0
    assert {len(f) == 0 for f in rec.replayed} == {True, False}


@pytest.mark.parametrize(
    "budget, data, match",
    [
        ({"dataset": "x", "tolerance": 0.1}, None, r"dataset is 'x'.*\['a', 'b'\]"),
        ({"dataset": "c", "tolerance": 0.1}, ("a", "b", "c"), "'c' is not replayed"),
        ({"dataset": "a", "tolerance": 0.1}, ("a",), "only training dataset"),
    ],
)
def test_a_budget_on_a_dataset_that_is_not_replayed_is_refused_before_any_step(
    tmp_path, budget, data, match
):
    torch.manual_seed(0)
    names = data or ("a", "b")
    # `c` is computed but not trained on (null coefficients): not replayed
    coeffs = {**COEFFS, "c": {"total_energy": None, "forces": None}}
    module = NequIPLightningModule(**kwargs(loss=loss(names, coeffs)))
    tr = trainer(tmp_path, callbacks=[ForgettingBudget(**budget)], limit_val_batches=0)
    with pytest.raises(ValueError, match=match):
        tr.fit(module, datamodule=multi(names, sampling={"mode": "proportional"}))
    assert tr.global_step == 0


@pytest.mark.parametrize("tolerance", [0.0, -0.05])
def test_a_tolerance_that_is_not_positive_is_refused(tolerance):
    with pytest.raises(ValueError, match="ForgettingBudget: `tolerance` must be a number > 0"):
        ForgettingBudget(dataset="a", tolerance=tolerance)
    with pytest.raises(ValueError, match="ForgettingBudget: `limit` must be a number > 0"):
        ForgettingBudget(dataset="a", limit=tolerance)
    with pytest.raises(ValueError, match="exactly one of `tolerance`.*and `limit`"):
        ForgettingBudget(dataset="a", tolerance=0.1, limit=1.0)
    for frames in (0, True, 2.5):
        with pytest.raises(ValueError, match="ratio_frames must be an integer >= 1"):
            ForgettingBudget(dataset="a", tolerance=0.1, ratio_frames=frames)
    with pytest.raises(ValueError, match=r"ratio_frames \(65\) must be at most reference_frames"):
        ForgettingBudget(dataset="a", tolerance=0.1, ratio_frames=65, reference_frames=64)


def test_settings_that_do_not_combine_are_refused():
    with pytest.raises(ValueError, match=r"each_component bounds each.*`limit` \(0.5\)"):
        ForgettingBudget(dataset="a", limit=0.5, each_component=True)
    with pytest.raises(ValueError, match="each_component must be true or false, got 'yes'"):
        ForgettingBudget(dataset="a", tolerance=0.1, each_component="yes")
    with pytest.raises(ValueError, match=r"paired.*not with `limit` \(got 0.5\)"):
        ForgettingBudget(dataset="a", limit=0.5, paired=True)
    with pytest.raises(ValueError, match=r"paired.*`ratio_frames` \(got 3;"):
        ForgettingBudget(dataset="a", tolerance=0.1, ratio_frames=3, paired=True)
    with pytest.raises(ValueError, match="paired must be true or false, got 1"):
        ForgettingBudget(dataset="a", tolerance=0.1, paired=1)
    with pytest.raises(ValueError, match=r"ratio_frames must be .*`all`.*or null.*got 'some'"):
        ForgettingBudget(dataset="a", tolerance=0.1, ratio_frames="some")
    with pytest.raises(ValueError, match=r"`ratio_frames: null` measures on batches"):
        ForgettingBudget(dataset="a", tolerance=0.1, paired=True)  # ratio_frames: all


def test_by_default_the_ratio_is_measured_on_the_references_frames():
    """The setting that held the bound in the benchmark: every update on all the
    reference's frames (64), not estimated from batches."""
    cb = ForgettingBudget(dataset="a", tolerance=0.1)
    assert cb.ratio_frames == cb.reference_frames == 64 and not cb.paired
    assert ForgettingBudget(dataset="a", tolerance=0.1, reference_frames=8).ratio_frames == 8
    assert ForgettingBudget(dataset="a", tolerance=0.1, ratio_frames=None).paired
    assert not ForgettingBudget(dataset="a", limit=0.5, ratio_frames=None).paired


def test_an_absolute_limit_bounds_the_loss_itself(tmp_path):
    """``limit``: the ratio is the replay loss over the limit, bounded by 1."""
    budget = {"dataset": "a", "limit": 1e-3, "every": 1, "step_size": 2.0, "ratio_frames": None}
    module, start, cb, rec, data, tr = run(tmp_path, budget=budget, epochs=2)
    assert cb.reference == 1e-3 and cb.dual.bound == 1.0
    dual = DualAscentMultiplier(1.0, every=1, step_size=2.0)
    replay = ["a/per_atom_energy_mse", "a/forces_mse"]
    base = rec.coeffs[0]
    for values in rec.values:
        dual.observe(sum(base[n] * values[n] for n in replay) / 1e-3)
        dual.step()
    assert cb.dual.state_dict() == pytest.approx(dual.state_dict(), rel=1e-12, nan_ok=True)


@pytest.mark.parametrize("scheduler", ["ours", "nequip"])
def test_a_coefficient_schedule_beside_the_budget_is_refused_before_any_step(tmp_path, scheduler):
    """The budget sets the replay coefficients at every step from the configured ones; a
    schedule would be silently overwritten."""
    from nequip.train.callbacks import LinearLossCoefficientScheduler as NequipLinear

    from nequip_mtl.train.callbacks import LossCoefficientScheduler

    torch.manual_seed(0)
    module = NequIPLightningModule(**kwargs())
    schedule = (
        LossCoefficientScheduler(schedule={1: {"a/forces_mse": 2.0}})
        if scheduler == "ours"
        else NequipLinear(start_epoch=0, transition_epochs=2,
                          final_coeffs={n: 1.0 for n in module.loss.entries})
    )  # fmt: skip
    tr = trainer(tmp_path, callbacks=[ForgettingBudget(**BUDGET), schedule], limit_val_batches=0)
    with pytest.raises(ValueError, match="would overwrite a schedule's.*LossCoefficientScheduler"):
        tr.fit(module, datamodule=multi(sampling=BALANCED))
    assert tr.global_step == 0


def test_a_module_that_ignores_coefficients_is_refused(tmp_path):
    torch.manual_seed(0)
    module = mtl.UncertaintyWeightingLightningModule(**kwargs())
    tr = trainer(tmp_path, callbacks=[ForgettingBudget(**BUDGET)], limit_val_batches=0)
    with pytest.raises(ValueError, match="ForgettingBudget changes loss coefficients"):
        tr.fit(module, datamodule=multi(sampling=BALANCED))


@pytest.mark.parametrize(
    "each, sampled", [(False, False), (True, False), (True, True)],
    ids=["sum", "each_component", "each_sampled"],
)  # fmt: skip
def test_the_budget_is_logged_and_plotted(tmp_path, each, sampled):
    """``nequip-mtl-plot``'s coefficient figure draws the logged multiplier and ratio
    (their values, step for step) and the limit ``1 + tolerance``; with ``each_component``
    one line per component (``a/forces_mse``); with ``sample_replay`` the replay
    probability is logged (the largest multiplier, capped at 1) and drawn as no
    constraint's line."""
    import numpy as np
    from lightning.pytorch.loggers import CSVLogger

    from nequip_mtl.plot import build_figures, load_run

    logger = CSVLogger(str(tmp_path), name="logs", version="")
    budget = {**BUDGET, "each_component": each}
    if sampled:
        budget.update(sample_replay=True, tolerance=0.01, step_size=2.0, initial=0.5)
    cb = run(tmp_path, budget=budget, epochs=2, logger=logger, log_every_n_steps=1)[2]
    logs = load_run(tmp_path)
    figure = build_figures(logs)["loss_coefficients.png"]
    axes = {ax.get_title(): ax for ax in figure.axes}
    multiplier = axes["forgetting budget: replay-weight multiplier"]
    ratio = axes["replayed loss / pretrained model's"]
    names = ["a/per_atom_energy_mse", "a/forces_mse"] if each else ["a"]
    for name in names:
        for ax, key in ((multiplier, "multiplier"), (ratio, "ratio")):
            series = logs.series[f"budget/{name}/{key}"]
            (line,) = [ln for ln in ax.get_lines() if ln.get_label() == name]
            ys = np.asarray(line.get_ydata(), float)
            assert set(np.round(ys, 12)) == set(np.round(series.value, 12))
        (limit,) = [ln for ln in ratio.get_lines() if ln.get_label() == f"{name}: limit"]
        assert float(np.asarray(limit.get_ydata())[0]) == pytest.approx(1.01, rel=1e-12)
        # the end-of-training measurement reaches the loggers
        group = name.split("/")[-1] if each else "loss"
        final = logs.series[f"budget/{name}/final_ratio"].value[-1]
        assert final == pytest.approx(cb.final_ratios[group])
    for ax in (multiplier, ratio):
        labels = {ln.get_label() for ln in ax.get_lines()}
        assert labels - {f"{n}: limit" for n in names} == set(names)
    if sampled:
        logged = logs.series["budget/a/replay_probability"].value
        assert 0 < min(logged) < 1  # replay was sampled
        # each step's: the largest multiplier after the step before (at first, `initial`)
        after = np.max([logs.series[f"budget/{n}/multiplier"].value for n in names], axis=0)
        expected = np.minimum(1.0, np.concatenate([[0.5], after[:-1]]))
        np.testing.assert_allclose(logged, expected, rtol=1e-6)  # logged as float32


@pytest.mark.ddp
@pytest.mark.parametrize(
    "kind", ["budget", "budget_unpaired", "budget_frames", "budget_each", "budget_sampled"]
)
def test_two_gloo_ranks_keep_the_budget_of_one_process(tmp_path, kind):
    """2 ranks, each with half of every global batch, against 1 process on the global
    batch: the same reference, the same multiplier at every update (the ratio of the global
    batch on every rank; or, ``budget_frames``, of the same fixed frames), the same
    parameters, the same final ratio."""
    import sys

    from tests._ddp import launch

    for world in (1, 2):
        (tmp_path / str(world)).mkdir()
        launch(
            [sys.executable, "-m", "tests.multi_dataset_ddp_worker", str(tmp_path / str(world)),
             kind],
            world=world,
        )  # fmt: skip
    one = torch.load(tmp_path / "1" / "rank0.pt")
    ranks = [torch.load(tmp_path / "2" / f"rank{r}.pt") for r in range(2)]
    # the pretrained model's recorded predictions (paired): every rank records them all
    recorded = [state["budget"].pop("pretrained") for state in (one, *ranks)]
    assert (recorded[0] is None) == (kind not in ("budget", "budget_each", "budget_sampled"))
    for other in recorded[1:]:
        torch.testing.assert_close(other, recorded[0], rtol=0, atol=1e-12)
    assert ranks[0]["budget"] == ranks[1]["budget"]
    for dual in one["budget"]["duals"].values():
        if kind == "budget_sampled":  # a step whose batch dropped its replay: no update
            assert 2 <= dual["updates"] < 6 and dual["multiplier"] < 1.0
        else:
            assert dual["updates"] == (3 if kind == "budget_frames" else 6)
        assert dual["multiplier"] != 1.0
    got, ref = ranks[0]["budget"], one["budget"]
    assert set(ref["duals"]) == (
        {"per_atom_energy_mse", "forces_mse"} if kind == "budget_each" else {"loss"}
    )
    for g, dual in ref["duals"].items():
        assert got["duals"][g] == pytest.approx(dual, rel=1e-9)
    assert got["references"] == pytest.approx(ref["references"], rel=1e-12)
    assert got["ratio_references"] == pytest.approx(ref["ratio_references"], rel=1e-12)
    assert bool(ref["ratio_references"]) == (kind == "budget_frames")
    assert got["base_coeffs"] == ref["base_coeffs"]
    torch.testing.assert_close(ranks[0]["params"], one["params"], rtol=0, atol=1e-9)
    # the end-of-training measurement: every rank measures the same frames with the same
    # model, so each reads the one process's final ratio (fp64 parameters equal to 1e-9)
    assert ref["final_ratios"] and got["final_ratios"]
    assert got["final_ratios"] == pytest.approx(ref["final_ratios"], rel=1e-7)


_COMPILE = [pytest.mark.slow, skip_inductor_under_default_capability]


@pytest.mark.parametrize(
    "mode",
    [
        "float32",
        pytest.param("compile", marks=_COMPILE),
        pytest.param("compile_frames", marks=_COMPILE),
        pytest.param("compile_sampled", marks=_COMPILE),
    ],
)
def test_the_budget_with_float32_and_train_time_compile(tmp_path, mode):
    """float32 (the reference equals the by-hand one within fp32 rounding), and train-time
    compile (the reference forward and the trajectory as eager's; ``compile_frames``: with
    the ratio measured on fixed frames by the compiled model during training;
    ``compile_sampled``: and batches that drop their replayed frames)."""
    from tests._harness import model_config

    if mode == "float32":
        _, start, cb, rec, _, _ = run(tmp_path / "f32", epochs=1, model=model_config("float32"))
        fresh = multi(sampling=BALANCED)
        fresh.prepare_data()
        fresh.setup("fit")
        (replayed,) = [d for d in fresh.train_dataset if d.index == 0]
        frames = [replayed[i] for i in range(len(replayed))]
        # fp32 predictions, sums of a few hundred squares: agreement to ~1e-6 relative
        assert cb.reference == pytest.approx(_by_hand(start, frames, rec.coeffs[0]), rel=1e-5)
        assert cb.dual.updates >= 2 and math.isfinite(cb.dual.multiplier)
        return
    budget = {"compile": BUDGET, "compile_frames": FRAMES_BUDGET,
              "compile_sampled": {**FRAMES_BUDGET, "tolerance": 0.5, "step_size": 2.0,
                                  "sample_replay": True}}[mode]  # fmt: skip
    eager, _, eager_cb, _, _, _ = run(tmp_path / "eager", budget=budget, epochs=1)
    model = model_config("float64")
    model["compile_mode"] = "compile"
    compiled, _, cb, _, _, _ = run(tmp_path / "compile", budget=budget, epochs=1, model=model)
    assert cb.dual.updates >= 1
    if mode == "compile_sampled":
        assert cb.replay_probability < 1.0  # the last step's batches sampled their replay
    if mode != "compile":
        assert cb.ratio_reference == pytest.approx(eager_cb.ratio_reference, rel=1e-10)
    assert cb.reference == pytest.approx(eager_cb.reference, rel=1e-10)
    assert cb.dual.state_dict() == pytest.approx(eager_cb.dual.state_dict(), rel=1e-8)
    torch.testing.assert_close(params(compiled), params(eager), rtol=0, atol=1e-10)


#: sampled replay on a slack budget: the multiplier falls below 1 within a few steps, so
#: batches drop their replayed frames with odds that change from step to step
SAMPLED = {**UNPAIRED_BUDGET, "tolerance": 0.5, "step_size": 2.0, "sample_replay": True}


class BatchesBefore(Callback):
    """Per micro-batch, before the budget's hook: its step, index and datasets' rows."""

    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        rows = batch[DATASET_INDEX_KEY].reshape(-1).tolist()
        self.seen.append((trainer.global_step, batch_idx, rows))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_sampled_replay_trains_the_replayed_frames_as_often_as_the_multiplier_asks(
    tmp_path, accumulate
):
    """``sample_replay``: at multiplier ``lambda < 1`` a micro-batch keeps its replayed
        frames with probability ``lambda`` (its own draw of the seed, step and batch index),
        at the configured weight; dropped, the training step sees the other frames only (the
    XX
        Mutations that fail it: the coefficients still scaled by ``lambda`` (not ``lambda /
        p``), the batch dropped in a copy (the step still trains the replayed frames), one
        draw for every micro-batch of a step."""
    before = BatchesBefore()
    module, start, cb, rec, data, tr = run(
        tmp_path, budget=SAMPLED, accumulate_grad_batches=accumulate, first_callbacks=[before]
    )
    base = rec.coeffs[0]
    replay = ["a/per_atom_energy_mse", "a/forces_mse"]
    dual = DualAscentMultiplier(1.5, every=1, step_size=2.0)
    dropped = kept = 0
    for i, (coeffs, values, frames, (step, idx, rows)) in enumerate(
        zip(rec.coeffs, rec.values, rec.replayed, before.seen)
    ):
        p = min(1.0, dual.multiplier)
        scaled = {n: (c * dual.multiplier / p if n in replay else c) for n, c in base.items()}
        total = sum(scaled.values())
        assert coeffs == pytest.approx({n: c / total for n, c in scaled.items()}, rel=1e-12)
        drop = p < 1 and random.Random(f"0:{step}:{idx}").random() >= p
        assert 0 in rows and 1 in rows  # balanced batches: both datasets in every batch
        if drop:
            assert frames == [] and all(math.isnan(values[n]) for n in replay)
            assert values["b/forces_mse"] > 0
            dropped += 1
        else:
            assert len(frames) == rows.count(0) and all(values[n] > 0 for n in replay)
            dual.observe(sum(base[n] * values[n] for n in replay) / cb.reference)
            kept += p < 1
        if (i + 1) % accumulate == 0:
            dual.step()
    assert dropped >= 3 and kept >= 1  # both outcomes happened at lambda < 1
    assert cb.dual.state_dict() == pytest.approx(dual.state_dict(), rel=1e-12, nan_ok=True)


def test_sampled_replay_has_the_weighted_sums_gradient_in_expectation(tmp_path):
    """On one batch with both datasets: ``p`` times the gradient with the replayed frames
    at the configured weight plus ``1 - p`` times the gradient without them equals, up to
    the coefficients' normalisation (``Z``: their sum before it), the weighted sum's
    gradient at replay weight ``lambda = p``; computed with nequip's own module and loss."""
    from nequip_mtl.train.callbacks.forgetting_budget import _drop_dataset
    from nequip_mtl.train.coefficients import update_coeffs

    torch.manual_seed(0)
    module = NequIPLightningModule(**kwargs())
    data = multi(sampling=BALANCED)
    data.prepare_data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    base = {n: e.coeff for n, e in module.loss.entries.items()}
    replay = [n for n in base if n.startswith("a/")]
    lam = 0.3

    def gradient(coeffs, batch):
        update_coeffs(module.loss, coeffs, "test")
        module.zero_grad()
        target = module.process_target(dict(batch), 0)
        loss = module.loss(module(dict(batch)), target)["weighted_sum"]
        loss.backward()
        return torch.cat([p.grad.reshape(-1) for p in module.parameters() if p.grad is not None])

    weighted = {n: c * lam if n in replay else c for n, c in base.items()}
    g_weighted = gradient(weighted, batch) * sum(weighted.values())
    trimmed = dict(batch)
    assert _drop_dataset(trimmed, 0) and 0 not in trimmed[DATASET_INDEX_KEY].tolist()
    g_keep, g_drop = gradient(base, batch), gradient(base, trimmed)
    g_sampled = (lam * g_keep + (1 - lam) * g_drop) * sum(base.values())
    torch.testing.assert_close(g_sampled, g_weighted, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(g_keep, g_drop)  # the replayed frames do move the gradient
