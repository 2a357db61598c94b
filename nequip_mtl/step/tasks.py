"""Which losses form which task, and which forward graphs each task's loss reaches.

Pure Python/torch. A *task* is anything with its own gradient row. A :class:`TaskKind` is
the rule that groups loss components into tasks; the training module and the step engine
take the :class:`TaskPlan` it makes and never ask what kind of task they hold. Built in:

- ``components`` (:class:`ComponentTasks`): every active loss component is a task;
- ``datasets`` (:class:`DatasetTasks`): the components of one training dataset
  (``pretrain/forces_mse``, ``pretrain/per_atom_energy_mse``, ...) make one task.

A task's loss is its components' coefficient-weighted mean and its coefficient the sum of
theirs, so that ``sum_tasks coeff * loss`` is the loss's weighted sum whatever the kind.

**A new kind of task** is one subclass with a ``name``, a ``noun`` and :meth:`TaskKind.task_of`,
in a file of its own; users select it by name (``tasks: <name>``, once its module is
imported) or by ``_target_``:

.. code-block:: yaml

    training_module:
      _target_: nequip_mtl.train.MultitaskLightningModule
      tasks: datasets                 # or {_target_: my_package.FieldTasks}
      loss:
        _target_: nequip_mtl.train.PerDatasetLoss
        datasets: [pretrain, new]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping
from typing import Any, ClassVar

import torch

NO_ACTIVE_COMPONENT = (
    "At least one loss component must have a `coeff` that is not null; all are null"
)

#: a component that reads the whole (concatenated) output reaches every forward graph
EVERY_GRAPH = None


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

    def graph_groups(
        self, graph_of: Mapping[str, Hashable | None] | None
    ) -> list[list[str]] | None:
        """The active tasks grouped so that no two groups reach the same forward graph.

        Args:
            graph_of: ``{component: key of the one forward graph its loss reaches}``
                (:data:`EVERY_GRAPH`, ``None``, for a component that reaches every graph);
                ``None`` when the micro-batch has one graph

        Returns ``None`` for one graph; else the groups, in task order, each to be
        back-propagated together (their shared graphs are freed by the group's last pass).
        Tasks whose components' graphs overlap, directly or through other tasks, share a
        group (the connected components of the task-graph relation).
        """
        if graph_of is None:
            return None
        every = any(graph_of[c] is EVERY_GRAPH for parts in self.parts.values() for c in parts)
        if every:
            return [list(self.parts)]
        root: dict[str, str] = {task: task for task in self.parts}

        def find(task: str) -> str:
            while root[task] != task:
                root[task] = root[root[task]]
                task = root[task]
            return task

        owner: dict[Hashable, str] = {}
        for task, parts in self.parts.items():
            for component in parts:
                graph = graph_of[component]
                if graph in owner:
                    root[find(task)] = find(owner[graph])
                else:
                    owner[graph] = task
        groups: dict[str, list[str]] = {}
        for task in self.parts:
            groups.setdefault(find(task), []).append(task)
        return list(groups.values())


class TaskKind:
    """A rule that groups loss components into tasks (see the module docstring).

    Subclasses set ``name`` (the ``tasks:`` value that selects them), ``noun`` (what one
    task is called in messages) and ``needs_datasets`` (every component must keep one
    dataset's frames, as :func:`~nequip_mtl.train.PerDatasetLoss`'s do), and implement
    :meth:`task_of`.
    """

    name: ClassVar[str] = ""
    noun: ClassVar[str] = "task"
    needs_datasets: ClassVar[bool] = False
    #: ``{name: kind class}`` of every kind with a name, filled as subclasses are defined
    registry: ClassVar[dict[str, type[TaskKind]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            TaskKind.registry[cls.name] = cls

    def task_of(self, component: str, dataset: str | None) -> str:
        """The task that loss component ``component`` (keeping the frames of ``dataset``,
        or of every dataset when ``None``) belongs to."""
        raise NotImplementedError

    def plan(
        self, coeffs: Mapping[str, float | None], datasets: Mapping[str, str | None]
    ) -> TaskPlan:
        """The tasks under the loss coefficients ``coeffs`` (``{component: coeff}``, in loss
        order; ``None``: inactive), each component keeping the frames of ``datasets[c]``.

        A task is active if any of its components is; its components' weights are their
        coefficients over the task's coefficient (equal weights if those are all 0).
        """
        grouped: dict[str, dict[str, float]] = {}
        for name, c in coeffs.items():
            group = grouped.setdefault(self.task_of(name, datasets.get(name)), {})
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
            parts[task] = {
                n: (c / total if total > 0 else 1.0 / len(group)) for n, c in group.items()
            }
        return TaskPlan(task_coeffs, parts)


class ComponentTasks(TaskKind):
    """Every active loss component is a task (``tasks: components``, the default)."""

    name = "components"
    noun = "loss component"

    def task_of(self, component: str, dataset: str | None) -> str:
        return component


class DatasetTasks(TaskKind):
    """The components of one training dataset form one task, named by the dataset
    (``tasks: datasets``; needs a per-dataset loss)."""

    name = "datasets"
    noun = "dataset"
    needs_datasets = True

    def task_of(self, component: str, dataset: str | None) -> str:
        assert dataset is not None  # needs_datasets: checked at setup
        return dataset


def plan_tasks(
    coeffs: Mapping[str, float | None], datasets: Mapping[str, str] | None = None
) -> TaskPlan:
    """Group loss components into tasks: one per component (``datasets`` ``None``), or one
    per dataset (``datasets``: ``{component: dataset}`` for every component)."""
    if datasets is None:
        return ComponentTasks().plan(coeffs, {})
    return DatasetTasks().plan(coeffs, datasets)
