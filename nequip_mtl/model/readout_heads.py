"""Per-dataset readout heads: one copy per training dataset of the last linear layer of the
model's per-atom energy readout (:class:`DatasetReadoutHeads`).

Part of packaged models: torch and nequip only.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from nequip.data import AtomicDataDict
from nequip.nn import GraphModuleMixin

from ..data.keys import DATASET_INDEX_KEY
from .dataset_rows import (
    BUILDER,
    WHERE,
    DatasetRows,
    dataset_position,
    is_a,
    require_dataset_index,
)

__all__ = ["DatasetReadoutHeads"]


class DatasetReadoutHeads(GraphModuleMixin, DatasetRows):
    """One copy per training dataset of the last linear layer of the model's per-atom
    energy readout (nequip's ``ScalarMLP`` on ``per_atom_energy``), chosen for each atom by
    its frame's ``dataset_index``; the layers before it are shared.

    Each copy starts equal to the model's own last layer, so a model with heads predicts at
    initialisation exactly what it predicts without them; each dataset's frames then train
    only their own copy. Built by :func:`~nequip_mtl.model.PerDatasetEnergyReferences` with
    ``readout_heads: true``; ``select_fidelity`` folds one copy back into nequip's readout
    (:meth:`folded`).

    Args:
        readout: the model's ``ScalarMLP`` readout (its ``mlp_module.mlp`` a
            ``torch.nn.Sequential`` ending in a ``ScalarLinearLayer``)
        dataset_names: the training datasets, in ``dataset_index`` order
    """

    def __init__(self, readout: torch.nn.Module, dataset_names: Sequence[str]) -> None:
        super().__init__()
        self._init_rows(dataset_names)
        layers = readout.mlp_module.mlp
        last = layers[-1]
        # the shared layers stay in `readout`; its last layer is taken out (an identity)
        self.heads = torch.nn.ModuleList(copy.deepcopy(last) for _ in self.dataset_names)
        layers[-1] = torch.nn.Identity()
        self.readout = readout
        self.field, self.out_field = readout.field, readout.out_field
        irreps_in = dict(readout.irreps_in)
        irreps_in[DATASET_INDEX_KEY] = None
        self._init_irreps(irreps_in=irreps_in, irreps_out=readout.irreps_out)

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        """"""
        require_dataset_index(self, data)
        hidden = self.readout.mlp_module(data[self.field])
        atom_dataset = self._atom_rows(data, hidden.size(0)).unsqueeze(-1)
        out = self.heads[0](hidden)
        for d in range(1, len(self.heads)):
            out = torch.where(atom_dataset == d, self.heads[d](hidden), out)
        data[self.out_field] = out
        return data

    def folded(self, dataset: str) -> torch.nn.Module:
        """The model's own readout (its class, its shared layers) with ``dataset``'s last
        layer: nequip's readout predicting what this module predicts for that dataset."""
        d = dataset_position(self.dataset_names, dataset)
        readout = copy.deepcopy(self.readout)
        readout.mlp_module.mlp[-1] = copy.deepcopy(self.heads[d])
        return readout

    @classmethod
    def readout_of(cls, model: torch.nn.Module) -> tuple[torch.nn.Module, str, torch.nn.Module]:
        """``(parent, name, readout)`` of the one per-atom energy readout of ``model`` whose
        last linear layer can be copied per dataset; refused with the reason otherwise."""
        where = f"{WHERE}.readout_heads"
        found = [
            (parent, name, child)
            for parent in model.modules()
            for name, child in parent.named_children()
            if is_a(child, "ScalarMLP")
            and getattr(child, "out_field", None) == AtomicDataDict.PER_ATOM_ENERGY_KEY
        ]
        if len(found) != 1:
            raise ValueError(
                f"{BUILDER}: `{where}: true` needs the model's per-atom energy readout, one "
                f"nequip ScalarMLP writing `{AtomicDataDict.PER_ATOM_ENERGY_KEY}` (NequIP "
                f"models' `per_atom_energy_readout`); the model `{WHERE}.model` has "
                f"{len(found)}. Models without one (e.g. Allegro, whose energies are read out "
                f"per edge) are not supported: set `{where}: false`"
            )
        layers = getattr(found[0][2].mlp_module, "mlp", None)
        if not (isinstance(layers, torch.nn.Sequential) and is_a(layers[-1], "ScalarLinearLayer")):
            raise ValueError(
                f"{BUILDER}: `{where}: true`: the readout's layers are "
                f"{type(layers).__name__}, not a torch.nn.Sequential ending in nequip's "
                "ScalarLinearLayer (a readout with hidden layers and no nonlinearity is one "
                "fused matrix product, which has no last layer to copy): give the readout a "
                f"nonlinearity (`readout_mlp_nonlinearity`) or set `{where}: false`"
            )
        return found[0]
