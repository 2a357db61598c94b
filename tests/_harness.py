"""Tiny real NequIP training setups for fast tests: EMT data, a small NequIPGNNModel,
a real Lightning Trainer. Everything is real; only sizes are small."""

from __future__ import annotations

import copy

import lightning
import torch
from nequip.data.datamodule import NequIPDataModule
from nequip.utils.global_state import set_global_state

set_global_state()


def datamodule(
    num_frames: int = 12,
    train: int = 8,
    val: int = 4,
    batch_size: int = 4,
    seed: int = 1,
    extra_transforms: list | None = None,
):
    """``extra_transforms``: Hydra configs of data transforms applied after the neighbor
    list (e.g. a transform that adds a label field)."""
    return NequIPDataModule(
        seed=seed,
        split_dataset={
            "dataset": emt(seed, num_frames, supercell=[2, 2, 2], extra=extra_transforms),
            "train": train,
            "val": val,
        },
        train_dataloader={"_target_": "torch.utils.data.DataLoader", "batch_size": batch_size},
        val_dataloader={"_target_": "torch.utils.data.DataLoader", "batch_size": batch_size},
    )


def model_config(dtype: str = "float64", seed: int = 7) -> dict:
    return {
        "_target_": "nequip.model.NequIPGNNModel",
        "seed": seed,
        "model_dtype": dtype,
        "type_names": ["Cu"],
        "r_max": 4.0,
        "l_max": 1,
        "parity": True,
        "num_layers": 1,
        "num_features": 4,
        "radial_mlp_depth": 1,
        "radial_mlp_width": 4,
        "avg_num_neighbors": 12.0,
        "per_type_energy_shifts": {"Cu": -3.0},
        "per_type_energy_scales": {"Cu": 0.5},
    }


def loss_config(
    coeffs: dict | None = None, target: str = "nequip.train.EnergyForceStressLoss"
) -> dict:
    coeffs = coeffs or {"total_energy": 1.0, "forces": 1.0, "stress": 1.0}
    return {
        "_target_": target,
        "per_atom_energy": True,
        "coeffs": coeffs,
    }


def metrics_config() -> dict:
    return {
        "_target_": "nequip.train.EnergyForceStressMetrics",
        "coeffs": {"total_energy_mae": 1.0, "forces_mae": 1.0, "stress_mae": 1.0},
    }


def module_kwargs(dtype: str = "float64", loss: dict | None = None, **overrides) -> dict:
    kwargs = {
        "model": model_config(dtype),
        "num_datasets": {"train": 1, "val": 1, "test": 0, "predict": 0},
        "optimizer": {"_target_": "torch.optim.SGD", "lr": 0.01},
        "loss": loss or loss_config(),
        "val_metrics": metrics_config(),
    }
    kwargs.update(overrides)
    return copy.deepcopy(kwargs)


def trainer(tmp_path, max_epochs: int = 1, limit_train_batches=None, **kwargs) -> lightning.Trainer:
    defaults = dict(
        max_epochs=max_epochs,
        limit_train_batches=limit_train_batches,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
        deterministic=True,
    )
    defaults.update(kwargs)
    return lightning.Trainer(**defaults)


def params(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().double() for p in module.model.parameters()])


def fit(module_cls, tmp_path, *, max_epochs=1, data=None, trainer_kwargs=None, **module_kw):
    """Build a module from :func:`module_kwargs` overrides, fit it, return (module, trainer)."""
    torch.manual_seed(0)
    module = module_cls(**module_kwargs(**module_kw))
    tr = trainer(tmp_path, max_epochs=max_epochs, **(trainer_kwargs or {}))
    tr.fit(module, datamodule=data or datamodule())
    return module, tr


# ---------------------------------------------------------------- several training datasets

STATS = {"_target_": "nequip.data.CommonDataStatisticsManager", "type_names": ["Cu"]}


def emt(seed: int, num_frames: int, supercell=(1, 1, 1), extra: list | None = None) -> dict:
    """nequip's EMT Cu test dataset config (``extra``: further transforms, after the
    neighbor list)."""
    return {
        "_target_": "nequip.data.dataset.EMTTestDataset",
        "transforms": [
            {
                "_target_": "nequip.data.transforms.ChemicalSpeciesToAtomTypeMapper",
                "model_type_names": ["Cu"],
                "chemical_species_to_atom_type_map": {"Cu": "Cu"},
            },
            {"_target_": "nequip.data.transforms.NeighborListTransform", "r_max": 4.0},
            *(extra or []),
        ],
        "supercell": list(supercell),
        "seed": seed,
        "num_frames": num_frames,
        "element": "Cu",
    }


#: name -> (EMT seed, train, val): different seeds, sizes and val splits
SPECS = {"a": (11, 8, 3), "b": (22, 4, 2), "c": (33, 6, 2)}


def splits(names) -> dict:
    return {
        n: {"split_dataset": {"dataset": emt(SPECS[n][0], sum(SPECS[n][1:])), "train": SPECS[n][1],
                              "val": SPECS[n][2]}}
        for n in names
    }  # fmt: skip


def multi(names=("a", "b"), sampling=None, **kw):
    """A ``MultiDatasetDataModule`` of the EMT datasets ``names`` (see ``SPECS``)."""
    from nequip_mtl.data import MultiDatasetDataModule

    kw.setdefault("train_dataloader", {"batch_size": 3})
    kw.setdefault("val_dataloader", {"batch_size": 4})
    return MultiDatasetDataModule(
        seed=5, datasets=splits(names), sampling=sampling, stats_manager=STATS, **kw
    )
