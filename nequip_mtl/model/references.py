"""Split by job into :mod:`nequip_mtl.model.energy_shifts`, :mod:`~nequip_mtl.model.readout_heads`,
:mod:`~nequip_mtl.model.builder` and :mod:`~nequip_mtl.model.select_fidelity`; its names are
forwarded there (this path still works, with a DeprecationWarning)."""

from .._moved import forward_names

__getattr__ = forward_names(
    __name__,
    {
        "DATASET_INDEX_KEY": "nequip_mtl.data.keys:DATASET_INDEX_KEY",
        "DatasetEnergyShifts": "nequip_mtl.model:DatasetEnergyShifts",
        "DatasetReadoutHeads": "nequip_mtl.model:DatasetReadoutHeads",
        "PerDatasetEnergyReferences": "nequip_mtl.model:PerDatasetEnergyReferences",
    },
)
