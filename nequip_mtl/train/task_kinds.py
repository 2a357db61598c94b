"""The ``tasks:`` argument of the aggregation modules: a :class:`~nequip_mtl.step.TaskKind`
from its name, its ``_target_`` dict or an instance, and the loss's datasets it groups by."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from hydra.utils import instantiate

from ..step import TaskKind

WHERE = "training_module.tasks"


def build_task_kind(spec: Any, where: str = WHERE) -> TaskKind:
    """The task kind ``spec`` names: a registered name (``components``, ``datasets``), a
    Hydra dict with a ``_target_`` building a :class:`~nequip_mtl.step.TaskKind`, or one."""
    if isinstance(spec, TaskKind):
        return spec
    if isinstance(spec, str):
        kinds = TaskKind.registry
        if spec not in kinds:
            close = difflib.get_close_matches(spec, list(kinds), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"`{where}` must be one of {list(kinds)} or a dict with a `_target_` naming a "
                f"nequip_mtl.step.TaskKind subclass, got {spec!r}{hint}"
            )
        return kinds[spec]()
    if isinstance(spec, Mapping) and isinstance(spec.get("_target_"), str):
        built = instantiate(dict(spec))
        if not isinstance(built, TaskKind):
            raise TypeError(
                f"`{where}._target_`={spec['_target_']!r} built a {type(built).__name__}, "
                "not a nequip_mtl.step.TaskKind"
            )
        return built
    raise TypeError(
        f"`{where}` must be a task kind's name {list(TaskKind.registry)} or a dict with a "
        f"`_target_`, got {spec!r}"
    )


def component_datasets(manager: Any) -> dict[str, str | None]:
    """``{component: the dataset whose frames it keeps, or None}`` of a loss manager (a
    :class:`~nequip_mtl.train.DatasetModifier` field keeps one dataset's frames)."""
    if manager is None:
        return {}
    return {name: getattr(entry.field, "dataset", None) for name, entry in manager.entries.items()}


def check_task_datasets(kind: TaskKind, datasets: Mapping[str, str | None], where: str = WHERE):
    """Refuse a kind that groups by dataset when some loss component keeps no dataset."""
    if not kind.needs_datasets:
        return
    missing = [name for name, d in datasets.items() if d is None]
    if missing:
        raise ValueError(
            f"`{where}: {kind.name or type(kind).__name__}` groups the loss components by "
            f"training dataset, but {missing} belong to no dataset; build the loss with "
            "nequip_mtl.train.PerDatasetLoss (components named <dataset>/<component>)"
        )
