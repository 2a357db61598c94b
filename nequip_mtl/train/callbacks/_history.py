"""Lightning glue shared by the loss-history weighting callbacks (SoftAdapt, DWA)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import lightning

from ...weighting.common import SCALE_BY, mean_weights
from ...weighting.history import LossHistoryWeighting
from ..coefficients import update_coeffs
from ._common import (
    IntervalCallback,
    WeightingCallback,
    active_names,
    check_choice,
    check_coeff_writer_allowed,
    check_interval,
    check_positive_int,
    current_coeffs,
    loss_manager,
    single_adaptive_callback,
)


class AdaptiveWeightingCallback(IntervalCallback, WeightingCallback):
    """Base of the callbacks that set loss coefficients from the training history.

    Subclasses define :meth:`_candidate` (``rule(prev_losses, new_losses)``). The training
    losses are observed once per ``interval`` and fed to a
    :class:`~nequip_mtl.weighting.LossHistoryWeighting`, whose cycle averages are written
    with :func:`~nequip_mtl.train.coefficients.update_coeffs`:

    - ``epoch``: the previous epoch's loss (``MetricsManager.compute``), at the start of
      the next epoch;
    - ``batch``: the optimizer step's loss, after the step. With gradient accumulation
      that is the mean of the step's micro-batch losses (the loss the step optimised:
      Lightning scales each micro-batch by ``1/accumulate_grad_batches``), observed once,
      at the window's last micro-batch; ``frequency`` therefore counts optimizer steps and
      the new coefficients apply from the next optimizer step on, to all of its
      micro-batches. A component that is missing or non-finite in any micro-batch of the
      step makes that step's observation non-finite, and the history skips it.

    Nothing is pending at an optimizer-step boundary (where Lightning saves checkpoints),
    so :meth:`state_dict` holds only the history.
    """

    def __init__(self, interval: str, frequency: int, scale_by: str):
        name = type(self).__name__
        self.interval = check_interval(interval, f"{name}.interval")
        self.frequency = check_positive_int(frequency, f"{name}.frequency")
        self.scale_by = check_choice(scale_by, SCALE_BY, f"{name}.scale_by")
        self.history = LossHistoryWeighting(self._candidate, self.frequency, self.scale_by)
        self.initial_coeffs: dict[str, float | None] | None = None
        self.num_updates = 0
        # per-component losses of the micro-batches of the current optimizer step
        self._window_losses: list[dict[str, float]] = []

    def _candidate(self, prev: Mapping[str, float], new: Mapping[str, float]) -> dict[str, float]:
        raise NotImplementedError

    def setup(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, stage: str
    ) -> None:
        """Validate against the loss and capture the user's coefficients (before any restore)."""
        if stage != "fit":
            return
        name = type(self).__name__
        manager = loss_manager(pl_module, name)
        check_coeff_writer_allowed(pl_module, name)
        single_adaptive_callback(trainer, self, WeightingCallback)
        if len(active_names(manager)) < 2:
            warnings.warn(
                f"{name}: the loss has {len(active_names(manager))} active component(s); "
                "adaptive weighting needs at least two to do anything"
            )
        if self.initial_coeffs is None:
            self.initial_coeffs = current_coeffs(manager)

    def _observe(self, pl_module: lightning.LightningModule, losses: Mapping[str, Any]) -> None:
        manager = pl_module.loss
        new = self.history.observe(losses, current_coeffs(manager), self.initial_coeffs)
        if new is not None:
            update_coeffs(manager, new, type(self).__name__)
            self.num_updates += 1

    def _on_interval(self, pl_module: lightning.LightningModule, position: int) -> None:
        # epoch: the previous epoch's training loss (MetricsManager.compute at its end);
        # batch: nothing to do when a window starts (observed when it ends)
        if self.interval == "epoch" and position >= 1:
            self._observe(pl_module, pl_module.loss.metrics_values_epoch)

    def _window_start(self, trainer: lightning.Trainer, pl_module: Any) -> None:
        self._window_losses = []
        super()._window_start(trainer, pl_module)

    def on_train_batch_end(
        self,
        trainer: lightning.Trainer,
        pl_module: lightning.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """"""
        if self.interval != "batch":
            return
        self._window_losses.append(
            {
                k: math.nan if v is None else float(v)
                for k, v in pl_module.loss.metrics_values_step.items()
            }
        )
        if self._optimizer_stepped(trainer):
            # missing or non-finite values stay non-finite; the history skips them
            losses = mean_weights(self._window_losses)
            self._window_losses = []
            self._observe(pl_module, losses)

    def state_dict(self) -> dict[str, Any]:
        """"""
        return {
            "history": self.history.state_dict(),
            "initial_coeffs": None if self.initial_coeffs is None else dict(self.initial_coeffs),
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """"""
        self.history.load_state_dict(state_dict["history"])
        initial = state_dict.get("initial_coeffs")
        self.initial_coeffs = None if initial is None else dict(initial)
        self.num_updates = int(state_dict.get("num_updates", 0))
