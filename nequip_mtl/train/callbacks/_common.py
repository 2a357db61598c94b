"""What the loss-coefficient callbacks share: optimizer-step windows, intervals, the loss
manager, and who may write coefficients (their values are checked by
:func:`nequip_mtl.train.coefficients.validate_coeffs`)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback

from ...step import WindowTracker
from ...weighting.common import check_choice, check_positive_int
from ..coefficients import active_names, current_coeffs

INTERVALS = ("epoch", "batch")

__all__ = [
    "INTERVALS",
    "OptimizerStepCallback",
    "IntervalCallback",
    "WeightingCallback",
    "check_choice",
    "check_positive_int",
    "check_interval",
    "loss_manager",
    "active_names",
    "check_coeff_writer_allowed",
    "current_coeffs",
]


class OptimizerStepCallback(Callback):
    """Knows the accumulation windows of ``trainer.accumulate_grad_batches``.

    One optimizer step is one *window* of micro-batches, all with the same
    ``trainer.global_step`` (it only advances in the optimizer step, during the window's last
    micro-batch). ``_window_start`` runs at the first micro-batch of every window, and in
    ``on_train_batch_end`` :meth:`_optimizer_stepped` says whether this micro-batch closed its
    window. Without accumulation every batch is a window of one. Subclasses that override
    ``on_train_batch_start`` or ``on_fit_start`` must call ``super()``'s.
    """

    @property
    def _windows(self) -> WindowTracker:
        # created on first use: subclasses need not call this class's __init__
        tracker = self.__dict__.get("_window_tracker")
        if tracker is None:
            tracker = self.__dict__["_window_tracker"] = WindowTracker()
        return tracker

    def _window_start(self, trainer: Any, pl_module: Any) -> None:
        """Called at the first micro-batch of every optimizer step (no-op by default)."""

    def _optimizer_stepped(self, trainer: Any) -> bool:
        """In ``on_train_batch_end``: did this micro-batch end with an optimizer step?"""
        return self._windows.stepped(trainer.global_step)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """"""
        self._windows.reset()  # a callback object may be reused for another fit

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        """"""
        if self._windows.starts(trainer.global_step):
            self._window_start(trainer, pl_module)


class IntervalCallback(OptimizerStepCallback):
    """A callback that acts at the start of every epoch (``interval: epoch``) or of every
    optimizer step (``interval: batch``): subclasses set ``self.interval`` and implement
    ``_on_interval(pl_module, position)``, where ``position`` is the current epoch or the
    global step.

    With gradient accumulation, ``interval: batch`` acts once per *optimizer step*, at the
    first micro-batch of its accumulation window, keyed by ``trainer.global_step``: every
    micro-batch of a window sees the same coefficients (the window's gradients are summed, so
    changing coefficients inside it would mix two weightings in one update)."""

    interval: str

    def _on_interval(self, pl_module: Any, position: int) -> None:
        raise NotImplementedError

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        """"""
        if self.interval == "epoch":
            self._on_interval(pl_module, trainer.current_epoch)

    def _window_start(self, trainer: Any, pl_module: Any) -> None:
        if self.interval == "batch":
            self._on_interval(pl_module, trainer.global_step)


class WeightingCallback(Callback):
    """Marker base of the callbacks that set loss coefficients on their own (adaptive or
    random); at most one of them may be used in a run."""


def check_interval(value: Any, where: str) -> str:
    return check_choice(value, INTERVALS, where)


def loss_manager(pl_module: Any, who: str) -> Any:
    """The training module's loss ``MetricsManager`` (nequip's or ours), or a clear error."""
    manager = getattr(pl_module, "loss", None)
    if manager is None or not hasattr(manager, "entries") or not hasattr(manager, "set_coeffs"):
        raise TypeError(
            f"{who} needs the training module's `loss` to be a nequip MetricsManager "
            f"(e.g. nequip_mtl.train.EnergyForceLoss); got {type(manager).__name__}"
        )
    return manager


def check_coeff_writer_allowed(pl_module: Any, who: str) -> None:
    """Refuse to run a coefficient-changing callback on a module that ignores coefficients."""
    if getattr(pl_module, "ignores_loss_coeff_values", False):
        raise ValueError(
            f"{who} changes loss coefficients, but {type(pl_module).__name__} computes its own "
            "task weights and uses the coefficients only to initialise them; remove the callback "
            "or use nequip.train.NequIPLightningModule / nequip_mtl.train.MultitaskLightningModule"
        )


def single_adaptive_callback(trainer: Any, me: Any, base: type) -> None:
    """Error if another adaptive-weighting callback (ours or nequip's SoftAdapt) is configured."""
    others = [cb for cb in trainer.callbacks if cb is not me and isinstance(cb, base)]
    try:
        from nequip.train.callbacks import SoftAdapt as NequipSoftAdapt

        others += [cb for cb in trainer.callbacks if isinstance(cb, NequipSoftAdapt)]
    except ImportError:  # pragma: no cover
        pass
    if others:
        names = [type(cb).__module__ + "." + type(cb).__name__ for cb in [me, *others]]
        raise ValueError(
            f"only one adaptive loss-weighting callback may be used at a time; found {names}"
        )


def _scheduler_classes() -> tuple[type, ...]:
    """The coefficient schedulers, ours and nequip's."""
    from nequip.train.callbacks import LossCoefficientScheduler as NequipScheduler

    from .linear_loss_coeff_scheduler import LinearLossCoefficientScheduler
    from .loss_coeff_scheduler import LossCoefficientScheduler

    classes: list[type] = [
        LossCoefficientScheduler,
        LinearLossCoefficientScheduler,
        NequipScheduler,
    ]
    try:
        from nequip.train.callbacks.loss_coeff_scheduler import (
            LinearLossCoefficientScheduler as NequipLinear,
        )

        classes.append(NequipLinear)
    except ImportError:  # pragma: no cover
        pass
    return tuple(classes)


def no_coefficient_schedule(trainer: Any, why: str) -> None:
    """Error (``why``, then the schedulers' names) if a coefficient scheduler, ours or
    nequip's, is configured."""
    others = [cb for cb in trainer.callbacks if isinstance(cb, _scheduler_classes())]
    if others:
        names = [type(cb).__module__ + "." + type(cb).__name__ for cb in others]
        raise ValueError(f"{why}: {names}")
