"""Gradient-aggregation training modules: one gradient per loss component, one update."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from hydra.utils import instantiate
from nequip.train import EMALightningModule, NequIPLightningModule
from nequip.utils.versions import _TORCH_GE_2_6

from ..aggregators import Aggregator, ConFIG
from ._step import active_indices, training_loss_components
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
    - **One active component**: its gradient is used as is (a plain backward; no
      aggregation), as in nequip.
    - **Frozen parameters** (``requires_grad=False``) get no gradient at all.
    - **Numerical faults**: a task gradient with a NaN/inf entry is handled by
      ``on_nonfinite``; a task whose gradient is exactly zero on a step (e.g. stress
      masked with ``ignore_nan`` in a batch without stress labels) is left out of that
      step's aggregation; if no task remains the step is skipped (no parameter changes).
      Skipped steps are counted and logged as ``mtl/skipped_steps``.

    Logged (every step, written at the trainer's ``log_every_n_steps``): the per-task
    gradient norms ``mtl/grad_norm/<name>``, the cosine between the applied update and
    each task gradient ``mtl/cos_update/<name>``, and the weight of each task gradient in
    the update ``mtl/weight/<name>`` (the update is ``sum_i weight_i * grad_i``), all from
    the ``m x m`` Gram matrix the aggregator needs anyway.

    Example:

    .. code-block:: yaml

        training_module:
          _target_: nequip_mtl.train.MultitaskLightningModule
          aggregator:
            _target_: nequip_mtl.aggregators.ConFIG
          on_nonfinite: skip
          loss:
            _target_: nequip.train.EnergyForceStressLoss
            coeffs: {total_energy: 1.0, forces: 1.0, stress: 1.0}
          # model, optimizer, lr_scheduler, metrics: as for nequip.train.NequIPLightningModule

    Args:
        aggregator (dict or Aggregator): Hydra ``_target_`` dict (or instance) of a
            :class:`nequip_mtl.aggregators.Aggregator` (default: ``ConFIG``)
        on_nonfinite (str): what to do when a task gradient has a NaN/inf entry:
            ``skip`` the optimizer step (default), ``zero_task`` (leave that task out of
            this step), or ``raise`` an error
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
        on_nonfinite: str = "skip",
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
        **kwargs,
    ):
        if _TORCH_GE_2_6:
            # several backward passes through one (possibly compiled) graph
            torch._functorch.config.donated_buffer = False
        super().__init__(**kwargs)
        self.aggregator = _build_aggregator(aggregator)
        if on_nonfinite not in _NONFINITE_POLICIES:
            raise ValueError(
                f"`on_nonfinite` must be one of {list(_NONFINITE_POLICIES)}, got {on_nonfinite!r}"
            )
        self.on_nonfinite = on_nonfinite
        self.module_clip_val, self.module_clip_algorithm = _validate_clipping(
            gradient_clip_val, gradient_clip_algorithm
        )
        if self.loss is not None and len(self.loss) < 1:
            raise ValueError("`loss` must have at least one loss component")

        self.skipped_steps = 0
        #: name -> weight of that task's gradient in the last applied update
        self.applied_task_weights: dict[str, float] = {}
        #: Gram matrix of the task gradients of the last applied update (for monitors)
        self.task_gradient_statistics: TaskGradientStatistics | None = None
        self._task_gradients: TaskGradients | None = None
        self._step_losses: dict[int, torch.Tensor] = {}
        self._step_tasks: list[int] = []
        self._window_active: list[int] | None = None
        self._selected: list[int] | None = None
        self._returned_loss: torch.Tensor | None = None
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ setup

    def on_fit_start(self) -> None:
        trainer = self.trainer
        check_strategy(trainer.strategy)
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
        self._step_tasks = active_indices(self.loss)
        if not self._step_tasks:
            raise RuntimeError(
                "At least one loss component must have a `coeff` that is not null; all are null"
            )
        # the world-size factor undoes DDP's averaging, as in nequip (see
        # NequIPLightningModule.training_step): losses are already global-batch means
        self._step_losses = {
            i: loss_dict[f"train_loss_step{delim}{names[i]}"] * self.world_size
            for i in self._step_tasks
        }
        loss = loss_dict[f"train_loss_step{delim}weighted_sum"] * self.world_size
        self._returned_loss = loss
        return loss

    # ------------------------------------------------------------------ backward

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        """Accumulate one gradient per active loss component into the task-gradient rows.

        ``loss`` is what Lightning passes after its own scaling (``1/accumulate_grad_batches``,
        precision-plugin loss scaling); the same factor is applied to every component.
        """
        storage = self._storage()
        scale = self._loss_scale(loss)
        # a component that does not depend on the parameters on this batch (e.g. a metric
        # with `ignore_nan` and no labels in the batch) has a zero gradient: nothing to do
        tasks = [t for t in self._computed_tasks() if self._step_losses[t].requires_grad]
        for j, task in enumerate(tasks):
            storage.backward(task, self._step_losses[task] * scale, retain_graph=j < len(tasks) - 1)
        self._step_losses = {}

    def _loss_scale(self, loss: torch.Tensor) -> torch.Tensor | float:
        returned = self._returned_loss
        if returned is None or loss is returned:
            return 1.0
        # Lightning's factor (1/accumulate_grad_batches, precision-plugin scaling) as the
        # ratio of what it back-propagates to what training_step returned; when that is
        # undefined (a zero, NaN or inf weighted sum) use the accumulation factor. No host
        # sync either way.
        ratio = loss.detach() / returned.detach()
        fallback = torch.full_like(ratio, 1.0 / self.trainer.accumulate_grad_batches)
        return torch.where(torch.isfinite(ratio) & (returned.detach() != 0), ratio, fallback)

    def _storage(self) -> TaskGradients:
        params = [p for p in self.parameters() if p.requires_grad]
        if self._task_gradients is None or not self._task_gradients.matches(params):
            self._task_gradients = TaskGradients(params, len(self.loss))
        return self._task_gradients

    def _computed_tasks(self) -> list[int]:
        """The active tasks back-propagated in this accumulation window."""
        active = self._step_tasks
        if self._selected is None or self._window_active != active:
            return active
        return [active[j] for j in self._selected]

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer) -> None:
        """"""
        super().optimizer_zero_grad(epoch, batch_idx, optimizer)
        # the first micro-batch of an accumulation window: start new task gradients and
        # let the aggregator choose which tasks to back-propagate in this window
        if self._task_gradients is not None:
            self._task_gradients.zero_()
        if self._window_active is not None and self._window_active != self._step_tasks:
            self.aggregator.reset()  # the set of active tasks changed
        self._window_active = list(self._step_tasks)
        self._selected = self.aggregator.select_tasks(len(self._step_tasks))

    # ------------------------------------------------------------------ aggregation

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """"""

        def closure():
            # runs inside `optimizer.step`, before Lightning's `on_before_optimizer_step`
            # hooks and gradient clipping, which therefore see the aggregated update
            result = optimizer_closure()
            self._apply_aggregated_update()
            return result

        super().optimizer_step(epoch, batch_idx, optimizer, closure)

    def _apply_aggregated_update(self) -> None:
        storage = self._task_gradients
        active = list(self._step_tasks)
        tasks = self._computed_tasks()
        if storage is None or not tasks:
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                storage.all_reduce_mean_(tasks)

        names = list(self.loss.keys())
        gram = storage.gram(tasks)
        tasks, gram = self._drop_faulty_tasks(tasks, gram, names)
        if not tasks:
            self._skip_step(storage, "no task has a usable gradient on this step")
            return

        coeffs = torch.tensor(
            [self.loss.entries[names[i]].coeff for i in tasks], dtype=torch.float64
        )
        if len(active) == 1:
            # one active component: its plain gradient (no aggregation)
            weights = torch.ones(1, dtype=torch.float64)
            storage.apply_weights(tasks, weights)
        elif self.aggregator.gram_based:
            weights = self.aggregator.weights(gram, coeffs, source_dtype=storage.dtype)
            if not bool(torch.isfinite(weights).all()):
                self._skip_step(
                    storage, f"{type(self.aggregator).__name__} returned non-finite weights"
                )
                return
            storage.apply_weights(tasks, weights)
        else:
            matrix = storage.matrix(tasks)
            active_coeffs = torch.tensor(
                [self.loss.entries[names[i]].coeff for i in active], dtype=matrix.dtype
            ).to(matrix.device)
            computed = [active.index(t) for t in tasks]
            update = self.aggregator.aggregate_subset(matrix, active_coeffs, computed)
            if not bool(torch.isfinite(update).all()):
                self._skip_step(
                    storage, f"{type(self.aggregator).__name__} returned a non-finite update"
                )
                return
            storage.apply_update(update)
            weights = None
        self._log_task_statistics([names[i] for i in tasks], gram, weights)

    def _drop_faulty_tasks(
        self, tasks: list[int], gram: torch.Tensor, names: list[str]
    ) -> tuple[list[int], torch.Tensor]:
        sq_norms = gram.diagonal()
        keep = []
        for j, task in enumerate(tasks):
            sq = float(sq_norms[j])
            if sq != sq or sq == float("inf"):
                msg = (
                    f"loss component {names[task]!r} has a non-finite gradient at global step "
                    f"{self.trainer.global_step}"
                )
                if self.on_nonfinite == "raise":
                    raise FloatingPointError(msg + " (training_module.on_nonfinite=raise)")
                if self.on_nonfinite == "skip":
                    return [], gram[:0, :0]
                self._warn_once(
                    "zero_task", msg + "; leaving it out of this step (on_nonfinite=zero_task)"
                )
                continue
            if sq == 0.0:
                self._warn_once(
                    "zero",
                    f"loss component {names[task]!r} has a zero gradient on a step; "
                    "it is left out of that step's aggregation (further cases are not reported)",
                )
                continue
            keep.append(j)
        if len(keep) == len(tasks):
            return tasks, gram
        return [tasks[j] for j in keep], gram[keep][:, keep]

    def _skip_step(self, storage: TaskGradients, reason: str) -> None:
        storage.release_grads()  # `.grad = None`: optimizers leave every parameter alone
        self.skipped_steps += 1
        self.applied_task_weights = {}
        self.task_gradient_statistics = None
        self._warn_once(
            "skip", f"skipping an optimizer step: {reason} (counted in mtl/skipped_steps)"
        )
        self.log("mtl/skipped_steps", float(self.skipped_steps))

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
        if weights is None:
            self.applied_task_weights = {}
            return
        norms = gram.diagonal().clamp_min(0).sqrt()
        gw = gram @ weights
        update_norm = (weights @ gw).clamp_min(0).sqrt()
        cos = gw / (norms * update_norm).clamp_min(torch.finfo(torch.float64).tiny)
        self.applied_task_weights = {n: float(w) for n, w in zip(names, weights)}
        stats = {}
        for j, name in enumerate(names):
            stats[f"mtl/grad_norm/{name}"] = float(norms[j])
            stats[f"mtl/cos_update/{name}"] = float(cos[j])
            stats[f"mtl/weight/{name}"] = float(weights[j])
        stats["mtl/skipped_steps"] = float(self.skipped_steps)
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
            "skipped_steps": self.skipped_steps,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """"""
        state = checkpoint.get("nequip_mtl")
        if state is not None:
            self.aggregator.load_state_dict(state["aggregator"])
            self.skipped_steps = state["skipped_steps"]


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


def _build_aggregator(aggregator: Mapping | Aggregator | None) -> Aggregator:
    if aggregator is None:
        return ConFIG()
    if isinstance(aggregator, Aggregator):
        return aggregator
    if not isinstance(aggregator, Mapping) or "_target_" not in aggregator:
        raise TypeError(
            "`aggregator` must be a dict with a `_target_` naming a nequip_mtl.aggregators "
            f"class (e.g. {{_target_: nequip_mtl.aggregators.ConFIG}}), got {aggregator!r}"
        )
    built = instantiate(dict(aggregator))
    if not isinstance(built, Aggregator):
        raise TypeError(
            f"`aggregator._target_`={aggregator['_target_']!r} built a {type(built).__name__}, "
            "which is not a nequip_mtl.aggregators.Aggregator"
        )
    return built


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
