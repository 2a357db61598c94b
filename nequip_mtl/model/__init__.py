"""Model wrappers: per-dataset energy references for multi-fidelity training
(:func:`PerDatasetEnergyReferences`, :class:`DatasetEnergyShifts` and its model modifier
``select_fidelity``, the optional per-dataset readout :class:`DatasetReadoutHeads`).

Imports only torch and nequip (packaged models carry this code).
"""

from .references import (
    DATASET_INDEX_KEY,
    DatasetEnergyShifts,
    DatasetReadoutHeads,
    PerDatasetEnergyReferences,
)

__all__ = [
    "DATASET_INDEX_KEY",
    "DatasetEnergyShifts",
    "DatasetReadoutHeads",
    "PerDatasetEnergyReferences",
]
