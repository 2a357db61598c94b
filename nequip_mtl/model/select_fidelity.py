"""What the model modifier ``select_fidelity`` does: fold one training dataset's energy
references, readout head and type-embedding corrections into nequip's own modules, giving a plain nequip model at that
dataset's level of theory (:meth:`DatasetEnergyShifts.select_fidelity
<nequip_mtl.model.DatasetEnergyShifts.select_fidelity>` is the modifier; nequip finds
modifiers as class methods of the model's modules).

Part of packaged models: torch and nequip only.
"""

from __future__ import annotations

import torch
from nequip.nn.model_modifier_utils import replace_submodules

from ..data.keys import DATASET_INDEX_KEY
from .dataset_rows import dataset_position
from .graph_fields import drop_input_field
from .readout_heads import DatasetReadoutHeads
from .type_embedding import DatasetTypeEmbedding

__all__ = ["fold_dataset"]


def fold_dataset(model: torch.nn.Module, dataset: str, shifts_cls: type) -> torch.nn.Module:
    """Replace every ``shifts_cls`` (the per-dataset energy shifts),
    :class:`DatasetReadoutHeads` and :class:`DatasetTypeEmbedding` module of ``model`` by nequip's own module predicting what it
    predicts for the frames of ``dataset``, and drop ``dataset_index`` from the inputs; an
    unknown ``dataset`` is refused before anything changes."""
    found = [m for m in model.modules() if isinstance(m, shifts_cls)]
    if not found:
        raise RuntimeError(f"select_fidelity: the model has no {shifts_cls.__name__} module")
    # refuse an unknown name before changing anything (readout heads, built with the
    # same `datasets`, are checked by these)
    for module in found:
        dataset_position(module.dataset_names, dataset)
    replace_submodules(model, shifts_cls, lambda old: old.folded(dataset))
    replace_submodules(model, DatasetReadoutHeads, lambda old: old.folded(dataset))
    replace_submodules(model, DatasetTypeEmbedding, lambda old: old.folded(dataset))
    drop_input_field(model, DATASET_INDEX_KEY)
    return model
