"""Offline, seeded multitask data (EMT energies, forces and stresses of fcc alloys; GFN2-xTB
molecular dynamics of a molecule, with ``tblite``) and several training datasets as one data
module; nequip's data module with setup-time checks of the data files and species.

Only ASE and NumPy are imported eagerly (no nequip, no torch), so ``import nequip_mtl.data`` is
cheap; :class:`NequIPDataModule`, :class:`MultiDatasetDataModule`, :class:`DatasetMetricNames`
and the sampler are imported on first use.
"""

from .emt_alloy import (
    DEFAULT_ELEMENTS,
    DEFAULT_RATTLE_AMPLITUDES,
    FRAME_KINDS,
    LATTICE_CONSTANTS,
    SUPPORTED_ELEMENTS,
    generate_frames,
    make_dataset,
    write_frames,
)

_LAZY = {
    # importing `keys` registers the field with nequip
    "DATASET_INDEX_KEY": "keys",
    "NequIPDataModule": "datamodule",
    "check_data_files": "datamodule",
    "check_chemical_species": "datamodule",
    "MultiDatasetDataModule": "multi_dataset",
    "TaggedDataset": "multi_dataset",
    "DatasetMetricNames": "metric_names",
    "bind_dataset_names": "binding",
    "MultiDatasetSampler": "sampling",
    "PseudolabelledDataset": "pseudolabels",
    # lazy so that ``python -m nequip_mtl.data.xtb_md`` runs without a second import of it
    "compare_labels": "xtb_md",
    "generate_xtb_md_frames": "xtb_md",
    "relabel_frames": "xtb_md",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DATASET_INDEX_KEY",
    "DEFAULT_ELEMENTS",
    "DEFAULT_RATTLE_AMPLITUDES",
    "FRAME_KINDS",
    "LATTICE_CONSTANTS",
    "SUPPORTED_ELEMENTS",
    "DatasetMetricNames",
    "MultiDatasetDataModule",
    "MultiDatasetSampler",
    "NequIPDataModule",
    "PseudolabelledDataset",
    "TaggedDataset",
    "bind_dataset_names",
    "check_chemical_species",
    "check_data_files",
    "compare_labels",
    "generate_frames",
    "generate_xtb_md_frames",
    "make_dataset",
    "relabel_frames",
    "write_frames",
]
