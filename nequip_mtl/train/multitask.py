"""Gradient-aggregation training modules: one gradient per loss component, one update."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from nequip.train import EMALightningModule, NequIPLightningModule
from nequip.utils.versions import _TORCH_GE_2_6

from ..aggregators import Aggregator, GramAggregator
from . import setup_checks
from ._compile import prepare_several_backward_passes  # nequip_mtl compile fix
from ._faults import StepFaults
from ._window import HeldWeights, StepWindow
from .loss_components import active_indices, training_loss_components
from .task_gradients import TaskGradients

_NONFINITE_POLICIES = ("skip", "zero_task", "raise")
_CLIP_ALGORITHMS = ("norm", "value")


@dataclasses.dataclass
class TaskGradientStatistics:
    """What the last aggregation saw: enough to derive every norm and cosine.

    Attributes:
        names: the loss components that entered the update, in order
        gram: their ``(m, m)`` float64 Gram matrix ``G @ G.T`` (CPU), after any DDP reduction
        weights: the update is ``weights @ G`` (``None`` for non-Gram aggregators)
        global_step: the trainer's ``global_step`` before that optimizer step
    """

    names: list[str]
    gram: torch.Tensor
    weights: torch.Tensor | None
    global_step: int


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
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
        **kwargs,
    ):
        if _TORCH_GE_2_6:
            # several backward passes through one (possibly compiled) graph: no donated
            # buffers, own compile-cache namespace (nequip_mtl compile fix, docs/compile.md)
            prepare_several_backward_passes()
        setup_checks.check_module_arguments(type(self), kwargs, aggregator)
        setup_checks.check_loss_coeffs(kwargs.get("loss"), type(self).__name__)
        super().__init__(**kwargs)
        self.aggregator = _build_aggregator(aggregator)
        if on_nonfinite not in _NONFINITE_POLICIES:
            raise ValueError(
                f"`on_nonfinite` must be one of {list(_NONFINITE_POLICIES)}, got {on_nonfinite!r}"
            )
        self.on_nonfinite = on_nonfinite
        self.weights_every = _check_weights_every(weights_every, self.aggregator)
        if max_consecutive_skips is not None and (
            isinstance(max_consecutive_skips, bool)
            or not isinstance(max_consecutive_skips, int)
            or max_consecutive_skips < 1
        ):
            raise ValueError(
                "`max_consecutive_skips` must be an integer >= 1 or null (no limit), got "
                f"{max_consecutive_skips!r}"
            )
        self.module_clip_val, self.module_clip_algorithm = _validate_clipping(
            gradient_clip_val, gradient_clip_algorithm
        )
        if self.loss is not None and len(self.loss) < 1:
            raise ValueError("`loss` must have at least one loss component")

        self.faults = StepFaults(max_consecutive_skips)
        #: name -> weight of that task's gradient in the last applied update
        self.applied_task_weights: dict[str, float] = {}
        #: Gram matrix of the task gradients of the last refresh step (for monitors)
        self.task_gradient_statistics: TaskGradientStatistics | None = None
        #: the weights held between refreshes (``weights_every > 1``)
        self.held_weights: HeldWeights | None = None
        self._task_gradients: TaskGradients | None = None
        #: the current micro-batch's active component losses, until its backward pass
        self._batch_losses: dict[int, torch.Tensor] = {}
        #: the current accumulation window, from its first micro-batch to the optimizer step
        self._window: StepWindow | None = None
        self._last_active: list[int] | None = None
        self._warned: set[str] = set()

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped in this run (also logged as ``mtl/skipped_steps``)."""
        return self.faults.skipped

    # ------------------------------------------------------------------ setup

    def on_fit_start(self) -> None:
        trainer = self.trainer
        setup_checks.log_train_time_compile(self)
        check_strategy(trainer.strategy)
        check_precision(trainer.precision_plugin, self.on_nonfinite)
        if self.module_clip_val is not None and trainer.gradient_clip_val is not None:
            raise ValueError(
                "gradient clipping is configured twice: `training_module.gradient_clip_val`="
                f"{self.module_clip_val} and `trainer.gradient_clip_val`={trainer.gradient_clip_val}; "
                "set only one (the trainer's is preferred)"
            )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # With Lightning's DDPStrategy the model is wrapped in DistributedDataParallel,
        # whose reducer would try to sync after each of our per-task backward passes.
        # We reduce the task-gradient matrix ourselves, once, before aggregating.
        ddp_model = getattr(self.trainer.strategy, "model", None)
        if isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel):
            ddp_model.require_backward_grad_sync = False

    # ------------------------------------------------------------------ forward / losses

    def training_step(self, batch, batch_idx: int, dataloader_idx: int = 0):
        """"""
        delim = self.logging_delimiter
        loss_dict = training_loss_components(self, batch, batch_idx, dataloader_idx)
        names = list(self.loss.keys())
        active = active_indices(self.loss)
        if not active:
            raise RuntimeError(
                "At least one loss component must have a `coeff` that is not null; all are null"
            )
        # the world-size factor undoes DDP's averaging, as in nequip (see
        # NequIPLightningModule.training_step): losses are already global-batch means
        self._batch_losses = {
            i: loss_dict[f"train_loss_step{delim}{names[i]}"] * self.world_size for i in active
        }
        return loss_dict[f"train_loss_step{delim}weighted_sum"] * self.world_size

    # ------------------------------------------------------------------ the window

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer) -> None:
        """"""
        super().optimizer_zero_grad(epoch, batch_idx, optimizer)
        # the first micro-batch of an accumulation window (after its training_step,
        # before its backward): decide what this window back-propagates
        active = sorted(self._batch_losses)
        if self._last_active is not None and self._last_active != active:
            self.aggregator.reset()  # the set of active tasks changed
        self._last_active = active
        self._window = self._new_window(active)
        storage = self._storage(max(len(self._window.tasks), 1))
        storage.zero_()

    def _new_window(self, active: list[int]) -> StepWindow:
        names = list(self.loss.keys())
        scale = _grad_scale(self.trainer.precision_plugin)
        factor = scale / self.trainer.accumulate_grad_batches
        coeffs = {names[i]: float(self.loss.entries[names[i]].coeff) for i in active}
        held = self.held_weights
        if len(active) > 1 and held is not None and held.valid_for(coeffs, self.weights_every):
            return StepWindow(active, [], held.weights_by_index(names), scale, factor)
        selected = self.aggregator.select_tasks(len(active)) if len(active) > 1 else None
        tasks = active if selected is None else [active[j] for j in selected]
        return StepWindow(active, tasks, None, scale, factor)

    def _storage(self, num_rows: int) -> TaskGradients:
        params = [p for p in self.parameters() if p.requires_grad]
        storage = self._task_gradients
        if storage is not None and storage.matches(params):
            # a window between refreshes (one row) uses the first row of the refresh's rows
            if storage.num_rows == num_rows or (num_rows == 1 and self.held_weights):
                return storage
        if storage is not None:
            storage.close()
        self._task_gradients = TaskGradients(params, num_rows)
        return self._task_gradients

    # ------------------------------------------------------------------ backward

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        """Accumulate the window's task gradients (or its held-weights sum) into the rows.

        ``loss`` is what Lightning passes after its own scaling; each component is scaled
        by the same factor (``1/accumulate_grad_batches`` times the ``GradScaler``'s scale).
        """
        window, storage = self._window, self._task_gradients
        losses, self._batch_losses = self._batch_losses, {}
        if window.weights is not None:
            total = sum(w * losses[t] for t, w in window.weights.items() if w != 0.0)
            if isinstance(total, torch.Tensor) and total.requires_grad:
                storage.backward(0, total * window.factor, retain_graph=False)
                window.backward_passes += 1
            release_loss_graph(self.loss)
            return
        # a component that does not depend on the parameters on this batch (e.g. a metric
        # with `ignore_nan` and no labels in the batch) has a zero gradient: nothing to do
        rows = [(j, t) for j, t in enumerate(window.tasks) if losses[t].requires_grad]
        for k, (row, task) in enumerate(rows):
            storage.backward(row, losses[task] * window.factor, retain_graph=k < len(rows) - 1)
            window.backward_passes += 1
        release_loss_graph(self.loss)

    # ------------------------------------------------------------------ aggregation

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """"""

        def closure():
            # runs inside `optimizer.step`, before Lightning's `on_before_optimizer_step`
            # hooks and gradient clipping, which therefore see the aggregated update
            result = optimizer_closure()
            self._apply_aggregated_update()
            return result

        try:
            super().optimizer_step(epoch, batch_idx, optimizer, closure)
        finally:
            self._window = None  # the window's state ends with its optimizer step

    def _apply_aggregated_update(self) -> None:
        window, storage = self._window, self._task_gradients
        num_rows = 1 if window.weights is not None else len(window.tasks)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                storage.all_reduce_mean_(num_rows)
        # unscaled units from here on (the rows stay scaled: the GradScaler unscales .grad)
        gram = storage.gram(num_rows) / window.scale**2
        if window.weights is not None:
            self._apply_held_weights(window, storage, gram)
            return

        names = list(self.loss.keys())
        tasks, gram, cause = self._usable_tasks(window, storage, gram, names)
        if cause is not None:
            self._skip_step(storage, cause)
            return
        coeffs = torch.tensor(
            [self.loss.entries[names[i]].coeff for i in tasks], dtype=torch.float64
        )
        rows = [window.tasks.index(t) for t in tasks]
        if len(rows) < len(window.tasks):
            gram = gram[rows][:, rows]
        if len(window.active) == 1:
            # one active component: its plain gradient (no aggregation)
            weights = torch.ones(1, dtype=torch.float64)
            storage.apply_weights(weights)
        elif isinstance(self.aggregator, GramAggregator):
            weights = self.aggregator.weights(gram, coeffs, source_dtype=storage.dtype)
            if not bool(torch.isfinite(weights).all()):
                self._skip_step(
                    storage, f"{type(self.aggregator).__name__} returned non-finite weights"
                )
                return
            storage.apply_weights(weights, rows)
            if self.weights_every > 1:
                self.held_weights = HeldWeights.from_refresh(
                    {names[t]: float(w) for t, w in zip(tasks, weights)},
                    {names[i]: float(self.loss.entries[names[i]].coeff) for i in window.active},
                )
        else:
            matrix = storage.matrix(num_rows)
            matrix = matrix[rows] if len(rows) < num_rows else matrix
            if window.scale != 1.0:
                matrix = matrix / window.scale
            active_coeffs = torch.tensor(
                [self.loss.entries[names[i]].coeff for i in window.active], dtype=matrix.dtype
            ).to(matrix.device)
            computed = [window.active.index(t) for t in tasks]
            update = self.aggregator.aggregate_subset(matrix, active_coeffs, computed)
            if not bool(torch.isfinite(update).all()):
                self._skip_step(
                    storage, f"{type(self.aggregator).__name__} returned a non-finite update"
                )
                return
            storage.apply_update(update * window.scale if window.scale != 1.0 else update)
            weights = None
        self.faults.applied_step()
        self._log_task_statistics([names[i] for i in tasks], gram, weights)

    def _apply_held_weights(self, window: StepWindow, storage: TaskGradients, gram) -> None:
        """A step between refreshes: row 0 holds the gradient of ``sum_i w_i L_i``."""
        held = self.held_weights
        sq = float(gram[0, 0])
        if sq != sq or sq == float("inf"):
            if self.on_nonfinite == "raise" and self._grad_scaler() is None:
                raise FloatingPointError(
                    f"the weighted loss of {sorted(held.weights)} has a non-finite gradient at "
                    f"global step {self.trainer.global_step} (between weight refreshes, "
                    "training_module.weights_every; training_module.on_nonfinite=raise)"
                )
            self.held_weights = None  # refresh on the next step: per-task gradients name it
            self._skip_step(
                storage,
                f"the weighted loss of {sorted(held.weights)} has a "
                f"{'NaN' if sq != sq else 'non-finite'} gradient (a step between weight "
                "refreshes; the next step refreshes and names the component)",
            )
            return
        storage.apply_weights(torch.ones(1, dtype=torch.float64))
        held.age += 1
        self.applied_task_weights = dict(held.weights)
        self.faults.applied_step()

    def _usable_tasks(self, window, storage, gram, names):
        """Drop zero-gradient tasks and apply ``on_nonfinite``; return the tasks kept, their
        Gram, and the cause of a skip (``None`` if the step goes ahead)."""
        sq_norms = gram.diagonal()
        keep: list[int] = []
        for row, task in enumerate(window.tasks):
            sq = float(sq_norms[row])
            if sq != sq or sq == float("inf"):
                what = "a NaN" if sq != sq else self._inf_kind(storage, row)
                cause = (
                    f"loss component {names[task]!r} has {what} gradient at global step "
                    f"{self.trainer.global_step}"
                )
                if self.on_nonfinite == "raise":
                    raise FloatingPointError(cause + " (training_module.on_nonfinite=raise)")
                if self.on_nonfinite == "skip" or self._grad_scaler() is not None:
                    return [], gram[:0, :0], cause
                self._warn_once(
                    "zero_task", cause + "; leaving it out of this step (on_nonfinite=zero_task)"
                )
                self.faults.drop(names[task])
                continue
            if sq == 0.0:
                self._warn_once(
                    "zero",
                    f"loss component {names[task]!r} has a zero gradient on a step; it is left "
                    "out of that step's aggregation (counted in mtl/dropped/<name>; further "
                    "cases are not warned about)",
                )
                self.faults.drop(names[task])
                continue
            keep.append(row)
        if not keep:
            return [], gram[:0, :0], "no loss component has a non-zero gradient on this step"
        return [window.tasks[r] for r in keep], gram, None

    def _inf_kind(self, storage: TaskGradients, row: int) -> str:
        if storage.row_is_finite(row):
            return f"a finite gradient whose squared norm overflows {storage.dtype}; an inf"
        return "an inf"

    def _grad_scaler(self):
        return _active_scaler(self.trainer.precision_plugin)

    def _skip_step(self, storage: TaskGradients, cause: str) -> None:
        scaler = self._grad_scaler()
        if scaler is not None:
            # the GradScaler skips a step with non-finite gradients and lowers its scale
            storage.apply_nonfinite()
            cause += (
                f" (16-mixed: the GradScaler skips the step; loss scale {scaler.get_scale():g})"
            )
        else:
            storage.release_grads()  # `.grad = None`: optimizers leave every parameter alone
        self.applied_task_weights = {}
        self._warn(f"skipping an optimizer step: {cause} (counted in mtl/skipped_steps)")
        self.log("mtl/skipped_steps", float(self.faults.skipped + 1))
        trainer = self.trainer
        self.faults.skipped_step(
            cause, last_batch_of_first_epoch=trainer.current_epoch == 0 and trainer.is_last_batch
        )

    def _warn(self, message: str) -> None:
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=2)

    def _log_task_statistics(
        self, names: list[str], gram: torch.Tensor, weights: torch.Tensor | None
    ) -> None:
        self.task_gradient_statistics = TaskGradientStatistics(
            names, gram, weights, self.trainer.global_step
        )
        stats = {"mtl/skipped_steps": float(self.faults.skipped)}
        stats.update({f"mtl/dropped/{n}": float(c) for n, c in self.faults.dropped.items()})
        if weights is None:
            self.applied_task_weights = {}
            self.log_dict(stats, on_step=True, on_epoch=False)
            return
        norms = gram.diagonal().clamp_min(0).sqrt()
        gw = gram @ weights
        update_norm = (weights @ gw).clamp_min(0).sqrt()
        cos = gw / (norms * update_norm).clamp_min(torch.finfo(torch.float64).tiny)
        self.applied_task_weights = {n: float(w) for n, w in zip(names, weights)}
        for j, name in enumerate(names):
            stats[f"mtl/grad_norm/{name}"] = float(norms[j])
            stats[f"mtl/cos_update/{name}"] = float(cos[j])
            stats[f"mtl/weight/{name}"] = float(weights[j])
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
        checkpoint["nequip_mtl"] = {
            "aggregator": self.aggregator.state_dict(),
            "faults": self.faults.state_dict(),
            "held_weights": None if self.held_weights is None else self.held_weights.state_dict(),
            "last_active": self._last_active,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """"""
        state = checkpoint.get("nequip_mtl")
        if state is not None:
            self.aggregator.load_state_dict(state["aggregator"])
            self.faults.load_state_dict(state["faults"])
            held = state.get("held_weights")
            self.held_weights = None if held is None else HeldWeights.from_state(held)
            self._last_active = state.get("last_active")


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


def check_strategy(strategy) -> None:
    """Reject Lightning strategies whose gradient handling we do not support.

    Supported: single device, and data parallel with replicated parameters
    (:class:`~nequip.train.SimpleDDPStrategy`, Lightning's ``DDPStrategy``). Sharded
    strategies (FSDP, DeepSpeed, model parallel) split parameters or gradients across
    ranks, so no rank holds the full per-task gradient matrix to aggregate.
    """
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise ValueError(
            f"`trainer.strategy`={type(strategy).__name__} is not supported by gradient-"
            "aggregation training modules; use a single device, "
            "nequip.train.SimpleDDPStrategy, or lightning's DDPStrategy"
        )


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


def check_precision(plugin, on_nonfinite: str) -> None:
    """Reject precision plugins whose loss scaling we do not know how to undo.

    Supported: full precision (``32-true``, ``64-true``), ``16-true``/``bf16-true``, and
    automatic mixed precision (``16-mixed`` with or without a ``GradScaler``,
    ``bf16-mixed``). With a ``GradScaler`` an overflowing step is always the scaler's to
    skip, so ``on_nonfinite: zero_task`` (which would apply the other tasks) is refused.
    """
    from lightning.pytorch.plugins.precision import (
        DoublePrecision,
        HalfPrecision,
        MixedPrecision,
        Precision,
    )

    if type(plugin) not in (Precision, DoublePrecision, HalfPrecision) and not isinstance(
        plugin, MixedPrecision
    ):
        raise ValueError(
            f"the precision plugin {type(plugin).__name__} (`trainer.precision` / "
            "`trainer.plugins`) is not supported by gradient-aggregation training modules; use "
            "32-true, 64-true, 16-mixed or bf16-mixed"
        )
    if _active_scaler(plugin) is not None and on_nonfinite == "zero_task":
        raise ValueError(
            "`training_module.on_nonfinite`=zero_task cannot be combined with a GradScaler "
            "(`trainer.precision`=16-mixed): an overflowing task gradient means the loss scale "
            "is too large, and the scaler must skip the whole step; use on_nonfinite: skip"
        )


def _active_scaler(plugin):
    scaler = getattr(plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def _grad_scale(plugin) -> float:
    scaler = _active_scaler(plugin)
    return 1.0 if scaler is None else float(scaler.get_scale())


def _check_weights_every(value: Any, aggregator: Aggregator) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`weights_every` must be an integer >= 1, got {value!r}")
    if value > 1 and not isinstance(aggregator, GramAggregator):
        raise ValueError(
            f"`weights_every`={value} needs an aggregator whose update is a weighted sum of the "
            f"task gradients (a GramAggregator); {type(aggregator).__name__} is not one. Use "
            "weights_every: 1 (its default), or a Gram-based aggregator such as ConFIG or UPGrad"
        )
    return value


def _build_aggregator(aggregator: Mapping | Aggregator | None) -> Aggregator:
    return setup_checks.build_aggregator(aggregator, "training_module.aggregator")


def _validate_clipping(val, algorithm) -> tuple[float | None, str | None]:
    if val is None:
        if algorithm is not None:
            raise ValueError(
                f"`gradient_clip_algorithm`={algorithm!r} is set but `gradient_clip_val` is not"
            )
        return None, None
    if isinstance(val, bool) or not isinstance(val, (int, float)) or not val > 0:
        raise ValueError(f"`gradient_clip_val` must be a number > 0, got {val!r}")
    algorithm = "norm" if algorithm is None else algorithm
    if algorithm not in _CLIP_ALGORITHMS:
        raise ValueError(
            f"`gradient_clip_algorithm` must be one of {list(_CLIP_ALGORITHMS)}, got {algorithm!r}"
        )
    return float(val), algorithm
