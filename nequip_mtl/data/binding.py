"""Dataset names bound to the data module's datasets by name, not by position.

A frame of :class:`~nequip_mtl.data.MultiDatasetDataModule` carries its dataset's position in
``data.datasets`` (``dataset_index``). Everything else names datasets: per-dataset loss and
metric components (``PerDatasetLoss(datasets: [...])``), per-dataset energy references and
readout heads (``PerDatasetEnergyReferences(datasets: [...])``). Their lists may be in any
order: when the data module is set up by a trainer, it calls :func:`bind_dataset_names` on
the training module, and every piece that names datasets resolves its names to positions
there (or refuses a name the data module lacks, naming the config key and the closest
dataset). A piece takes part by having a method ``bind_datasets(names, where)``.

Pure Python (torch modules are walked, nothing is imported from Lightning).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

__all__ = ["bind_dataset_names", "unknown_dataset_message"]


def unknown_dataset_message(key: str, name: str, names: Sequence[str]) -> str:
    """The message for a dataset name ``name`` at config key ``key`` that is not one of the
    data module's datasets ``names``."""
    close = difflib.get_close_matches(str(name), list(names), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return (
        f"`{key}` names the dataset {name!r}, which is not one of the data module's datasets "
        f"{list(names)} (`data.datasets`){hint}"
    )


def bind_dataset_names(module, names: Sequence[str], prefix: str = "training_module") -> int:
    """Bind every submodule of ``module`` that names datasets to ``names`` (the data module's
    datasets, in ``dataset_index`` order): each submodule with a ``bind_datasets(names,
    where)`` method is called with ``where`` its config key (``training_module.loss``,
    ``training_module.val_metrics``, ``training_module.model``, ...).

    Returns:
        how many submodules were bound
    """
    names = [str(n) for n in names]
    count = 0
    for path, sub in module.named_modules():
        bind = getattr(sub, "bind_datasets", None)
        if sub is module or not callable(bind):
            continue
        bind(names, where=f"{prefix}.{path.split('.')[0]}")
        count += 1
    return count
