"""Multi-fidelity model pieces: per-dataset energy references for training on datasets at
several levels of theory, in one home.

- :func:`PerDatasetEnergyReferences` (:mod:`~nequip_mtl.model.builder`): the config builder,
  wrapping any nequip model;
- :class:`DatasetEnergyShifts` (:mod:`~nequip_mtl.model.energy_shifts`): one per-type energy
  shift per dataset, and its model modifier ``select_fidelity``
  (:mod:`~nequip_mtl.model.select_fidelity`: a plain nequip model at one dataset's level of
  theory);
- :class:`DatasetReadoutHeads` (:mod:`~nequip_mtl.model.readout_heads`): the optional
  per-dataset last readout layer;
- :class:`DatasetTypeEmbedding` (:mod:`~nequip_mtl.model.type_embedding`): the optional
  per-dataset correction of the atom-type embedding (fidelity-aware trunk layers);
- :mod:`~nequip_mtl.model.dataset_rows`: the row-binding mixin they share;
- :mod:`~nequip_mtl.model.reference_fit`: the least-squares fit of each dataset's references
  from its frames (the data module's statistic ``per_dataset_energy_references``).

Imports only torch and nequip (packaged models carry this code).
"""

from ..data.keys import DATASET_INDEX_KEY
from .builder import PerDatasetEnergyReferences
from .energy_shifts import DatasetEnergyShifts
from .readout_heads import DatasetReadoutHeads
from .type_embedding import DatasetTypeEmbedding

__all__ = [
    "DATASET_INDEX_KEY",
    "DatasetEnergyShifts",
    "DatasetReadoutHeads",
    "DatasetTypeEmbedding",
    "PerDatasetEnergyReferences",
]
