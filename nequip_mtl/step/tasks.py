"""Which losses the engine's tasks are: loss components, or whole datasets.

Pure Python/torch. A *task* is anything with its own gradient row. With
``tasks: components`` every active loss component is a task; with ``tasks: datasets`` the
components of one training dataset (``pretrain/forces_mse``, ``pretrain/per_atom_energy_mse``,
...) make one task, whose loss is their coefficient-weighted mean and whose coefficient is
the sum of theirs, so that ``sum_tasks coeff * loss`` is still the loss's weighted sum.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

TASK_KINDS = ("components", "datasets")
#: what one task is called in messages, for each of ``TASK_KINDS``
TASK_NOUNS = {"components": "loss component", "datasets": "dataset"}
NO_ACTIVE_COMPONENT = (
    "At least one loss component must have a `coeff` that is not null; all are null"
)


@dataclasses.dataclass
class TaskPlan:
    """The tasks of one optimizer step, read from the loss coefficients when it starts.

    Attributes:
        coeffs: ``{task: coeff}`` for every task, in loss order (``None``: inactive)
        parts: ``{task: {component: weight}}``: an active task's loss is
            ``sum weight * component loss`` (weights of one task sum to 1)
    """

    coeffs: dict[str, float | None]
    parts: dict[str, dict[str, float]]

    def losses(self, components: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The active tasks' losses from the component losses of a micro-batch."""
        out = {}
        for task, parts in self.parts.items():
            if len(parts) == 1:
                (name,) = parts
                out[task] = components[name]
            else:
                out[task] = sum(w * components[name] for name, w in parts.items())
        return out


def plan_tasks(
    coeffs: Mapping[str, float | None], datasets: Mapping[str, str] | None = None
) -> TaskPlan:
    """Group loss components into tasks.

    Args:
        coeffs: ``{component: coeff}`` of the loss, in loss order (``None``: inactive)
        datasets: ``None`` for one task per component; else ``{component: dataset}`` for
            every component, for one task per dataset (named by the dataset). A dataset task
            is active if any of its components is; its components' weights are their
            coefficients over the task's coefficient (equal weights if those are all 0)
    """
    if datasets is None:
        return TaskPlan(dict(coeffs), {n: {n: 1.0} for n, c in coeffs.items() if c is not None})
    grouped: dict[str, dict[str, float]] = {}
    for name, c in coeffs.items():
        group = grouped.setdefault(datasets[name], {})
        if c is not None:
            group[name] = float(c)
    task_coeffs: dict[str, float | None] = {}
    parts: dict[str, dict[str, float]] = {}
    for task, group in grouped.items():
        if not group:
            task_coeffs[task] = None
            continue
        total = sum(group.values())
        task_coeffs[task] = total
        parts[task] = {n: (c / total if total > 0 else 1.0 / len(group)) for n, c in group.items()}
    return TaskPlan(task_coeffs, parts)
