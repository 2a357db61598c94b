"""Fidelity-aware trunk layers: a per-dataset correction of the model's atom-type embedding
(:class:`DatasetTypeEmbedding`), so that every layer of the shared network knows which level
of theory it is asked for.

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

__all__ = ["DatasetTypeEmbedding"]


class DatasetTypeEmbedding(GraphModuleMixin, DatasetRows):
    """nequip's atom-type embedding plus one learned correction per (dataset, type): an atom
    of type ``t`` in a frame of dataset ``d`` starts with the features
    ``embed[t] + corrections[d, t]``.

    The embedding is the input of every layer of a NequIP model: it is the first layer's node
    features, and the ``node_attrs`` of every interaction block's self-connection. So the
    dataset (level of theory) reaches all hidden layers, not only the readout: the role of the
    fidelity one-hot that SevenNet-MF feeds to its linear layers, with nequip's own embedding
    as the building block. The corrections start at zero, so at initialisation the model
    predicts exactly what it predicts without them; each dataset's frames train only their
    own corrections, the shared embedding is trained by all.

    Built by :func:`~nequip_mtl.model.PerDatasetEnergyReferences` with
    ``fidelity_embedding: true``::

        training_module:
          model:
            _target_: nequip_mtl.model.PerDatasetEnergyReferences
            datasets: [dft, xtb]
            references: ${training_data_stats:per_dataset_energy_references}
            readout_heads: true
            fidelity_embedding: true
            model: {_target_: nequip.model.NequIPGNNModel, ...}

    ``select_fidelity`` folds dataset ``d``'s corrections into nequip's own embedding
    (``weight + corrections[d]``, the same sums the training model makes per atom), so the
    deployed model is a plain nequip model predicting exactly what this one predicts for
    ``d``'s frames (:meth:`folded`).

    Args:
        embed: the model's ``NodeTypeEmbed`` (its ``embed_module`` a ``torch.nn.Embedding``
            over the type names; nequip's categorical graph-field embeddings, if any, are
            kept as they are)
        dataset_names: the training datasets, in ``dataset_index`` order
    """

    def __init__(self, embed: torch.nn.Module, dataset_names: Sequence[str]) -> None:
        super().__init__()
        self._init_rows(dataset_names)
        self.embed = embed
        table = embed.embed_module.weight
        self.corrections = torch.nn.Parameter(
            torch.zeros((len(self.dataset_names), *table.shape), dtype=table.dtype)
        )
        self.num_type_features = table.size(1)
        self.set_features = bool(embed.set_features)
        irreps_in = dict(embed.irreps_in)
        irreps_in[DATASET_INDEX_KEY] = None
        self._init_irreps(irreps_in=irreps_in, irreps_out=embed.irreps_out)

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        """"""
        require_dataset_index(self, data)
        data = self.embed(data)
        attrs = data[AtomicDataDict.NODE_ATTRS_KEY]
        rows = self._atom_rows(data, attrs.size(0))
        types = data[AtomicDataDict.ATOM_TYPE_KEY].reshape(-1)
        correction = self.corrections[rows, types]
        if attrs.size(1) == self.num_type_features:
            attrs = attrs + correction
        else:  # categorical graph-field features follow the type features: left alone
            n = self.num_type_features
            attrs = torch.cat([attrs[:, :n] + correction, attrs[:, n:]], dim=1)
        data[AtomicDataDict.NODE_ATTRS_KEY] = attrs
        if self.set_features:
            data[AtomicDataDict.NODE_FEATURES_KEY] = attrs
        return data

    def folded(self, dataset: str) -> torch.nn.Module:
        """The model's own ``NodeTypeEmbed`` (its class, its parameter names) whose type
        table is ``weight + corrections[dataset]``: it embeds every atom as this module does
        for the frames of ``dataset``."""
        d = dataset_position(self.dataset_names, dataset)
        embed = copy.deepcopy(self.embed)
        with torch.no_grad():
            embed.embed_module.weight.copy_(self.embed.embed_module.weight + self.corrections[d])
        return embed

    @classmethod
    def embedding_of(cls, model: torch.nn.Module) -> tuple[torch.nn.Module, str, torch.nn.Module]:
        """``(parent, name, embed)`` of the one atom-type embedding of ``model`` (nequip's
        ``NodeTypeEmbed``); refused with the reason otherwise."""
        found = [
            (parent, name, child)
            for parent in model.modules()
            for name, child in parent.named_children()
            if is_a(child, "NodeTypeEmbed")
        ]
        where = f"{WHERE}.fidelity_embedding"
        if len(found) != 1:
            raise ValueError(
                f"{BUILDER}: `{where}: true` needs the model's atom-type embedding, one nequip "
                f"NodeTypeEmbed (NequIP models' `type_embed`); the model `{WHERE}.model` has "
                f"{len(found)}. Set `{where}: false` for this model"
            )
        embed = found[0][2]
        if not isinstance(getattr(embed, "embed_module", None), torch.nn.Embedding):
            raise ValueError(
                f"{BUILDER}: `{where}: true`: the model's NodeTypeEmbed has no "
                "`embed_module` torch.nn.Embedding to correct per dataset (another nequip "
                f"version?); set `{where}: false`"
            )
        return found[0]
