"""Helpers for the multi-fidelity tests: a second "level of theory" made from EMT frames by
shifting every frame's energy by a per-atom constant (forces unchanged, as for a change of
energy zero), and tiny multi-dataset data modules and models."""

from __future__ import annotations

from pathlib import Path

import torch

from tests._harness import STATS, emt

REPO = Path(__file__).resolve().parents[1]


class ShiftEnergy:
    """A nequip data transform: ``total_energy += per_atom * num_atoms`` (forces unchanged)."""

    def __init__(self, per_atom: float) -> None:
        self.per_atom = float(per_atom)

    def __call__(self, data: dict) -> dict:
        data = dict(data)
        n = data["pos"].shape[0]
        data["total_energy"] = data["total_energy"] + self.per_atom * n
        return data


#: name -> (EMT seed, frames, per-atom energy shift, supercell): different sizes, so that
#: the per-atom counts differ between frames of one dataset
SPECS = {"lo": (11, 8, 0.0, [1, 1, 1]), "hi": (22, 6, -4.0, [2, 1, 1])}


def dataset(name: str, unmapped: bool = False) -> dict:
    """``unmapped``: the type mapper knows only Ni (the frames are Cu)."""
    seed, frames, shift, supercell = SPECS[name]
    config = emt(seed, frames)
    config["supercell"] = supercell
    if unmapped:
        config["transforms"][0].update(
            model_type_names=["Ni"], chemical_species_to_atom_type_map={"Ni": "Ni"}
        )
    config["transforms"].append({"_target_": "tests._mfid.ShiftEnergy", "per_atom": shift})
    return config


def data_module(names=("lo", "hi"), type_names=("Cu",), unmapped=None, **kw):
    from nequip_mtl.data import MultiDatasetDataModule

    kw.setdefault("train_dataloader", {"batch_size": 4})
    kw.setdefault("val_dataloader", {"batch_size": 4})
    stats = dict(STATS, type_names=list(type_names))
    return MultiDatasetDataModule(
        seed=5,
        datasets={
            n: {
                "split_dataset": {
                    "dataset": dataset(n, unmapped=n == unmapped),
                    "train": SPECS[n][1] - 2,
                    "val": 2,
                }
            }
            for n in names
        },
        stats_manager=stats,
        **kw,
    )


def model_config(dtype: str = "float64", seed: int = 7, type_names=("Cu",)) -> dict:
    return {
        "_target_": "nequip.model.NequIPGNNModel",
        "seed": seed,
        "model_dtype": dtype,
        "type_names": list(type_names),
        "r_max": 4.0,
        "l_max": 1,
        "num_layers": 1,
        "num_features": 4,
        "radial_mlp_depth": 1,
        "radial_mlp_width": 4,
        "avg_num_neighbors": 12.0,
        "per_type_energy_shifts": {t: -3.0 + k for k, t in enumerate(type_names)},
        "per_type_energy_scales": {t: 0.5 for t in type_names},
    }


def batch(module, names=("lo", "hi"), frames_each: int = 2) -> dict:
    """A batch holding ``frames_each`` training frames of each dataset (after setup)."""
    from nequip.data import AtomicDataDict

    module.setup("fit")
    frames = []
    for j, name in enumerate(module.dataset_names):
        if name in names:
            ds = module.train_dataset[j]
            frames += [ds[i] for i in range(frames_each)]
    return AtomicDataDict.batched_from_list(frames)


def nequip_model(config: dict):
    """nequip's own ``NequIPGNNModel`` from a model config (no wrapper)."""
    from nequip.model import NequIPGNNModel

    config = dict(config)
    config.pop("_target_")
    return NequIPGNNModel(**config)


def run(model, batch: dict) -> dict:
    """``model`` on a copy of ``batch`` (models write into their input)."""
    return model(clone(batch))


def as_dataset(batch: dict, d: int) -> dict:
    """A copy of ``batch`` with every frame marked as dataset ``d``."""
    out = clone(batch)
    out["dataset_index"] = torch.full_like(batch["dataset_index"], d)
    return out


def without(batch: dict, key: str) -> dict:
    return {k: v for k, v in batch.items() if k != key}


def clone(batch: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def ethanol_dataset(xyz, type_names=("C", "H", "O")) -> dict:
    return {
        "_target_": "nequip.data.dataset.ASEDataset",
        "file_path": str(xyz),
        "ase_args": {"format": "extxyz"},
        "transforms": [
            {
                "_target_": "nequip.data.transforms.ChemicalSpeciesToAtomTypeMapper",
                "model_type_names": list(type_names),
                "chemical_species_to_atom_type_map": {t: t for t in type_names},
            },
            {"_target_": "nequip.data.transforms.NeighborListTransform", "r_max": 4.5},
        ],
    }
