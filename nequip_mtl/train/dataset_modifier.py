"""One training dataset's part of a field: a nequip field modifier for per-dataset losses.

Which forward graph the selection reaches is the sub-batch contract's
(:func:`~nequip_mtl.train.sub_batches.dataset_part`); this module says which rows are the
dataset's (frames, their atoms, or the edges from those atoms) and binds the dataset's
name to its position in the data module.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from nequip.data import AtomicDataDict, BaseModifier

from ..data.keys import DATASET_INDEX_KEY
from .sub_batches import dataset_part

__all__ = ["DatasetModifier", "label_key"]


def label_key(field: BaseModifier) -> str:
    """The label (target field) a nequip field modifier reads."""
    if isinstance(field, DatasetModifier):
        return label_key(field.inner)
    return getattr(field, "target_field", field.field)


class DatasetModifier(BaseModifier):
    """Keep one training dataset's part of a field (a nequip field modifier).

    For a per-frame field (``total_energy``, ``stress``, or a
    :class:`~nequip.data.PerAtomModifier`) the frames whose
    ``dataset_index`` equals ``dataset_index`` are kept; for a per-atom field (``forces``)
    the atoms of those frames; for a per-edge field the edges starting at those atoms. The
    dataset index is read from the labels (the second data dict), where nequip always keeps
    it.

    .. code-block:: yaml

        # one entry of a PerDatasetMetricsManager's `metrics`
        - name: new/forces_mse
          field:
            _target_: nequip_mtl.train.DatasetModifier
            field: forces
            dataset: new          # the data module's dataset `new`, bound by name
          coeff: 1.0
          metric:
            _target_: nequip.train.MeanSquaredError

    **Bound by name.** A modifier with a ``dataset`` name reads that dataset's frames,
    wherever it stands in the data module's ``datasets``: when a trainer sets up
    :class:`~nequip_mtl.data.MultiDatasetDataModule`, the manager holding the modifier
    resolves the name to its position (:meth:`bind`), and a name the data module lacks is
    refused there. ``dataset_index`` is used as given only without a ``dataset`` name, or
    outside a trainer before any binding.

    Args:
        field (str or BaseModifier): the field, or a nequip modifier of it
        dataset_index (int, optional): the dataset's position in the data module's
            ``datasets`` (a name's position is taken from the data module at setup)
        dataset (str, optional): the dataset's name (the default: ``str(dataset_index)``,
            bound to nothing)
        missing_ok (bool): when the labels have no such field at all, give an empty
            selection instead of an error (default ``False``; see ``ignore_missing`` of
            :func:`PerDatasetLoss`)
    """

    def __init__(
        self,
        field: str | BaseModifier,
        dataset_index: int | None = None,
        dataset: str | None = None,
        missing_ok: bool = False,
    ) -> None:
        inner = BaseModifier(field) if isinstance(field, str) else field
        if not isinstance(inner, BaseModifier):
            raise TypeError(
                f"DatasetModifier.field must be a field name or a nequip field modifier, "
                f"got {field!r}"
            )
        if dataset_index is None and dataset is None:
            raise ValueError("DatasetModifier needs a `dataset` name (or a `dataset_index`)")
        if dataset_index is not None:
            if isinstance(dataset_index, bool) or not isinstance(dataset_index, int):
                raise TypeError(
                    f"DatasetModifier.dataset_index must be an int, got {dataset_index!r}"
                )
            if dataset_index < 0:
                raise ValueError(f"DatasetModifier.dataset_index must be >= 0, got {dataset_index}")
        super().__init__(inner.field)
        self.inner = inner
        self.dataset_index = dataset_index
        #: the name binds; without one the modifier keeps its index
        self.named = dataset is not None
        self.dataset = str(dataset_index) if dataset is None else str(dataset)
        self.missing_ok = bool(missing_ok)

    def bind(self, names: Sequence[str]) -> bool:
        """Read the frames of the data module's dataset of this modifier's name: its
        position in ``names`` (the data module's datasets). ``False`` if ``names`` lacks it
        (a modifier without a name keeps its index and is always bound)."""
        if not self.named:
            return True
        if self.dataset not in names:
            return False
        self.dataset_index = list(names).index(self.dataset)
        return True

    @property
    def type(self) -> str:
        return self.inner.type

    def __str__(self) -> str:
        return f"{self.dataset}/{self.inner}"

    def _mask(self, data: AtomicDataDict.Type) -> torch.Tensor:
        if DATASET_INDEX_KEY not in data:
            raise KeyError(
                f"the loss/metric component {self} keeps the frames of dataset "
                f"{self.dataset!r}, but the batch has no `{DATASET_INDEX_KEY}` field: use "
                "nequip_mtl.data.MultiDatasetDataModule (whose frames carry it) as the data module"
            )
        if self.dataset_index is None:
            raise RuntimeError(
                f"the loss/metric component {self} keeps the frames of dataset "
                f"{self.dataset!r}, but no data module has bound that name to a dataset: "
                "train with nequip_mtl.data.MultiDatasetDataModule, or call the manager's "
                "`bind_datasets(names)` first"
            )
        frames = data[DATASET_INDEX_KEY].reshape(-1) == self.dataset_index
        kind = self.type
        if kind == "graph":
            return frames
        if AtomicDataDict.BATCH_KEY in data:
            atoms = frames[data[AtomicDataDict.BATCH_KEY]]
        else:  # an unbatched single frame
            num = data[AtomicDataDict.POSITIONS_KEY].shape[0]
            atoms = frames[:1].expand(num)
        if kind == "node":
            return atoms
        if kind == "edge":
            return atoms[data[AtomicDataDict.EDGE_INDEX_KEY][0]]
        raise ValueError(f"DatasetModifier: unsupported field type {kind!r} of {self.inner}")

    def __call__(self, data1: AtomicDataDict.Type, data2: AtomicDataDict.Type | None = None):
        # which graph the selection reaches is the sub-batch contract's (dataset_part)
        if data2 is None:
            return dataset_part(self.inner, data1, self.dataset_index, self._mask(data1))
        mask = self._mask(data2)
        if self.missing_ok and label_key(self.inner) not in data2:
            empty = dataset_part(self.inner, data1, None, torch.zeros_like(mask))
            return empty, empty.detach()
        target = self.inner(data1, data2)[1]
        return dataset_part(self.inner, data1, self.dataset_index, mask), target[mask]
