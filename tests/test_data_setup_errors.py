"""A data file that is not there, and a chemical species the model has no type for, are
errors at data-module setup that name the fix (``nequip_mtl.data.datamodule``):

- through nequip's real ``nequip-train`` with the shipped configs: ``configs/tutorial.yaml``
  (``nequip_mtl.data.NequIPDataModule``) and ``configs/multifidelity.yaml``
  (``MultiDatasetDataModule``), raised while nequip computes the training statistics, so
  before the model is built and before any training step;
- on the data modules themselves, for the config keys of explicit and listed datasets.

Without the checks these were Hydra's ``InstantiationException`` (the path deep in the
traceback) and nequip's ``KeyError: 'Got an atomic number as input for a chemical species
that was not specified in `chemical_species_to_atom_type_map`'``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nequip_mtl.data import MultiDatasetDataModule, NequIPDataModule
from nequip_mtl.tools import make_dataset
from tests import _mfid as F
from tests._nequip_train import nequip_train

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
DFT = REPO / "benchmarks" / "data" / "ethanol_reduced_100.xyz"
XTB = REPO / "benchmarks" / "data" / "ethanol_xtb_1200.xyz"

TUTORIAL_TINY = ["train_split=8", "val_split=2", "test_split=2", "num_layers=1",
                 "num_features=4", "trainer.max_epochs=1", "run=[train]"]  # fmt: skip


@pytest.fixture(scope="module")
def alloy(tmp_path_factory) -> Path:
    """12 EMT frames of Cu, Ni and Pd (``nequip-mtl-make-data``'s defaults)."""
    path = tmp_path_factory.mktemp("data") / "alloy.xyz"
    make_dataset(str(path), num_frames=12, seed=0)
    return path


def _ase(path, type_names=("Cu", "Ni", "Pd")) -> dict:
    """An ``ASEDataset`` config of ``path`` whose type mapper knows ``type_names``."""
    return {
        "_target_": "nequip.data.dataset.ASEDataset",
        "file_path": str(path),
        "ase_args": {"format": "extxyz"},
        "transforms": [
            {"_target_": "nequip.data.transforms.NeighborListTransform", "r_max": 4.0},
            {
                "_target_": "nequip.data.transforms.ChemicalSpeciesToAtomTypeMapper",
                "model_type_names": list(type_names),
                "chemical_species_to_atom_type_map": {t: t for t in type_names},
            },
        ],
    }


# ---------------------------------------------------------------- nequip-train, shipped configs


def test_tutorial_unknown_species_names_element_file_split_and_keys(alloy, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ValueError) as err:
        nequip_train(CONFIGS, "tutorial", [f"data_file={alloy}", "model_type_names=[Cu,Ni]",
                                           f"hydra.run.dir={run}", *TUTORIAL_TINY])  # fmt: skip
    first, second = str(err.value).split("\n")
    assert first.startswith("chemical species Pd (atomic number 46; in ")
    assert (
        f"in {alloy} (`data.split_dataset`, split into train/val/test) has no model type" in first
    )
    assert first.endswith("add Pd to `model_type_names` and `chemical_species_to_atom_type_map`")
    assert "`data.split_dataset.dataset.transforms[0]`, maps {Cu: Cu, Ni: Ni}" in second
    assert not list(run.glob("*.ckpt"))  # nothing trained


def test_tutorial_missing_file_names_path_and_key_first(tmp_path):
    missing = tmp_path / "data" / "alloy.xyz"
    with pytest.raises(FileNotFoundError) as err:
        nequip_train(CONFIGS, "tutorial", [f"data_file={missing}", f"hydra.run.dir={tmp_path}/r",
                                           *TUTORIAL_TINY])  # fmt: skip
    first = str(err.value).split("\n")[0]
    assert first == (
        f"data file not found: {missing} (config key `data.split_dataset.dataset.file_path`)"
    )


MF_TINY = ["dft_train=6", "dft_val=2", "dft_test=92", "xtb_train=6", "xtb_val=2",
           "xtb_test=1192", "num_layers=1", "num_features=4", "max_epochs=1", "run=[train]"]  # fmt: skip


def test_multifidelity_unknown_species_names_the_dataset(tmp_path):
    with pytest.raises(ValueError) as err:
        nequip_train(CONFIGS, "multifidelity", [f"dft_file={DFT}", f"xtb_file={XTB}",
                                                "model_type_names=[C,H]",
                                                f"hydra.run.dir={tmp_path}/r", *MF_TINY])  # fmt: skip
    first, second = str(err.value).split("\n")
    assert first.startswith("chemical species O (atomic number 8; in 100 of the 100 frames")
    assert f"in {DFT} (dataset `dft`) has no model type: add O to `model_type_names`" in first
    assert "`data.datasets.dft.split_dataset.dataset.transforms[0]`" in second


def test_multifidelity_missing_file_names_the_dataset_key(tmp_path):
    missing = tmp_path / "xtb.xyz"
    with pytest.raises(FileNotFoundError) as err:
        nequip_train(CONFIGS, "multifidelity", [f"dft_file={DFT}", f"xtb_file={missing}",
                                                f"hydra.run.dir={tmp_path}/r", *MF_TINY])  # fmt: skip
    first, second = str(err.value).split("\n")
    assert first == (
        f"data file not found: {missing} "
        "(config key `data.datasets.xtb.split_dataset.dataset.file_path`)"
    )
    assert second.startswith("It is the data of dataset `xtb`")


# ---------------------------------------------------------------- the data modules


def test_explicit_dataset_lists_name_their_index(alloy, tmp_path):
    dm = NequIPDataModule(
        seed=1, train_dataset=_ase(alloy), val_dataset=[_ase(alloy), _ase(tmp_path / "v.xyz")]
    )
    with pytest.raises(FileNotFoundError, match=r"config key `data\.val_dataset\[1\]\.file_path`"):
        dm.setup("fit")
    dm = NequIPDataModule(
        seed=1, train_dataset=_ase(alloy), val_dataset=_ase(alloy), test_dataset=_ase(alloy, ["Cu"])
    )
    dm.setup("fit")  # the test data is not read when fitting
    with pytest.raises(ValueError) as err:
        dm.setup("test")
    first, second = str(err.value).split("\n")
    assert "Ni (atomic number 28; in " in first and " and Pd (atomic number 46; in " in first
    assert f"in {alloy} (the test dataset `data.test_dataset`) have no model type" in first
    assert "add Ni, Pd to `model_type_names`" in first
    assert "`data.test_dataset.transforms[1]`, maps {Cu: Cu}" in second


def test_every_frame_is_checked_not_only_the_first(alloy, tmp_path):
    """Pd is not in every frame: the count and the first frame are those of the file."""
    import ase.io

    frames = ase.io.read(alloy, index=":")
    with_pd = [i for i, a in enumerate(frames) if "Pd" in a.get_chemical_symbols()]
    assert 0 < len(with_pd) < len(frames)
    dm = NequIPDataModule(
        seed=1, split_dataset={"dataset": _ase(alloy, ["Cu", "Ni"]), "train": 10, "val": 2}
    )
    with pytest.raises(ValueError) as err:
        dm.setup("validate")
    assert f"in {len(with_pd)} of the 12 frames, the first frame {with_pd[0]})" in str(err.value)


def test_multi_dataset_frames_without_a_file_name_the_dataset_config():
    """EMT frames made in memory (no ``file_path``): the dataset's config key instead."""
    dm = F.data_module(unmapped="hi")
    with pytest.raises(ValueError) as err:
        dm.setup("fit")
    first = str(err.value).split("\n")[0]
    assert first.startswith("chemical species Cu (atomic number 29; in 6 of the 6 frames")
    assert "in the frames of `data.datasets.hi.split_dataset.dataset` (dataset `hi`)" in first


def test_multi_dataset_plain_and_explicit_entries(alloy, tmp_path):
    explicit = {"train_dataset": _ase(alloy), "val_dataset": _ase(tmp_path / "b.xyz")}
    dm = MultiDatasetDataModule(
        seed=1, datasets={"a": _ase(alloy), "b": explicit}, train_dataloader={"batch_size": 2}
    )
    with pytest.raises(FileNotFoundError, match=r"`data\.datasets\.b\.val_dataset\.file_path`"):
        dm.setup("fit")
    explicit["val_dataset"] = _ase(alloy)
    dm = MultiDatasetDataModule(
        seed=1,
        datasets={"a": _ase(alloy, ["Cu", "Ni"]), "b": explicit},
        train_dataloader={"batch_size": 2},
    )
    with pytest.raises(ValueError, match=r"\(dataset `a`\) has no model type: add Pd"):
        dm.setup("fit")
    # species the model has types for: set up as before, frames tagged with their dataset
    dm = MultiDatasetDataModule(
        seed=1, datasets={"a": _ase(alloy), "b": explicit}, train_dataloader={"batch_size": 2}
    )
    dm.setup("fit")
    assert [len(d) for d in dm.train_dataset] == [12, 12]
    assert [len(d) for d in dm.val_dataset] == [12]
