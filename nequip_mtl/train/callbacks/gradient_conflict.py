"""Log how much the loss components' gradients conflict, for any NequIP training module.

The measurement itself, one gradient per loss component on one optimizer step, is
:class:`TaskGradientProbe`, shared with
:class:`~nequip_mtl.train.callbacks.CalibrateLossCoefficients`.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning
import torch
from lightning.pytorch.callbacks import Callback

from ...diagnostics.conflict import ConflictStatistics, conflict_metrics
from ...distributed import several_ranks
from ...step import (
    TaskGradientObservable,
    TaskGradients,
    TaskGradientStatistics,
    WindowTracker,
)
from .._compile import prepare_several_backward_passes
from ._common import active_names, check_interval, check_positive_int, loss_manager

PREFIX = "grad_conflict"

__all__ = ["GradientConflictMonitor", "TaskGradientProbe"]


class GradientConflictMonitor(Callback):
    """Log the gradient norm of every loss component and how their gradients conflict.

    Every ``frequency`` optimizer steps (``interval: batch``) or at the first optimizer
    step of every ``frequency``-th epoch (``interval: epoch``; epochs ``0, f, 2f, ...`` as
    nequip's ``LossCoefficientMonitor``), the monitor takes one gradient per *active* loss
    component (``coeff`` not ``null``) on the batch of that step, with respect to the
    trainable parameters of ``pl_module.model``, and logs, to every logger of the trainer:

    - ``grad_conflict/norm/<task>``: the norm of each task gradient (of the *unweighted*
      loss component, e.g. ``forces_mse``);
    - ``grad_conflict/cos/<task_i>~<task_j>``: the cosine similarity of every pair of task
      gradients (negative: the two tasks pull the parameters in opposing directions);
    - ``grad_conflict/cos_update/<task>``: the cosine between each task gradient and the
      update actually applied (negative: this step makes that task worse, to first order);
    - ``grad_conflict/update_norm``: the norm of that update.

    Cosines involving a zero gradient are undefined and not logged. Values are written with
    ``logger.log_metrics(..., step=s)`` where ``s`` is ``trainer.global_step`` *before*
    the optimizer step they describe, so every record reaches the logs regardless of
    ``trainer.log_every_n_steps``.

    **Where the gradients come from** (:class:`TaskGradientProbe`). With a
    gradient-aggregation module
    (:class:`~nequip_mtl.train.MultitaskLightningModule` and its subclasses, e.g.
    ``nequip_mtl.train.ConFIGLightningModule``) the module has already computed the Gram
    matrix of the task gradients and the aggregation weights for this step
    (``task_gradient_statistics``); the monitor reuses them, at zero extra cost. With any
    other module (``nequip.train.NequIPLightningModule``, ``EMALightningModule``, nequip's
    ``ConFIGLightningModule``, the loss-weighting modules of this package, and a
    ``MultitaskLightningModule`` whose aggregator is not Gram-based) the monitor runs, on
    monitored steps only, one extra forward pass of each micro-batch of the step and one
    ``torch.autograd.grad`` per active component, on the parameters *before* the step.
    These use a private copy of the loss ``MetricsManager`` and a forked RNG; nothing the
    training uses is touched (``.grad``, the loss metrics' state and
    ``metrics_values_step``, the RNG), so the training trajectory is exactly the same as
    without the monitor. With ``accumulate_grad_batches = k`` a monitored step is one
    optimizer step (one accumulation window): the extra passes run once, at that step,
    one forward per micro-batch of the window, and the task gradients are those of the
    whole window (summed over its micro-batches with Lightning's ``1/k``, as ``.grad``
    is); under DDP they are all-reduced, i.e. of the global batch, as the update is.

    **Which update.** The update is the parameters' ``.grad`` in Lightning's
    ``on_before_optimizer_step`` hook: the combined gradient the optimizer is about to
    use (not the optimizer's step, e.g. Adam's rescaled one). With automatic optimization
    that is *before* trainer-level gradient clipping; modules with manual optimization
    (nequip's ``ConFIGLightningModule``) clip before that hook. Norm clipping rescales the
    update without changing its direction, so the cosines are the same either way; only
    ``update_norm`` differs. Steps that a module skips (no gradient) are not logged.

    Example (``enabled`` read from a top-level key, so that a run can switch the monitor
    off with ``monitor_conflicts=false`` without knowing its position in the list):

    .. code-block:: yaml

        monitor_conflicts: true
        trainer:
          callbacks:
            - _target_: nequip_mtl.train.callbacks.GradientConflictMonitor
              interval: batch
              frequency: 10
              enabled: ${monitor_conflicts}

    Args:
        interval (str): ``batch`` or ``epoch``
        frequency (int): number of intervals between monitored steps (>= 1)
        enabled (bool): ``false``: the callback does nothing (no extra pass, nothing
            logged; default ``true``)

    Attributes:
        last_statistics (ConflictStatistics): the statistics of the last monitored step
        last_metrics (dict): the values logged at the last monitored step
        last_step (int): its ``global_step``
        last_source (str): ``"module"`` (reused the module's Gram matrix) or
            ``"autograd"`` (extra backward passes)
    """

    def __init__(self, interval: str, frequency: int, enabled: bool = True):
        self.interval = check_interval(interval, "GradientConflictMonitor.interval")
        self.frequency = check_positive_int(frequency, "GradientConflictMonitor.frequency")
        if not isinstance(enabled, bool):
            raise TypeError(
                f"GradientConflictMonitor.enabled must be true or false, got {enabled!r}"
            )
        self.enabled = enabled
        self.last_statistics: ConflictStatistics | None = None
        self.last_metrics: dict[str, float] = {}
        self.last_step: int | None = None
        self.last_source: str | None = None
        self._monitored_epoch: int | None = None
        self._probe = TaskGradientProbe("GradientConflictMonitor")

    def setup(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, stage: str
    ) -> None:
        """"""
        if stage == "fit" and self.enabled:
            self._probe.setup(pl_module)

    def on_train_start(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule
    ) -> None:
        """"""
        if self.enabled:
            self._probe.on_train_start(pl_module)

    def teardown(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, stage: str
    ) -> None:
        """"""
        self._probe.teardown()

    def _is_due(self, trainer: lightning.Trainer) -> bool:
        if self.interval == "batch":
            return trainer.global_step % self.frequency == 0
        epoch = trainer.current_epoch
        return epoch % self.frequency == 0 and self._monitored_epoch != epoch

    def on_train_batch_start(
        self,
        trainer: lightning.Trainer,
        pl_module: lightning.LightningModule,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """"""
        if self.enabled:
            self._probe.on_train_batch_start(
                trainer, batch, batch_idx, lambda: self._is_due(trainer)
            )

    def on_train_epoch_end(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule
    ) -> None:
        """"""
        self._probe.reset_window()

    def on_before_optimizer_step(
        self,
        trainer: lightning.Trainer,
        pl_module: lightning.LightningModule,
        optimizer: torch.optim.Optimizer,
    ) -> None:
        """"""
        measured = self._probe.measure(trainer, pl_module) if self.enabled else None
        if measured is None:
            return
        self._monitored_epoch = trainer.current_epoch
        self.last_statistics = measured.statistics()
        self.last_metrics = conflict_metrics(self.last_statistics, PREFIX)
        self.last_step = measured.global_step
        self.last_source = measured.source
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(self.last_metrics, step=measured.global_step)


class TaskGradientProbe:
    """One gradient per *active* loss component (``coeff`` not ``null``) on chosen
    optimizer steps, for any NequIP training module; the measuring part of a callback.

    The owning callback forwards its Lightning hooks: :meth:`setup`, :meth:`on_train_start`,
    :meth:`teardown`, :meth:`on_train_batch_start` (with whether this step is to be
    measured) and, in ``on_before_optimizer_step``, :meth:`measure`.

    **Where the gradients come from.** With a gradient-aggregation module
    (:class:`~nequip_mtl.train.MultitaskLightningModule` and subclasses) whose aggregator
    is Gram-based, the module's own Gram matrix and weights of this step
    (``task_gradient_statistics``) are reused at zero extra cost. With any other module
    the probe runs, on measured steps only, one extra forward pass of each micro-batch of
    the step and one ``torch.autograd.grad`` per active component, on the parameters
    *before* the step, from a private copy of the loss ``MetricsManager`` and a forked
    RNG: nothing the training uses is touched (``.grad``, the loss metrics' state and
    ``metrics_values_step``, the RNG), so the training trajectory is unchanged.

    **Accumulation and DDP.** A measurement is per optimizer step: with
    ``accumulate_grad_batches = k`` the extra passes run once, at the optimizer step, over
    the ``k`` micro-batches of the window (one forward each), and the task gradients are
    those of the whole window (summed over its micro-batches with Lightning's ``1/k``,
    exactly as the weighted-sum gradient in ``.grad``). Under DDP they are all-reduced,
    i.e. of the global batch, as the update is; every rank gets the same measurement.
    """

    def __init__(self, who: str, per_component: bool = False):
        self.who = who
        #: measure one gradient per loss component even where the module's tasks are
        #: something else (``tasks: datasets``), as calibration needs
        self.per_component = per_component
        self._loss_copy: Any = None
        self._windows = WindowTracker()
        self._window_due = False
        self._window_batches: list[tuple[Any, int]] = []

    # ------------------------------------------------------------------ lifecycle

    def setup(self, pl_module: lightning.LightningModule) -> None:
        loss_manager(pl_module, self.who)
        if not isinstance(getattr(pl_module, "model", None), torch.nn.Module):
            raise TypeError(
                f"{self.who} needs a NequIP training module (with a `model`), got "
                f"{type(pl_module).__name__}"
            )
        if not _measures_task_gradients(pl_module):
            # the extra per-task backward passes go through one (possibly compiled) graph
            # several times: no donated buffers, and compile caches of our own (see
            # docs/compile.md); nequip compiles at the first forward, after this
            prepare_several_backward_passes()
        self._loss_copy = None
        self.reset_window()

    def on_train_start(self, pl_module: lightning.LightningModule) -> None:
        # copied before the first training step: once the loss has run, its metric states
        # hold autograd graphs, which cannot be deep-copied
        self._loss_copy = copy.deepcopy(pl_module.loss)

    def teardown(self) -> None:
        self.reset_window()
        self._loss_copy = None

    def reset_window(self) -> None:
        self._windows.reset()
        self._window_due = False
        self._window_batches = []

    def on_train_batch_start(
        self, trainer: lightning.Trainer, batch: Any, batch_idx: int, due
    ) -> None:
        """Keep the micro-batches of a step to be measured. ``due`` is called (no
        arguments) once per optimizer step, at its first micro-batch."""
        if self._windows.starts(trainer.global_step):
            self._window_batches = []
            self._window_due = bool(due())
        if self._window_due:
            # a reference, not a copy: nequip's forward does not modify its input dict
            self._window_batches.append((batch, batch_idx))

    # ------------------------------------------------------------------ measurement

    def measure(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule
    ) -> TaskGradientStatistics | None:
        """The task gradients of the step about to be applied (call in
        ``on_before_optimizer_step``); ``None`` if this step is not to be measured or is
        skipped by the module (no gradient, or no aggregation)."""
        if not self._window_due or self._windows.step != trainer.global_step:
            return None
        batches = self._window_batches
        self.reset_window()
        params = [p for p in pl_module.model.parameters() if p.requires_grad]
        if not params or all(p.grad is None for p in params):
            return None  # a skipped step: nothing is applied
        step = trainer.global_step
        if _measures_task_gradients(pl_module):
            recorded = pl_module.task_gradient_statistics
            if recorded is None or recorded.global_step != step:
                return None  # the module skipped this step's aggregation
            components = set(active_names(pl_module.loss))
            if recorded.weights is not None and (
                not self.per_component or set(recorded.names) <= components
            ):
                return recorded
            # the module's tasks are not loss components (`tasks: datasets`): measure these
        if not batches:
            return None
        return self._autograd(trainer, pl_module, params, batches, step)

    def _private_loss(self, pl_module: lightning.LightningModule) -> Any:
        """A private copy of the module's loss ``MetricsManager``, reset, with its current
        coefficients (the module's own is never called: its state feeds the epoch loss)."""
        source = pl_module.loss
        manager = self._loss_copy
        if manager is None:
            raise RuntimeError(f"{self.who}: used before `on_train_start`")
        if list(manager.entries) != list(source.entries):
            raise RuntimeError(
                f"{self.who}: the training module's loss components changed after "
                f"training started (were {list(manager.entries)}, now {list(source.entries)})"
            )
        manager.reset()
        for name, entry in manager.entries.items():
            entry.coeff = source.entries[name].coeff
        manager.do_weighted_sum = source.do_weighted_sum
        return manager

    def _autograd(
        self,
        trainer: lightning.Trainer,
        pl_module: lightning.LightningModule,
        params: list[torch.nn.Parameter],
        batches: list[tuple[Any, int]],
        step: int,
    ) -> TaskGradientStatistics:
        manager = self._private_loss(pl_module)
        names = active_names(pl_module.loss)
        if not names:
            raise RuntimeError(f"{self.who}: every loss component has `coeff: null`")
        # Lightning divides each micro-batch's loss by `accumulate_grad_batches` in
        # automatic optimization (also in a last, incomplete window of an epoch); manual
        # optimization (nequip's ConFIG) has no accumulation
        scale = 1.0 / trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1.0
        # the step engine's rows, filled with `torch.autograd.grad`: the training's `.grad`
        # (the update about to be applied) is left alone, and no hook goes on a parameter
        rows = TaskGradients(params, len(names), track_reach=False)
        try:
            cuda = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
            with torch.random.fork_rng(devices=cuda):
                for batch, batch_idx in batches:
                    manager.reset()
                    target = pl_module.process_target(batch, batch_idx, 0)
                    output = pl_module(batch)
                    values = manager(output, target)
                    # a component without a graph (e.g. `ignore_nan` and no labels in this
                    # batch) adds nothing: a zero gradient
                    rows.add_gradients([values[name] for name in names], scale)
                    del output, values
            manager.reset()
            if several_ranks():
                # loss values are global means (synced metrics); each rank's autograd sees
                # its own samples, so the global-batch gradient is the sum over ranks
                rows.all_reduce_sum_(len(names))
            update = [p.grad for p in params]
            update_sq_norm = sum(
                (float((g.double() ** 2).sum()) for g in update if g is not None), 0.0
            )
            return TaskGradientStatistics(
                names,
                rows.gram(len(names)),
                None,
                step,
                source="autograd",
                update_dots=rows.dots(len(names), update),
                update_sq_norm=torch.tensor(update_sq_norm, dtype=torch.float64),
            )
        finally:
            rows.close()


def _measures_task_gradients(pl_module: Any) -> bool:
    """Whether the module records its own task gradients (``TaskGradientObservable``)."""
    return isinstance(pl_module, TaskGradientObservable) and pl_module.measures_task_gradients
