"""Pseudolabel replay (``PseudolabelledDataset``): structures labelled by a pretrained model.

The labels are checked against the pretrained model evaluated independently, one frame at
a time, in the same process (nequip's own checkpoint loader); the cache is checked by
counting model loads; the refusals run before any labelling; and a replay run with a
forgetting budget trains on pseudolabels through the real data module and trainer.
"""

from __future__ import annotations

import pytest
import torch
from ase import Atoms
from ase.calculators.emt import EMT
from ase.io import write
from nequip.data import AtomicDataDict
from nequip.data.dataset import EMTTestDataset
from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper, NeighborListTransform
from nequip.model import ModelFromCheckpoint
from nequip.train import NequIPLightningModule

import nequip_mtl.data.pseudolabels as pl
from nequip_mtl.data import MultiDatasetDataModule
from nequip_mtl.data.pseudolabels import PseudolabelledDataset
from nequip_mtl.train.callbacks import ForgettingBudget
from tests._harness import STATS, emt, last_ckpt, nequip_fit, splits, trainer
from tests.test_dataset_tasks import BALANCED, kwargs


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A tiny pretrained Cu model's checkpoint."""
    from nequip.utils import get_current_code_versions

    root = tmp_path_factory.mktemp("pretrained")
    info = {  # what nequip-train records and nequip's checkpoint loader reads
        "versions": get_current_code_versions(verbose=False),
        "training_module": {"_target_": "nequip.train.NequIPLightningModule"},
    }
    nequip_fit(
        root, max_epochs=1, checkpoint=True, limit_val_batches=0, module_kw={"info_dict": info}
    )
    return last_ckpt(root)


def _transforms(type_names=("Cu",)):
    return [
        ChemicalSpeciesToAtomTypeMapper(
            model_type_names=list(type_names),
            chemical_species_to_atom_type_map={"Cu": "Cu"} if "Cu" in type_names else None,
        ),
        NeighborListTransform(r_max=4.0),
    ]


def structures(num_frames=5, type_names=("Cu",)) -> EMTTestDataset:
    return EMTTestDataset(
        transforms=_transforms(type_names),
        supercell=[2, 2, 2],
        seed=3,
        num_frames=num_frames,
        element="Cu",
    )


def test_labels_are_the_pretrained_models_predictions_frame_by_frame(checkpoint, tmp_path):
    data = structures()
    ds = PseudolabelledDataset(data, model=checkpoint, cache=str(tmp_path / "pl.pt"), batch_size=2)
    assert ds.fields == ["total_energy", "forces", "stress"]  # periodic: stress too
    model = ModelFromCheckpoint(checkpoint)["sole_model"]
    for i in range(len(data)):
        frame = data[i]
        ref = model(AtomicDataDict.batched_from_list([frame]))
        got = ds[i]
        for field in ds.fields:
            torch.testing.assert_close(got[field], ref[field].detach(), rtol=1e-10, atol=1e-12)
            assert not torch.equal(got[field], frame[field])  # the EMT labels are replaced
        torch.testing.assert_close(got["pos"], frame["pos"], rtol=0, atol=0)


def test_the_cache_is_reused_and_recomputed_only_when_something_changes(
    checkpoint, tmp_path, monkeypatch
):
    cache = str(tmp_path / "pl.pt")
    first = PseudolabelledDataset(structures(), model=checkpoint, cache=cache)
    loads = []
    real = pl.load_pretrained
    monkeypatch.setattr(pl, "load_pretrained", lambda path: loads.append(path) or real(path))
    again = PseudolabelledDataset(structures(), model=checkpoint, cache=cache)
    assert loads == []  # read from the cache, no model
    for i in range(len(first)):
        assert torch.equal(again[i]["forces"], first[i]["forces"])
    PseudolabelledDataset(structures(num_frames=6), model=checkpoint, cache=cache)
    assert loads == [checkpoint]  # other structures: labelled again
    PseudolabelledDataset(structures(num_frames=6), model=checkpoint, cache=cache, stress=False)
    assert loads == [checkpoint] * 2  # other fields: labelled again


def test_stress_of_structures_without_a_cell_is_refused(checkpoint, tmp_path):
    frames = []
    for k in range(3):
        atoms = Atoms("Cu3", positions=[[0, 0, 0], [2.5, 0, 0], [0, 2.4 + 0.1 * k, 0]])
        atoms.calc = EMT()
        atoms.get_potential_energy()
        frames.append(atoms)
    path = tmp_path / "clusters.xyz"
    write(path, frames)
    from nequip.data.dataset import ASEDataset

    clusters = ASEDataset(file_path=str(path), transforms=_transforms())
    with pytest.raises(ValueError, match=r"`stress: true`, but 3 of 3 structures have no"):
        PseudolabelledDataset(clusters, model=checkpoint, stress=True)
    ds = PseudolabelledDataset(clusters, model=checkpoint)  # default: no stress
    assert ds.fields == ["total_energy", "forces"] and "stress" not in ds[0]


def test_a_model_whose_type_names_differ_from_the_structures_is_refused(checkpoint):
    mapped = EMTTestDataset(
        transforms=[
            ChemicalSpeciesToAtomTypeMapper(
                model_type_names=["Ag", "Cu"],
                chemical_species_to_atom_type_map={"Cu": "Cu"},
            ),
            NeighborListTransform(r_max=4.0),
        ],
        supercell=[2, 2, 2],
        seed=3,
        num_frames=2,
        element="Cu",
    )
    with pytest.raises(ValueError, match=r"type names \['Cu'\].*uses \['Ag', 'Cu'\]"):
        PseudolabelledDataset(mapped, model=checkpoint)


def test_a_missing_model_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="PseudolabelledDataset.model: no such file"):
        PseudolabelledDataset(structures(2), model=str(tmp_path / "nope.ckpt"))


def test_replay_with_pseudolabels_and_a_budget_trains(checkpoint, tmp_path):
    """The replayed dataset is the pretrained model's pseudolabels; a budget relative to the
    pretrained model's loss on them (zero, were it the pretrained model) is refused, an
    absolute limit trains."""
    replay = {
        "split_dataset": {
            "dataset": {
                "_target_": "nequip_mtl.data.PseudolabelledDataset",
                "model": checkpoint,
                "cache": str(tmp_path / "pl.pt"),
                "dataset": emt(11, 11),
            },
            "train": 8,
            "val": 3,
        }
    }
    datasets = {"a": replay, "b": splits(["b"])["b"]}
    dm = MultiDatasetDataModule(
        seed=5,
        datasets=datasets,
        sampling=BALANCED,
        stats_manager=STATS,
        train_dataloader={"batch_size": 3},
        val_dataloader={"batch_size": 4},
    )
    torch.manual_seed(0)
    module = NequIPLightningModule(**kwargs())
    with pytest.raises(ValueError, match="pseudolabelled.*give an absolute `limit`"):
        tr = trainer(tmp_path, callbacks=[ForgettingBudget(dataset="a", tolerance=0.05)])
        tr.fit(NequIPLightningModule(**kwargs()), datamodule=dm)
    budget = ForgettingBudget(dataset="a", limit=1e-3, every=1)
    tr = trainer(tmp_path, max_epochs=2, callbacks=[budget], limit_val_batches=0)
    tr.fit(module, datamodule=dm)
    assert tr.global_step >= 4 and budget.dual.updates >= 3
    assert budget.reference == 1e-3
