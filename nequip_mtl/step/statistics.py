"""One record of the task gradients of an optimizer step, and what observers read.

Pure torch: monitors (:class:`~nequip_mtl.train.callbacks.GradientConflictMonitor`),
calibration (:class:`~nequip_mtl.train.callbacks.CalibrateLossCoefficients`) and the
coefficient monitor read a training module only through :class:`TaskGradientObservable`.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable

import torch

from ..diagnostics.conflict import ConflictStatistics, conflict_from_weights, conflict_statistics


@dataclasses.dataclass
class TaskGradientStatistics:
    """The task gradients of one optimizer step (one accumulation window), in Gram form.

    Attributes:
        names: the tasks measured, in row order
        gram: ``(m, m)`` float64 Gram matrix ``G @ G.T`` of their gradients (of the
            *unweighted* task losses, with Lightning's ``1/accumulate_grad_batches``,
            summed over the window's micro-batches; of the global batch under DDP)
        weights: the applied update is ``weights @ G``; ``None`` when it is not a
            combination known in Gram form (a non-Gram aggregator, or an ``autograd``
            measurement of another module's update)
        update_dots: ``(m,)`` ``G @ u`` for the applied update ``u`` (``autograd`` only)
        update_sq_norm: ``|u|^2`` (``autograd`` only)
        source: ``"module"`` (the training module's own rows, no extra cost) or
            ``"autograd"`` (extra per-task passes of a probe)
        global_step: the optimizer-step counter before that optimizer step
    """

    names: list[str]
    gram: torch.Tensor
    weights: torch.Tensor | None
    global_step: int
    source: str = "module"
    update_dots: torch.Tensor | None = None
    update_sq_norm: torch.Tensor | None = None

    def statistics(self) -> ConflictStatistics:
        """Norms and cosines of the task gradients (and of the update, where known)."""
        if self.weights is not None:
            return conflict_from_weights(self.gram, self.weights, self.names)
        return conflict_statistics(self.gram, self.names, self.update_dots, self.update_sq_norm)

    def full_gram(self, names: list[str]) -> torch.Tensor:
        """The Gram matrix over ``names`` (a superset of :attr:`names`), with zero rows and
        columns for the tasks that were not measured (a gradient-aggregation module leaves
        tasks with a zero gradient out of a step)."""
        index = torch.tensor([names.index(n) for n in self.names])
        full = torch.zeros(len(names), len(names), dtype=torch.float64)
        full[index[:, None], index[None, :]] = self.gram.detach().to("cpu", torch.float64)
        return full


@runtime_checkable
class TaskGradientObservable(Protocol):
    """What observers read from a training module that weights its tasks itself.

    Implemented by :class:`~nequip_mtl.train.MultitaskLightningModule` (and the modules
    built on it), :class:`~nequip_mtl.train.FAMOLightningModule` and
    :class:`~nequip_mtl.train.UncertaintyWeightingLightningModule`.

    Attributes:
        applied_task_weights: ``{task: weight}`` of each task in the last applied update
            (empty after a skipped step)
        task_gradient_statistics: the task gradients of the last step that measured them
            (``None`` until one did); a module that never computes per-task gradients
            leaves it ``None``
        measures_task_gradients: whether the module computes per-task gradients itself,
            so that a step without a record of its own was not aggregated (skipped)
    """

    applied_task_weights: dict[str, float]
    task_gradient_statistics: TaskGradientStatistics | None
    measures_task_gradients: bool
