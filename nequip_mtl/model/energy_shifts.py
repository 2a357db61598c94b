"""Per-dataset energy references: nequip's per-type energy scale and shift of the shared
model, plus one per-type energy shift per training dataset (:class:`DatasetEnergyShifts`),
and its model modifier ``select_fidelity``.

Part of packaged models (``nequip-package`` interns its code): torch and nequip only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from nequip.data import AtomicDataDict
from nequip.nn import GraphModuleMixin, PerTypeScaleShift
from nequip.nn.model_modifier_utils import model_modifier

from ..data.keys import DATASET_INDEX_KEY
from .dataset_rows import DatasetRows, dataset_position, require_dataset_index
from .select_fidelity import fold_dataset

__all__ = ["DatasetEnergyShifts", "type_values"]


def type_values(module: PerTypeScaleShift, name: str) -> list[float] | None:
    """``scales`` / ``shifts`` of nequip's module as one float64 value per type (``None`` when
    the module has none)."""
    values = getattr(module, name).detach().to(torch.float64).reshape(-1).cpu()
    if values.numel() == 0:
        return None
    if values.numel() == 1:
        return [float(values[0])] * module.num_types
    return [float(v) for v in values]


class DatasetEnergyShifts(GraphModuleMixin, DatasetRows):
    """nequip's per-type energy scale and shift of the shared model, plus one per-type energy
    shift per training dataset, chosen for each frame by its ``dataset_index``.

    The per-atom energy of an atom of type ``t`` in a frame of dataset ``d`` is
    ``base(x)[t] + offsets[d, t]``, where ``base`` is the model's own
    ``nequip.nn.PerTypeScaleShift``; ``offsets[d] = references[d] - base.shifts`` (float64,
    like nequip's scale/shift), so that dataset ``d``'s total per-type shift is its own
    reference. A shift that is constant per atom type changes energies only: forces and
    stresses come from the shared network.

    Built by :func:`~nequip_mtl.model.PerDatasetEnergyReferences`; deployed at one dataset's
    level of theory by the model modifier ``select_fidelity`` (see there).
    """

    def __init__(
        self,
        base: PerTypeScaleShift,
        dataset_names: Sequence[str],
        offsets: torch.Tensor,
        trainable: bool = False,
    ) -> None:
        super().__init__()
        self.base = base
        self._init_rows(dataset_names)
        self.type_names = list(base.type_names)
        self.field, self.out_field = base.field, base.out_field
        self.trainable = bool(trainable)
        offsets = torch.as_tensor(offsets, dtype=base.out_dtype).reshape(
            len(self.dataset_names), len(self.type_names)
        )
        if self.trainable:
            self.offsets = torch.nn.Parameter(offsets.clone())
        else:
            self.register_buffer("offsets", offsets.clone())
        irreps_in = dict(base.irreps_in)
        irreps_in[DATASET_INDEX_KEY] = None
        self._init_irreps(irreps_in=irreps_in, irreps_out=base.irreps_out)

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        """"""
        require_dataset_index(self, data)
        data = self.base(data)
        energy = data[self.out_field]
        atom_dataset = self._atom_rows(data, energy.size(0))
        types = data[AtomicDataDict.ATOM_TYPE_KEY].reshape(-1)
        # as nequip's PerTypeScaleShift: only the local atoms of an ML-IAP ghost layout
        atom_dataset, types = atom_dataset[: energy.size(0)], types[: energy.size(0)]
        data[self.out_field] = energy + self.offsets[atom_dataset, types].unsqueeze(-1)
        return data

    def references(self) -> dict[str, dict[str, float]]:
        """Each dataset's total per-type energy shift (the shared shift plus its offset)."""
        shared = type_values(self.base, "shifts") or [0.0] * len(self.type_names)
        offsets = self.offsets.detach().to(torch.float64).cpu()
        return {
            name: {t: shared[j] + float(offsets[d, j]) for j, t in enumerate(self.type_names)}
            for d, name in enumerate(self.dataset_names)
        }

    def folded(self, dataset: str) -> PerTypeScaleShift:
        """nequip's own ``PerTypeScaleShift`` predicting what this module predicts for the
        frames of ``dataset``: the same scales, and the shared shifts plus that dataset's
        offsets (float64 sums)."""
        d = dataset_position(self.dataset_names, dataset)
        base = self.base
        shared = type_values(base, "shifts") or [0.0] * len(self.type_names)
        offsets = self.offsets.detach().to(torch.float64).cpu()[d]
        shifts = (torch.tensor(shared, dtype=torch.float64) + offsets).tolist()
        scales = type_values(base, "scales")
        if scales is not None and getattr(base, "scales_shortcut", False):
            scales = scales[0]  # keep nequip's single-value form
        elif scales is not None:
            scales = dict(zip(self.type_names, scales))
        # the class of `base` itself: in a loaded package it is the package's copy of nequip's
        cls = type(base)
        new = cls(
            type_names=list(base.type_names),
            field=base.field,
            out_field=base.out_field,
            scales=scales,
            shifts=dict(zip(self.type_names, shifts)),
            scales_trainable=base.scales_trainable,
            shifts_trainable=base.shifts_trainable,
            irreps_in=base.irreps_in,
        )
        return new.to(base.shifts.device if base.shifts.numel() else self.offsets.device)

    @model_modifier(persistent=True, private=False)
    @classmethod
    def select_fidelity(cls, model, dataset: str):
        """Deploy the model at the level of theory of one training dataset.

        The per-dataset energy references are folded into nequip's own per-type energy
        shifts (``shifts[t] + offsets[dataset, t]``, in float64), per-dataset readout heads
        (``readout_heads: true``) into nequip's own readout with that dataset's last layer,
        and ``dataset_index`` is no longer an input: the result is a plain nequip model (the
        same modules and parameter names as the model given to
        ``PerDatasetEnergyReferences``) that predicts exactly what the training model
        predicts for that dataset's frames. Packaged with ``nequip-package``, it loads and
        compiles without ``nequip_mtl`` installed.

        .. code-block:: bash

            nequip-package build best.ckpt multi.nequip.zip
            nequip-package modify multi.nequip.zip dft.nequip.zip \\
                --modifier select_fidelity dataset=dft

        Args:
            dataset: the name of the training dataset whose level of theory to predict
        """
        return fold_dataset(model, dataset, cls)
