"""The row-binding mixin shared by the per-dataset modules: one row of parameters per training
dataset, bound to the data module's datasets by name; and the checks of a frame's
``dataset_index`` and of a dataset name.

Part of packaged models: torch and nequip only.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import torch
from nequip.data import AtomicDataDict

from ..data.keys import DATASET_INDEX_KEY

__all__ = [
    "BUILDER",
    "WHERE",
    "DatasetRows",
    "dataset_position",
    "is_a",
    "require_dataset_index",
]

#: the config builder of the per-dataset modules, and where its config lives (error messages)
BUILDER = "PerDatasetEnergyReferences"
WHERE = "training_module.model"


def is_a(module: torch.nn.Module, class_name: str) -> bool:
    """``module`` is an instance of a class named ``class_name`` (by name: a model loaded
    from a package has the package's copy of nequip's classes; a parametrized layer is a
    subclass)."""
    return any(c.__name__ == class_name for c in type(module).__mro__)


def require_dataset_index(module: torch.nn.Module, data: AtomicDataDict.Type) -> None:
    """Refuse a frame without ``dataset_index``, saying how to deploy at one dataset."""
    if DATASET_INDEX_KEY not in data:
        raise RuntimeError(
            f"{type(module).__name__}: the input has no `{DATASET_INDEX_KEY}`: this model "
            f"predicts at the level of theory of each of its datasets {module.dataset_names}. "
            "Frames from nequip_mtl.data.MultiDatasetDataModule carry it; to use the model "
            "at one dataset's level of theory, deploy it with the model modifier "
            "`select_fidelity` (e.g. `nequip-package modify in.nequip.zip out.nequip.zip "
            "--modifier select_fidelity dataset=<name>`)."
        )


def dataset_position(dataset_names: list[str], dataset) -> int:
    """The row of ``dataset`` (a name) in ``dataset_names``, as ``select_fidelity`` asks it."""
    if isinstance(dataset, str) and dataset in dataset_names:
        return dataset_names.index(dataset)
    raise ValueError(
        f"select_fidelity: `dataset` is {dataset!r}, which is not one of this model's "
        f"datasets {dataset_names} (the `datasets` of {BUILDER}, in the data "
        "module's order); name one of them"
    )


class DatasetRows(torch.nn.Module):
    """A module with one row of parameters per name in ``dataset_names``, bound to the data
    module's datasets by name.

    A frame's ``dataset_index`` is its dataset's position in the data module; ``dataset_rows``
    (a non-persistent buffer, the identity until bound) maps it to this module's row of the
    dataset of that name, so ``datasets`` may list the data module's datasets in any order.
    """

    def _init_rows(self, dataset_names: Sequence[str]) -> None:
        self.dataset_names = list(dataset_names)
        rows = torch.arange(len(self.dataset_names), dtype=torch.long)
        self.register_buffer("dataset_rows", rows, persistent=False)

    def bind_datasets(self, names: Sequence[str], where: str = WHERE) -> None:
        """Read the frames of the data module's datasets ``names`` (in ``dataset_index``
        order) with the rows of the same names; refuses a dataset this module has no row for
        (called by the data module at setup)."""
        for name in names:
            if name not in self.dataset_names:
                close = difflib.get_close_matches(name, self.dataset_names, n=1)
                hint = f"; is {close[0]!r} meant to be {name!r}?" if close else ""
                raise ValueError(
                    f"the data module's dataset {name!r} (`data.datasets`) is not one of the "
                    f"datasets {self.dataset_names} of `{where}.datasets` "
                    f"({type(self).__name__}), so its frames have no energy reference or "
                    f"readout head{hint}"
                )
        rows = [self.dataset_names.index(n) for n in names]
        self.dataset_rows = torch.tensor(rows, dtype=torch.long, device=self.dataset_rows.device)

    def _atom_rows(self, data: AtomicDataDict.Type, num_atoms: int) -> torch.Tensor:
        """Each atom's row: that of its frame's dataset."""
        frame_row = self.dataset_rows[data[DATASET_INDEX_KEY].reshape(-1)]
        if AtomicDataDict.BATCH_KEY in data:
            return frame_row[data[AtomicDataDict.BATCH_KEY].reshape(-1)]
        return frame_row.expand(num_atoms)
