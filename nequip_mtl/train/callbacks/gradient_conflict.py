"""Log how much the loss components' gradients conflict, for any NequIP training module."""

from __future__ import annotations

import copy
from typing import Any

import lightning
import torch
from lightning.pytorch.callbacks import Callback
from nequip.utils.versions import _TORCH_GE_2_6

from ...diagnostics.conflict import (
    ConflictStatistics,
    conflict_from_gradients,
    conflict_from_weights,
    conflict_metrics,
)
from ._common import active_names, check_interval, check_positive_int, loss_manager

PREFIX = "grad_conflict"

__all__ = ["GradientConflictMonitor"]


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

    **Where the gradients come from.** With a gradient-aggregation module
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
    without the monitor. With ``accumulate_grad_batches = k`` the task gradients are those
    of the whole effective batch (summed over its micro-batches with Lightning's ``1/k``);
    under DDP they are all-reduced, i.e. of the global batch, as the update is.

    **Which update.** The update is the parameters' ``.grad`` in Lightning's
    ``on_before_optimizer_step`` hook: the combined gradient the optimizer is about to
    use (not the optimizer's step, e.g. Adam's rescaled one). With automatic optimization
    that is *before* trainer-level gradient clipping; modules with manual optimization
    (nequip's ``ConFIGLightningModule``) clip before that hook. Norm clipping rescales the
    update without changing its direction, so the cosines are the same either way; only
    ``update_norm`` differs. Steps that a module skips (no gradient) are not logged.

    Example:

    .. code-block:: yaml

        callbacks:
          - _target_: nequip_mtl.train.callbacks.GradientConflictMonitor
            interval: batch
            frequency: 10

    Args:
        interval (str): ``batch`` or ``epoch``
        frequency (int): number of intervals between monitored steps (>= 1)

    Attributes:
        last_statistics (ConflictStatistics): the statistics of the last monitored step
        last_metrics (dict): the values logged at the last monitored step
        last_step (int): its ``global_step``
        last_source (str): ``"module"`` (reused the module's Gram matrix) or
            ``"autograd"`` (extra backward passes)
    """

    def __init__(self, interval: str, frequency: int):
        self.interval = check_interval(interval, "GradientConflictMonitor.interval")
        self.frequency = check_positive_int(frequency, "GradientConflictMonitor.frequency")
        self.last_statistics: ConflictStatistics | None = None
        self.last_metrics: dict[str, float] = {}
        self.last_step: int | None = None
        self.last_source: str | None = None
        self._window_step: int | None = None
        self._window_due = False
        self._window_batches: list[tuple[Any, int]] = []
        self._monitored_epoch: int | None = None
        self._loss_copy: Any = None

    # ------------------------------------------------------------------ setup

    def setup(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, stage: str
    ) -> None:
        """"""
        if stage != "fit":
            return
        loss_manager(pl_module, "GradientConflictMonitor")
        if not isinstance(getattr(pl_module, "model", None), torch.nn.Module):
            raise TypeError(
                "GradientConflictMonitor needs a NequIP training module (with a `model`), got "
                f"{type(pl_module).__name__}"
            )
        if _TORCH_GE_2_6 and not hasattr(pl_module, "task_gradient_statistics"):
            # the extra per-task backward passes go through one (possibly compiled) graph
            # several times; as nequip's ConFIGLightningModule does (memory only, no
            # effect on the numbers)
            torch._functorch.config.donated_buffer = False
        self._loss_copy = None
        self._reset_window()

    def on_train_start(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule
    ) -> None:
        """"""
        # copied before the first training step: once the loss has run, its metric states
        # hold autograd graphs, which cannot be deep-copied
        self._loss_copy = copy.deepcopy(pl_module.loss)

    def teardown(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, stage: str
    ) -> None:
        """"""
        self._reset_window()
        self._loss_copy = None

    # ------------------------------------------------------------------ scheduling

    def _reset_window(self) -> None:
        self._window_step = None
        self._window_due = False
        self._window_batches = []

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
        # all micro-batches of one accumulation window share the step's `global_step`
        if self._window_step != trainer.global_step:
            self._window_step = trainer.global_step
            self._window_batches = []
            self._window_due = self._is_due(trainer)
        if self._window_due:
            # a reference, not a copy: nequip's forward does not modify its input dict
            self._window_batches.append((batch, batch_idx))

    def on_train_epoch_end(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule
    ) -> None:
        """"""
        self._window_batches = []

    # ------------------------------------------------------------------ measurement

    def on_before_optimizer_step(
        self,
        trainer: lightning.Trainer,
        pl_module: lightning.LightningModule,
        optimizer: torch.optim.Optimizer,
    ) -> None:
        """"""
        if not self._window_due or self._window_step != trainer.global_step:
            return
        params = [p for p in pl_module.model.parameters() if p.requires_grad]
        if not params or all(p.grad is None for p in params):
            return  # a skipped step: nothing is applied
        step = trainer.global_step

        stats, source = None, None
        if hasattr(pl_module, "task_gradient_statistics"):
            recorded = pl_module.task_gradient_statistics
            if recorded is None or recorded.global_step != step:
                return  # the module skipped this step's aggregation
            if recorded.weights is not None:
                stats = conflict_from_weights(recorded.gram, recorded.weights, recorded.names)
                source = "module"
        if stats is None:
            if not self._window_batches:
                return
            stats = self._autograd_statistics(trainer, pl_module, params)
            source = "autograd"

        self._window_due = False
        self._window_batches = []
        self._monitored_epoch = trainer.current_epoch
        self.last_statistics = stats
        self.last_metrics = conflict_metrics(stats, PREFIX)
        self.last_step = step
        self.last_source = source
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(self.last_metrics, step=step)

    def _private_loss(self, pl_module: lightning.LightningModule) -> Any:
        """A private copy of the module's loss ``MetricsManager``, reset, with its current
        coefficients (the module's own is never called: its state feeds the epoch loss)."""
        source = pl_module.loss
        manager = self._loss_copy
        if manager is None:
            raise RuntimeError("GradientConflictMonitor: used before `on_train_start`")
        if list(manager.entries) != list(source.entries):
            raise RuntimeError(
                "GradientConflictMonitor: the training module's loss components changed after "
                f"training started (were {list(manager.entries)}, now {list(source.entries)})"
            )
        manager.reset()
        for name, entry in manager.entries.items():
            entry.coeff = source.entries[name].coeff
        manager.do_weighted_sum = source.do_weighted_sum
        return manager

    def _autograd_statistics(
        self,
        trainer: lightning.Trainer,
        pl_module: lightning.LightningModule,
        params: list[torch.nn.Parameter],
    ) -> ConflictStatistics:
        manager = self._private_loss(pl_module)
        names = active_names(pl_module.loss)
        if not names:
            raise RuntimeError("GradientConflictMonitor: every loss component has `coeff: null`")
        # Lightning divides each micro-batch's loss by `accumulate_grad_batches` in
        # automatic optimization; manual optimization (nequip's ConFIG) has no accumulation
        scale = 1.0 / trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1.0
        device = params[0].device
        sizes = [p.numel() for p in params]
        rows = torch.zeros(len(names), sum(sizes), dtype=torch.float64, device=device)
        cuda = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
        with torch.random.fork_rng(devices=cuda):
            for batch, batch_idx in self._window_batches:
                manager.reset()
                target = pl_module.process_target(batch, batch_idx, 0)
                output = pl_module(batch)
                values = manager(output, target)
                for j, name in enumerate(names):
                    loss = values[name]
                    if not loss.requires_grad:
                        continue  # e.g. `ignore_nan` and no labels in this batch: zero gradient
                    grads = torch.autograd.grad(
                        loss, params, retain_graph=j < len(names) - 1, allow_unused=True
                    )
                    flat = torch.cat(
                        [
                            (g if g is not None else torch.zeros_like(p)).reshape(-1)
                            for g, p in zip(grads, params)
                        ]
                    )
                    rows[j] += flat.to(torch.float64) * scale
                del output, values
        manager.reset()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                # loss values are global means (synced metrics); each rank's autograd sees
                # its own samples, so the global-batch gradient is the sum over ranks
                torch.distributed.all_reduce(rows)
        update = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
        )
        return conflict_from_gradients(rows, update, names)
