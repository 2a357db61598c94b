"""Gradient-aggregation training modules: one gradient per loss component, one update."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from nequip.train import EMALightningModule, NequIPLightningModule
from nequip.utils.versions import _TORCH_GE_2_6

from ..aggregators import Aggregator
from ..distributed import several_ranks
from ..step import (
    EVERY_GRAPH,
    StepEngine,
    StepFaults,
    StepOutcome,
    TaskGradients,
    TaskGradientStatistics,
    TaskKind,
    TaskPlan,
    WindowTracker,
)
from . import aggregator_spec, arguments, coefficients, trainer_checks
from ._compile import log_train_time_compile, prepare_several_backward_passes
from .forward_losses import training_losses_and_output
from .label_checks import check_module_labels, nonfinite_model_state
from .sub_batches import SubBatchOutput
from .task_kinds import build_task_kind, check_task_datasets, component_datasets


class MultitaskLightningModule(NequIPLightningModule):
    """Train with a gradient aggregator instead of the weighted sum of the losses.

    Each training step computes one gradient per *active* loss component (every entry
    of the ``loss`` :class:`~nequip.train.MetricsManager` whose ``coeff`` is not
    ``null``), hands the ``(num_tasks, num_params)`` gradient matrix and the normalised
    coefficients to the ``aggregator``, and writes the aggregated update into the
    parameters' ``.grad``. Everything else is Lightning's automatic optimization, so
    trainer-level gradient clipping (``gradient_clip_val``), any LR scheduler (epoch or
    step interval, ``ReduceLROnPlateau`` on any logged metric), ``accumulate_grad_batches``
    and EMA work exactly as with :class:`~nequip.train.NequIPLightningModule`.

    Semantics:

    - **Gradient accumulation**: per-task gradients are summed over the accumulated
      micro-batches and aggregated once, before the optimizer step, i.e. the aggregator
      sees the gradients of the whole effective batch.
    - **DDP** (:class:`~nequip.train.SimpleDDPStrategy` or Lightning's ``DDPStrategy``):
      the stacked task-gradient matrix is averaged over ranks with one all-reduce per
      step, then aggregated identically on every rank.
    - **Periodic weights** (``weights_every: k``, Gram-based aggregators): the per-task
      gradients and the aggregator's weights ``w`` are computed on every ``k``-th
      optimizer step (a *refresh*); on the steps in between, the single loss
      ``sum_i w_i L_i`` is back-propagated with the last weights: one backward pass,
      the cost of a weighted-sum step. A change of the loss coefficients or of the set
      of active components forces a refresh. Logged statistics and the
      :class:`~nequip_mtl.train.callbacks.GradientConflictMonitor` see refresh steps only.
    - **Mixed precision** (``trainer.precision: 16-mixed`` with a ``GradScaler``, or
      ``bf16-mixed``): the aggregator sees unscaled gradients and logs are in unscaled
      units; a step whose task gradients overflow is handed to the scaler, which skips it
      and lowers its scale, as with a plain backward.
    - **One active component**: its gradient is used as is (a plain backward; no
      aggregation), as in nequip.
    - **Frozen parameters** (``requires_grad=False``), and parameters no active loss
      reaches, get no gradient at all (``.grad`` is ``None``, as with nequip).
    - **Numerical faults**: a task gradient with a NaN/inf entry is handled by
      ``on_nonfinite``; a task whose gradient is exactly zero on a step (e.g. stress
      masked with ``ignore_nan`` in a batch without stress labels) is left out of that
      step's aggregation (counted in ``mtl/dropped/<name>``); if no task remains the step
      is skipped (no parameter changes). Skipped steps are counted in
      ``mtl/skipped_steps`` and the warning names the component and the cause. After
      ``max_consecutive_skips`` skipped steps in a row, or a first epoch without a single
      applied step, training stops with an error naming the first cause.

    Logged (on refresh steps, written at the trainer's ``log_every_n_steps``): the
    per-task gradient norms ``mtl/grad_norm/<name>``, the cosine between the applied update
    and each task gradient ``mtl/cos_update/<name>``, and the weight of each task gradient
    in the update ``mtl/weight/<name>`` (the update is ``sum_i weight_i * grad_i``), all
    from the ``m x m`` Gram matrix the aggregator needs anyway.

    Example:

    .. code-block:: yaml

        training_module:
          _target_: nequip_mtl.train.MultitaskLightningModule
          aggregator:
            _target_: nequip_mtl.aggregators.UPGrad
          weights_every: 8          # per-task gradients every 8th step, weighted sum between
          on_nonfinite: skip
          max_consecutive_skips: 25
          loss:
            _target_: nequip.train.EnergyForceStressLoss
            coeffs: {total_energy: 1.0, forces: 1.0, stress: 1.0}
          # model, optimizer, lr_scheduler, metrics: as for nequip.train.NequIPLightningModule

    Args:
        aggregator (dict or Aggregator): Hydra ``_target_`` dict (or instance) of a
            :class:`nequip_mtl.aggregators.Aggregator` (default: ``ConFIG``)
        weights_every (int): compute per-task gradients and new aggregation weights every
            this many optimizer steps, and train on the weighted sum with the last weights
            in between (default ``1``: every step). Only for Gram-based aggregators.
        on_nonfinite (str): what to do when a task gradient has a NaN/inf entry:
            ``skip`` the optimizer step (default), ``zero_task`` (leave that task out of
            this step), or ``raise`` an error
        max_consecutive_skips (int or None): stop training with an error after this many
            consecutive skipped optimizer steps (default ``25``; ``null``: no limit). A
            first epoch in which every step was skipped always stops the run.
        tasks (str, dict or TaskKind): what a task is: ``components`` (default; every
            active loss component, e.g. ``forces_mse`` or, with a per-dataset loss,
            ``new/forces_mse``) or ``datasets`` (the components of one training dataset
            together, their coefficient-weighted mean; needs a per-dataset loss,
            :func:`~nequip_mtl.train.PerDatasetLoss`), or a ``_target_`` dict of any
            :class:`~nequip_mtl.step.TaskKind`; see ``docs/datasets.md``
        forward_per_dataset (bool, optional): forward each training dataset's frames of a
            batch on their own, so that a dataset's loss depends on its own sub-batch only and
            its backward pass costs that sub-batch's share (default: on with
            ``tasks: datasets``); needs ``nequip_mtl.data.MultiDatasetDataModule``
        gradient_clip_val (float, optional): module-level clipping value, accepted for
            compatibility with nequip's ``ConFIGLightningModule``; prefer the trainer's
            ``gradient_clip_val``. Setting both is an error.
        gradient_clip_algorithm (str, optional): ``norm`` (default) or ``value``, with
            ``gradient_clip_val``
        **kwargs: arguments of :class:`~nequip.train.NequIPLightningModule`
    """

    def __init__(
        self,
        aggregator: Mapping | Aggregator | None = None,
        weights_every: int = 1,
        on_nonfinite: str = "skip",
        max_consecutive_skips: int | None = 25,
        tasks: str | Mapping | TaskKind = "components",
        forward_per_dataset: bool | None = None,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
        **kwargs,
    ):
        if _TORCH_GE_2_6:
            # several backward passes through one (possibly compiled) graph: no donated
            # buffers, own compile-cache namespace (nequip_mtl compile fix, docs/compile.md)
            prepare_several_backward_passes()
        arguments.check_module_arguments(type(self), kwargs, aggregator)
        coefficients.check_loss_coeffs(kwargs.get("loss"), type(self).__name__)
        super().__init__(**kwargs)
        aggregator = aggregator_spec.build_aggregator(aggregator, "training_module.aggregator")
        arguments.check_multitask_arguments(
            aggregator, weights_every, on_nonfinite, max_consecutive_skips, self.loss
        )
        self.module_clip_val, self.module_clip_algorithm = trainer_checks.check_clipping(
            gradient_clip_val, gradient_clip_algorithm
        )
        #: which losses form which task (components, datasets, ...)
        self.task_kind = build_task_kind(tasks)
        self.tasks = self.task_kind.name or type(self.task_kind).__name__
        #: ``{component: the dataset whose frames it keeps, or None}``
        self._component_datasets = component_datasets(self.loss)
        check_task_datasets(self.task_kind, self._component_datasets)
        #: the sub-batch graph each component's loss reaches on a batch forwarded one
        #: dataset at a time: its dataset's, or every one (see nequip_mtl.train.sub_batches)
        self._sub_batch_graph = {
            name: EVERY_GRAPH if dataset is None else dataset
            for name, dataset in self._component_datasets.items()
        }
        if forward_per_dataset is None:
            forward_per_dataset = self.task_kind.needs_datasets
        self.forward_per_dataset = bool(forward_per_dataset)
        #: the tasks of the current optimizer step
        self._plan: TaskPlan | None = None
        #: one optimizer step's life: window, rows, held weights, aggregation (no Lightning)
        self.engine = StepEngine(aggregator, weights_every=weights_every, on_nonfinite=on_nonfinite)
        self.engine.task_noun = self.task_kind.noun
        self.faults = StepFaults(max_consecutive_skips, task_noun=self.task_kind.noun)
        #: name -> weight of that task's gradient in the last applied update
        self.applied_task_weights: dict[str, float] = {}
        #: the task gradients of the last step that computed them (for monitors)
        self.task_gradient_statistics: TaskGradientStatistics | None = None
        self._windows = WindowTracker()
        #: the current micro-batch's active task losses, from its forward to its backward
        self._micro_batch_losses: dict[str, torch.Tensor] = {}
        #: those tasks grouped by the sub-batch graph they are on (``None``: one graph)
        self._micro_batch_graphs: list[list[str]] | None = None
        self._warned: set[str] = set()

    #: this module computes per-task gradients itself (see ``TaskGradientObservable``)
    measures_task_gradients = True

    @property
    def aggregator(self) -> Aggregator:
        return self.engine.aggregator

    @property
    def weights_every(self) -> int:
        return self.engine.weights_every

    @property
    def on_nonfinite(self) -> str:
        return self.engine.on_nonfinite

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped in this run (also logged as ``mtl/skipped_steps``)."""
        return self.faults.skipped

    # ------------------------------------------------------------------ setup

    def on_fit_start(self) -> None:
        trainer = self.trainer
        log_train_time_compile(self)
        trainer_checks.check_strategy(trainer.strategy)
        trainer_checks.check_precision(trainer.precision_plugin, self.on_nonfinite)
        trainer_checks.check_clipping_once(self.module_clip_val, trainer.gradient_clip_val)
        check_module_labels(self)  # the labels the loss needs: present and finite
        # an aggregator that names tasks (PrimaryConstrained) checks them before any step
        self.aggregator.set_tasks(list(self._task_plan().parts))
        self._windows.reset()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # With Lightning's DDPStrategy the model is wrapped in DistributedDataParallel,
        # whose reducer would try to sync after each of our per-task backward passes.
        # We reduce the task-gradient matrix ourselves, once, before aggregating.
        ddp_model = getattr(self.trainer.strategy, "model", None)
        if isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel):
            ddp_model.require_backward_grad_sync = False

    # ------------------------------------------------------------------ one step

    def training_step(self, batch, batch_idx: int, dataloader_idx: int = 0):
        """"""
        trainer = self.trainer
        if self._windows.starts(trainer.global_step):
            # the first micro-batch of an optimizer step: its tasks, and its window
            self._plan = self._task_plan()
            self.engine.begin(
                self._plan.coeffs,
                [p for p in self.parameters() if p.requires_grad],
                scale=_grad_scale(trainer.precision_plugin),
                loss_scaled=trainer_checks.active_scaler(trainer.precision_plugin) is not None,
                accumulate=trainer.accumulate_grad_batches,
            )
        delim = self.logging_delimiter
        loss_dict, output = training_losses_and_output(
            self,
            batch,
            batch_idx,
            dataloader_idx,
            per_dataset=self.forward_per_dataset,
        )
        # the world-size factor undoes DDP's averaging, as in nequip (see
        # NequIPLightningModule.training_step): losses are already global-batch means
        components = {
            name: loss_dict[f"train_loss_step{delim}{name}"] * self.world_size
            for parts in self._plan.parts.values()
            for name in parts
        }
        self._micro_batch_losses = self._plan.losses(components)
        # one graph, or one per dataset's sub-batch
        graphs = self._sub_batch_graph if isinstance(output, SubBatchOutput) else None
        self._micro_batch_graphs = self._plan.graph_groups(graphs)
        return loss_dict[f"train_loss_step{delim}weighted_sum"] * self.world_size

    def _task_plan(self) -> TaskPlan:
        """The tasks under the loss's current coefficients."""
        coeffs = {name: entry.coeff for name, entry in self.loss.entries.items()}
        return self.task_kind.plan(coeffs, self._component_datasets)

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        """Back-propagate the micro-batch's task losses into the engine's rows.

        ``loss`` (Lightning's, after its own scaling) is not used: each task loss is scaled
        by the same factor (``1/accumulate_grad_batches`` times the ``GradScaler``'s scale).
        """
        losses, self._micro_batch_losses = self._micro_batch_losses, {}
        if self._micro_batch_graphs is None:
            self.engine.add(losses)
        else:  # one sub-batch graph per group, freed by the group's last pass
            for tasks in self._micro_batch_graphs:
                self.engine.add({t: losses[t] for t in tasks if t in losses})
        release_loss_graph(self.loss)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """"""

        def closure():
            # runs inside `optimizer.step`, before Lightning's `on_before_optimizer_step`
            # hooks and gradient clipping, which therefore see the aggregated update
            result = optimizer_closure()
            self._record(self.engine.finish(self.trainer.global_step, _reduce_function()))
            return result

        try:
            super().optimizer_step(epoch, batch_idx, optimizer, closure)
        finally:
            self.engine.end()  # the window's state ends with its optimizer step

    def _record(self, outcome: StepOutcome) -> None:
        """Count, warn and log what the engine did."""
        for task, nonfinite in outcome.dropped:
            self.faults.drop(task)
            if nonfinite is None:
                self._warn_once(
                    "zero",
                    f"{self.task_kind.noun} {task!r} has a zero gradient on a step; it is "
                    "left out of that step's aggregation (counted in mtl/dropped/<name>; further cases are "
                    "not warned about)",
                )
            else:
                self._warn_once(
                    "zero_task",
                    nonfinite + "; leaving it out of this step (on_nonfinite=zero_task)",
                )
        self.applied_task_weights = outcome.weights
        if not outcome.applied:
            cause = outcome.cause
            if outcome.all_nonfinite:
                # every task at once: a fault of the model rather than of one task's labels
                bad = nonfinite_model_state(self.model)
                cause += "; every task gradient is non-finite" + (
                    f", and so is the model's own state: {bad}" if bad else ""
                )
            self._skipped(cause)
            return
        self.faults.applied_step()
        if outcome.statistics is not None:
            self.task_gradient_statistics = outcome.statistics
            self._log_statistics(outcome.statistics)

    def _skipped(self, cause: str) -> None:
        scaler = trainer_checks.active_scaler(self.trainer.precision_plugin)
        if scaler is not None:
            cause += (
                f" (16-mixed: the GradScaler skips the step; loss scale {scaler.get_scale():g})"
            )
        warnings.warn(
            f"skipping an optimizer step: {cause} (counted in mtl/skipped_steps)",
            RuntimeWarning,
            stacklevel=2,
        )
        self.log("mtl/skipped_steps", float(self.faults.skipped + 1))
        trainer = self.trainer
        self.faults.skipped_step(
            cause, last_batch_of_first_epoch=trainer.current_epoch == 0 and trainer.is_last_batch
        )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=2)

    def _log_statistics(self, recorded: TaskGradientStatistics) -> None:
        stats = {"mtl/skipped_steps": float(self.faults.skipped)}
        stats.update({f"mtl/dropped/{n}": float(c) for n, c in self.faults.dropped.items()})
        if recorded.weights is not None:
            conflict = recorded.statistics()
            for j, name in enumerate(recorded.names):
                stats[f"mtl/grad_norm/{name}"] = float(conflict.norms[j])
                stats[f"mtl/cos_update/{name}"] = float(conflict.cos_update[j])
                stats[f"mtl/weight/{name}"] = float(recorded.weights[j])
        self.log_dict(stats, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ clipping

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        """"""
        if gradient_clip_val is None and self.module_clip_val is not None:
            gradient_clip_val = self.module_clip_val
            gradient_clip_algorithm = self.module_clip_algorithm
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """"""
        checkpoint["nequip_mtl"] = {**self.engine.state_dict(), "faults": self.faults.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """"""
        state = checkpoint.get("nequip_mtl")
        if state is not None:
            self.engine.load_state_dict(state)
            self.faults.load_state_dict(state["faults"])


class EMAMultitaskLightningModule(MultitaskLightningModule, EMALightningModule):
    """:class:`MultitaskLightningModule` with an exponential moving average of the weights.

    Validation, testing and exported models use the EMA weights, exactly as with
    :class:`~nequip.train.EMALightningModule`; the EMA is updated after every optimizer
    step.

    Example:

    .. code-block:: yaml

        training_module:
          _target_: nequip_mtl.train.EMAMultitaskLightningModule
          ema_decay: 0.999
          aggregator:
            _target_: nequip_mtl.aggregators.UPGrad
          # loss, model, optimizer, ...: as for nequip.train.NequIPLightningModule

    Args:
        ema_decay (float): EMA decay constant (default ``0.999``)
        **kwargs: arguments of :class:`MultitaskLightningModule`
    """


def release_loss_graph(manager) -> None:
    """Drop the loss metrics' reference to the micro-batch's loss values.

    torchmetrics keeps the last ``forward`` value (``_forward_cache``) with its autograd
    graph until the next forward pass. After one backward pass that graph's buffers are
    freed; after several, the parts only the earlier passes went through (retained with
    ``retain_graph=True``) would stay alive into the next step's forward pass.
    """
    for metric in manager.modules():
        if getattr(metric, "_forward_cache", None) is not None:
            metric._forward_cache = None


def _grad_scale(plugin) -> float:
    scaler = trainer_checks.active_scaler(plugin)
    return 1.0 if scaler is None else float(scaler.get_scale())


def _reduce_function():
    """The cross-rank mean of the task-gradient rows under DDP, else ``None``."""
    return TaskGradients.all_reduce_mean_ if several_ranks() else None
