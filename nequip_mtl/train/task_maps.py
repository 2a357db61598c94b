"""Which training dataset each loss component keeps (the task maps of ``tasks: datasets``)."""

from __future__ import annotations

from ..step import TASK_KINDS


def _entry_datasets(manager) -> dict[str, str | None]:
    """``{component: the dataset whose frames it keeps, or None}``."""
    return {name: getattr(entry.field, "dataset", None) for name, entry in manager.entries.items()}


def component_datasets(manager) -> dict[str, str] | None:
    """``{component: dataset}`` when every loss component keeps one dataset's frames (a
    ``PerDatasetLoss``), else ``None``."""
    if manager is None:
        return None
    datasets = _entry_datasets(manager)
    return None if any(d is None for d in datasets.values()) else datasets


def datasets_of_components(manager, tasks: str) -> dict[str, str] | None:
    """``{component: dataset}`` for ``tasks: datasets`` (``None`` for components)."""
    if tasks not in TASK_KINDS:
        raise ValueError(
            f"`training_module.tasks` must be one of {list(TASK_KINDS)}, got {tasks!r}"
        )
    if tasks == "components" or manager is None:
        return None
    datasets = _entry_datasets(manager)
    missing = [name for name, d in datasets.items() if d is None]
    if missing:
        raise ValueError(
            f"`training_module.tasks: datasets` groups the loss components by training dataset, "
            f"but {missing} belong to no dataset; build the loss with "
            "nequip_mtl.train.PerDatasetLoss (components named <dataset>/<component>)"
        )
    return datasets
