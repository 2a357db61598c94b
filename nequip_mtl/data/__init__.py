"""The training data: nequip's data module with setup-time checks of the data files and
species (:class:`NequIPDataModule`), several named training datasets as one data module
(:class:`MultiDatasetDataModule`, its sampling laws and the binding of dataset names),
structures labelled by a pretrained model (:class:`PseudolabelledDataset`), and the
per-frame field ``dataset_index`` (:data:`DATASET_INDEX_KEY`).

Nothing is imported eagerly (no nequip, no torch, no ASE), so ``import nequip_mtl.data`` is
cheap and packaged models may import :mod:`nequip_mtl.data.keys`; each name is imported on
first use.

The data generators moved to :mod:`nequip_mtl.tools` and the ``DatasetMetricNames`` callback
to :mod:`nequip_mtl.train.callbacks`: their old names here still work, with a
``DeprecationWarning`` naming the new path.
"""

import importlib

from .._moved import forward_names

_LAZY = {
    # importing `keys` registers the field with nequip
    "DATASET_INDEX_KEY": "keys",
    "NequIPDataModule": "datamodule",
    "check_data_files": "datamodule",
    "check_chemical_species": "datamodule",
    "MultiDatasetDataModule": "multi_dataset",
    "TaggedDataset": "multi_dataset",
    "bind_dataset_names": "binding",
    "MultiDatasetSampler": "sampling",
    "PseudolabelledDataset": "pseudolabels",
}

_TOOLS = (
    "DEFAULT_ELEMENTS",
    "DEFAULT_RATTLE_AMPLITUDES",
    "FRAME_KINDS",
    "LATTICE_CONSTANTS",
    "SUPPORTED_ELEMENTS",
    "compare_labels",
    "generate_frames",
    "generate_xtb_md_frames",
    "make_dataset",
    "relabel_frames",
    "write_frames",
)

_moved = forward_names(
    __name__,
    {
        **{name: f"nequip_mtl.tools:{name}" for name in _TOOLS},
        "DatasetMetricNames": "nequip_mtl.train.callbacks:DatasetMetricNames",
    },
)


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    return _moved(name)


__all__ = [
    "DATASET_INDEX_KEY",
    "MultiDatasetDataModule",
    "MultiDatasetSampler",
    "NequIPDataModule",
    "PseudolabelledDataset",
    "TaggedDataset",
    "bind_dataset_names",
    "check_chemical_species",
    "check_data_files",
]
