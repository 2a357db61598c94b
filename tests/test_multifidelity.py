"""Per-dataset energy references: ``nequip_mtl.model.PerDatasetEnergyReferences``,
its ``select_fidelity`` model modifier and the least-squares references of
``MultiDatasetDataModule``, on tiny real nequip models.

Expected values are closed forms (least squares of one type, the minimum-norm solution for one
composition, the gradient of a total energy with respect to a per-type shift) or nequip's own
model built separately from the same config.
"""

from __future__ import annotations

import copy

import pytest
import torch
from nequip.model import modify
from nequip.nn import PerTypeScaleShift

from nequip_mtl.data.keys import DATASET_INDEX_KEY
from nequip_mtl.model import DATASET_INDEX_KEY as MODEL_DATASET_INDEX_KEY
from nequip_mtl.model import DatasetEnergyShifts, PerDatasetEnergyReferences
from tests import _mfid as F

DTYPES = ["float32", "float64"]
REFS = {"lo": {"Cu": -2.5}, "hi": {"Cu": -6.25}}


def _run(model, batch):
    return model(F.clone(batch))


def _inner(dtype="float64", **kw):
    from nequip.model import NequIPGNNModel

    config = F.model_config(dtype, **kw)
    config.pop("_target_")
    return NequIPGNNModel(**config)


def test_dataset_index_key_is_the_data_modules():
    assert MODEL_DATASET_INDEX_KEY == DATASET_INDEX_KEY


def test_dataset_index_key_is_defined_once():
    """Only ``nequip_mtl/data/keys.py`` defines it; the model imports it from there.
    Mutation: writing the string out again in ``nequip_mtl/model`` fails here."""
    package = F.REPO / "nequip_mtl"
    defining = [
        str(path.relative_to(package))
        for path in sorted(package.rglob("*.py"))
        if any(line.startswith("DATASET_INDEX_KEY =") for line in path.read_text().splitlines())
    ]
    assert defining == ["data/keys.py"]


# ------------------------------------------------------------------ least-squares references


def test_least_squares_references_one_type_closed_form():
    """One type: r = sum_f n_f E_f / sum_f n_f^2 over the dataset's training frames, and the
    shifted dataset's reference is the unshifted fit plus the shift."""
    dm = F.data_module()
    refs = dm.energy_references()
    dm.setup("fit")
    for j, name in enumerate(dm.dataset_names):
        frames = [dm.train_dataset[j][i] for i in range(len(dm.train_dataset[j]))]
        n = torch.tensor([f["pos"].shape[0] for f in frames], dtype=torch.float64)
        e = torch.tensor([float(f["total_energy"]) for f in frames], dtype=torch.float64)
        assert len(set(n.tolist())) == 1 or name  # sizes may be equal within one dataset
        expected = float((n * e).sum() / (n * n).sum())
        assert refs[name]["Cu"] == pytest.approx(expected, rel=1e-12, abs=1e-12)
    # the "hi" dataset is shifted by -4 per atom: its fit is 4 lower than an unshifted one
    unshifted = dict(F.SPECS)
    unshifted["hi"] = (*F.SPECS["hi"][:2], 0.0, F.SPECS["hi"][3])
    F.SPECS, saved = unshifted, F.SPECS
    try:
        plain = F.data_module().energy_references()
    finally:
        F.SPECS = saved
    assert refs["hi"]["Cu"] - plain["hi"]["Cu"] == pytest.approx(-4.0, abs=1e-9)
    assert refs["lo"]["Cu"] == plain["lo"]["Cu"]


def test_references_are_a_lazy_training_statistic():
    """``per_dataset_energy_references`` is looked up like nequip's statistics (the resolver
    calls ``.get``), and equals :meth:`energy_references`; the other statistics are nequip's."""
    dm = F.data_module()
    stats = dm.get_statistics("train")
    assert "per_dataset_energy_references" not in dict(stats)  # not computed yet
    assert stats.get("per_dataset_energy_references") == dm.energy_references()
    assert stats.get("no_such_stat") is None
    assert set(stats) >= {"num_neighbors_mean", "per_atom_energy_mean"}


def test_ethanol_composition_gets_the_minimum_norm_references(tmp_path):
    """Every xTB frame is C2H6O: only 2 r_C + 6 r_H + r_O is determined; the pseudo-inverse
    gives the shortest r, mean(E) * c / |c|^2 with c = (2, 6, 1)."""
    from ase.io import read

    from nequip_mtl.data import MultiDatasetDataModule

    xyz = F.REPO / "benchmarks" / "data" / "ethanol_xtb_1200.xyz"
    dm = MultiDatasetDataModule(
        seed=1,
        datasets={
            "xtb": {"split_dataset": {"dataset": F.ethanol_dataset(xyz), "train": 10, "val": 1190}}
        },  # fmt: skip
        train_dataloader={"batch_size": 2},
        stats_manager={
            "_target_": "nequip.data.CommonDataStatisticsManager",
            "type_names": ["C", "H", "O"],
        },  # fmt: skip
    )
    refs = dm.energy_references()["xtb"]
    dm.setup("fit")
    train = dm.train_dataset[0]
    energies = [float(train[i]["total_energy"]) for i in range(len(train))]
    all_energies = {round(a.get_potential_energy(), 6) for a in read(xyz, index=":")}
    assert all(round(e, 6) in all_energies for e in energies)  # the file's own labels
    mean = sum(energies) / len(energies)
    c = {"C": 2.0, "H": 6.0, "O": 1.0}
    for t, ct in c.items():
        assert refs[t] == pytest.approx(mean * ct / 41.0, rel=1e-10)


def test_a_type_no_frame_holds_gets_none_and_is_refused_with_how_to_set_it():
    dm = F.data_module(type_names=("Cu", "Ni"))
    refs = dm.energy_references()
    assert refs["lo"]["Ni"] is None and refs["hi"]["Ni"] is None
    with pytest.raises(ValueError) as err:
        PerDatasetEnergyReferences(
            F.model_config(type_names=("Cu", "Ni")), datasets=["lo", "hi"], references=refs
        )
    msg = str(err.value)
    assert "`lo`" in msg and "['Ni']" in msg and "by hand" in msg
    assert "per_dataset_energy_references" in msg and "{lo: {Ni: <energy>}}" in msg
    # the remedy the message gives works: fitted references, then the missing ones by hand
    model = PerDatasetEnergyReferences(
        F.model_config(type_names=("Cu", "Ni")),
        datasets=["lo", "hi"],
        references=[refs, {"lo": {"Ni": -1.0}, "hi": {"Ni": -2.0}}],
    )
    (shifts,) = [m for m in model.modules() if isinstance(m, DatasetEnergyShifts)]
    assert shifts.references()["hi"] == {"Cu": refs["hi"]["Cu"], "Ni": -2.0}


@pytest.mark.parametrize("target", ["nequip.model.NoSuchBuilder", "no_such_package.Builder"])
def test_a_model_target_that_does_not_import_is_refused_naming_the_key(target):
    config = {**F.model_config(), "_target_": target}
    refs = {"lo": {"Cu": 0.0}, "hi": {"Cu": 0.0}}
    with pytest.raises(ValueError, match=rf"`training_module.model.model._target_` is `{target}`"):
        PerDatasetEnergyReferences(config, ["lo", "hi"], refs)


def test_a_species_outside_the_model_types_is_refused_naming_the_dataset():
    # a hand reference for a type the model does not have
    with pytest.raises(ValueError, match=r"type\(s\) \['Ni'\] that are not in the model's"):
        PerDatasetEnergyReferences(
            F.model_config(), ["lo", "hi"], {"lo": {"Cu": 1.0, "Ni": 0.0}, "hi": {"Cu": 0.0}}
        )
    # a dataset holding a species the model's type mapper does not know: the data module's
    # set-up for the fit refuses it, naming the dataset
    dm = F.data_module(unmapped="hi")
    with pytest.raises(ValueError, match=r"\(dataset `hi`\) has no model type: add Cu"):
        dm.energy_references()


# ------------------------------------------------------------------ the wrapped model


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_frame_shift_changes_energies_by_the_references_not_forces(dtype):
    """Against nequip's own model from the same config: each frame's energy moves by
    sum over its atoms of (reference of its dataset - nequip's shift); forces and per-atom
    energies up to that constant are unchanged."""
    dm = F.data_module()
    batch = F.batch(dm)
    model = PerDatasetEnergyReferences(F.model_config(dtype), ["lo", "hi"], REFS)
    plain = _inner(dtype)
    out, ref = _run(model, batch), _run(plain, batch)
    n = torch.bincount(batch["batch"]).to(torch.float64)
    shared = -3.0  # model_config's per_type_energy_shifts
    offset = torch.tensor(
        [REFS[dm.dataset_names[d]]["Cu"] - shared for d in batch["dataset_index"]]
    )
    got = out["total_energy"].reshape(-1).double() - ref["total_energy"].reshape(-1).double()
    tol = 1e-4 if dtype == "float32" else 1e-10
    torch.testing.assert_close(got, n * offset, rtol=0, atol=tol)
    assert torch.equal(out["forces"], ref["forces"])
    assert out["total_energy"].dtype == ref["total_energy"].dtype
    # both datasets are in the batch, with different references
    assert set(batch["dataset_index"].tolist()) == {0, 1}


def test_forces_under_training_are_the_shared_models():
    """The references receive the energy loss only: d(sum_f E_f)/d offsets[d, t] is the
    number of type-t atoms in dataset d's frames; the other parameters get nequip's gradient."""
    dm = F.data_module()
    batch = F.batch(dm)
    model = PerDatasetEnergyReferences(F.model_config(), ["lo", "hi"], REFS, trainable=True)
    (shifts,) = [m for m in model.modules() if isinstance(m, DatasetEnergyShifts)]
    assert any(p is shifts.offsets for p in model.parameters())
    _run(model, batch)["total_energy"].sum().backward()
    n = torch.bincount(batch["batch"]).double()
    per_dataset = torch.zeros(2, dtype=torch.float64).index_add_(0, batch["dataset_index"], n)
    torch.testing.assert_close(shifts.offsets.grad.reshape(-1), per_dataset)
    plain = _inner()
    _run(plain, batch)["total_energy"].sum().backward()
    for (name, p), (pname, q) in zip(
        [(k, v) for k, v in model.named_parameters() if "offsets" not in k],
        plain.named_parameters(),
    ):
        assert name.replace(".base.", ".") == pname
        torch.testing.assert_close(p.grad, q.grad)


def test_fixed_references_are_buffers():
    model = PerDatasetEnergyReferences(F.model_config(), ["lo", "hi"], REFS)
    (shifts,) = [m for m in model.modules() if isinstance(m, DatasetEnergyShifts)]
    assert not any(p is shifts.offsets for p in model.parameters())
    assert any(b is shifts.offsets for b in model.buffers())


def test_a_frame_without_dataset_index_is_refused_with_the_remedy():
    dm = F.data_module()
    batch = F.without(F.batch(dm), DATASET_INDEX_KEY)
    model = PerDatasetEnergyReferences(F.model_config(), ["lo", "hi"], REFS)
    with pytest.raises(RuntimeError, match="select_fidelity"):
        _run(model, batch)


# ------------------------------------------------------------------ deployment at one fidelity


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fidelity", ["lo", "hi"])
def test_select_fidelity_gives_a_plain_nequip_model_predicting_that_dataset(dtype, fidelity):
    dm = F.data_module()
    batch = F.batch(dm)
    model = PerDatasetEnergyReferences(F.model_config(dtype), ["lo", "hi"], REFS)
    d = dm.dataset_names.index(fidelity)
    at_d = F.clone(batch)
    at_d[DATASET_INDEX_KEY] = torch.full_like(batch[DATASET_INDEX_KEY], d)
    expected = _run(model, at_d)
    deployed = modify(copy.deepcopy(model), [{"modifier": "select_fidelity", "dataset": fidelity}])
    assert not any(type(m).__module__.startswith("nequip_mtl") for m in deployed.modules())
    assert DATASET_INDEX_KEY not in deployed.model_input_fields
    got = _run(deployed, F.without(batch, DATASET_INDEX_KEY))
    torch.testing.assert_close(got["total_energy"], expected["total_energy"], rtol=0, atol=1e-10)
    torch.testing.assert_close(got["forces"], expected["forces"], rtol=0, atol=1e-12)
    # the same modules and parameter names as nequip's own model, with the dataset's shift
    plain = _inner(dtype)
    assert list(deployed.state_dict()) == list(plain.state_dict())
    (pts,) = [m for m in deployed.modules() if isinstance(m, PerTypeScaleShift)]
    assert pts.shifts.reshape(-1).tolist() == [REFS[fidelity]["Cu"]]
    assert pts.scales.reshape(-1).tolist() == [0.5]


def test_select_fidelity_refuses_a_name_that_is_not_a_dataset():
    model = PerDatasetEnergyReferences(F.model_config(), ["lo", "hi"], REFS)
    with pytest.raises(ValueError, match=r"'dft', which is not one of this model's datasets \["):
        modify(model, [{"modifier": "select_fidelity", "dataset": "dft"}])
    # nothing was changed
    assert any(isinstance(m, DatasetEnergyShifts) for m in model.modules())


# ------------------------------------------------------------------ another model builder


def test_allegro_model_accepts_the_wrapper():
    pytest.importorskip("allegro")
    config = {
        "_target_": "allegro.model.AllegroModel",
        "seed": 3,
        "model_dtype": "float64",
        "type_names": ["Cu"],
        "r_max": 4.0,
        "l_max": 1,
        "radial_chemical_embed": {
            "_target_": "allegro.nn.TwoBodyBesselScalarEmbed",
            "num_bessels": 4,
        },
        "num_layers": 1,
        "num_scalar_features": 4,
        "num_tensor_features": 2,
        "allegro_mlp_hidden_layers_depth": 1,
        "allegro_mlp_hidden_layers_width": 4,
        "readout_mlp_hidden_layers_depth": 1,
        "readout_mlp_hidden_layers_width": 4,
        "avg_num_neighbors": 12.0,
        "per_type_energy_shifts": {"Cu": -3.0},
        "per_type_energy_scales": {"Cu": 0.5},
    }
    from hydra.utils import get_method

    dm = F.data_module()
    batch = F.batch(dm)
    model = PerDatasetEnergyReferences(copy.deepcopy(config), ["lo", "hi"], REFS)
    cfg = dict(config)
    plain = get_method(cfg.pop("_target_"))(**cfg)
    out, ref = _run(model, batch), _run(plain, batch)
    n = torch.bincount(batch["batch"]).double()
    offset = torch.tensor([REFS[dm.dataset_names[d]]["Cu"] + 3.0 for d in batch["dataset_index"]])
    torch.testing.assert_close(
        out["total_energy"].reshape(-1) - ref["total_energy"].reshape(-1), n * offset
    )
    assert torch.equal(out["forces"], ref["forces"])
    deployed = modify(model, [{"modifier": "select_fidelity", "dataset": "hi"}])
    at_hi = F.without(batch, DATASET_INDEX_KEY)
    got = _run(deployed, at_hi)
    torch.testing.assert_close(
        got["total_energy"].reshape(-1) - ref["total_energy"].reshape(-1), n * (-6.25 + 3.0)
    )
    assert list(deployed.state_dict()) == list(plain.state_dict())
