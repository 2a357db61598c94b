"""Mixed-dataset test data without MultiDatasetDataModule: nequip's EMT test frames, each
dataset tagged with its ``dataset_index`` by a transform, concatenated into one training
dataset of a plain ``NequIPDataModule``."""

from __future__ import annotations

import math

import torch
from nequip.data import AtomicDataDict
from nequip.data.datamodule import NequIPDataModule

import nequip_mtl.data.keys  # noqa: F401  (registers the dataset_index field)
from nequip_mtl.data.keys import DATASET_INDEX_KEY


class SetDatasetIndex:
    """Transform: tag a frame with its dataset's position."""

    def __init__(self, index: int) -> None:
        self.index = index

    def __call__(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        data = dict(data)
        data[DATASET_INDEX_KEY] = torch.tensor([self.index], dtype=torch.long)
        return data


class NaNLabels:
    """Transform: replace a label by NaN (what a dataset without that label holds once
    its frames are batched with frames that have it)."""

    def __init__(self, field: str) -> None:
        self.field = field

    def __call__(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        data = dict(data)
        data[self.field] = torch.full_like(data[self.field], math.nan)
        return data


def emt(index: int | None, num_frames: int, supercell, seed: int, extra=()) -> dict:
    transforms = [
        {
            "_target_": "nequip.data.transforms.ChemicalSpeciesToAtomTypeMapper",
            "model_type_names": ["Cu"],
            "chemical_species_to_atom_type_map": {"Cu": "Cu"},
        },
        {"_target_": "nequip.data.transforms.NeighborListTransform", "r_max": 4.0},
        *extra,
    ]
    if index is not None:
        transforms.append({"_target_": "tests._per_dataset.SetDatasetIndex", "index": index})
    return {
        "_target_": "nequip.data.dataset.EMTTestDataset",
        "transforms": transforms,
        "supercell": list(supercell),
        "seed": seed,
        "num_frames": num_frames,
        "element": "Cu",
    }


def two_datasets(a_frames=6, b_frames=2, b_extra=(), a_extra=()) -> list[dict]:
    """Dataset ``A`` (index 0, 8-atom frames) then ``B`` (index 1, 4-atom frames)."""
    return [
        emt(0, a_frames, (2, 1, 1), seed=1, extra=a_extra),
        emt(1, b_frames, (1, 1, 1), seed=2, extra=b_extra),
    ]


def mixed_datamodule(datasets: list[dict], batch_size: int = 4, **kwargs) -> NequIPDataModule:
    """``train``: the datasets concatenated in order, unshuffled (so with 6 + 2 frames
    and batches of 4 the first batch holds A only, the second 2 A and 2 B frames)."""
    concat = {"_target_": "torch.utils.data.ConcatDataset", "datasets": datasets}
    return NequIPDataModule(
        seed=1,
        train_dataset=concat,
        val_dataset=concat,
        train_dataloader={"_target_": "torch.utils.data.DataLoader", "batch_size": batch_size},
        val_dataloader={"_target_": "torch.utils.data.DataLoader", "batch_size": batch_size},
        **kwargs,
    )
