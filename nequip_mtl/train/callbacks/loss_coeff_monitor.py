"""Log loss coefficients (and gradient-aggregation task weights) to every logger."""

from __future__ import annotations

from typing import Any

import lightning

from ._common import OptimizerStepCallback, check_interval, check_positive_int, loss_manager


class LossCoefficientMonitor(OptimizerStepCallback):
    """Log every active loss coefficient as ``loss_coeff/<name>``, to all of the trainer's
    loggers, every ``frequency`` epochs or optimizer steps.

    If the training module exposes the effective per-task weights it applied (a dict
    attribute ``applied_task_weights``, e.g. :class:`~nequip_mtl.train.MultitaskLightningModule`,
    :class:`~nequip_mtl.train.UncertaintyWeightingLightningModule`,
    :class:`~nequip_mtl.train.FAMOLightningModule`), those are logged as
    ``task_weight/<name>`` too.

    The values are written with ``logger.log_metrics(..., step=trainer.global_step)``
    directly, so every scheduled record reaches every logger (nequip's callback goes
    through ``LightningModule.log``, whose step-level values are only written every
    ``trainer.log_every_n_steps`` steps). With ``interval: batch`` the coefficients logged
    are the ones the step's loss was computed with. Logging happens at step
    ``global_step % frequency == 0`` (after the step) or epoch ``epoch % frequency == 0``
    (at its end), as in nequip. With gradient accumulation a step is an optimizer step:
    one record per optimizer step, written after its last micro-batch (nequip's callback
    fires on every micro-batch whose ``global_step`` matches, including the first
    micro-batches of the window that follows a logged step).

    .. code-block:: yaml

        callbacks:
          - _target_: nequip_mtl.train.callbacks.LossCoefficientMonitor
            interval: epoch
            frequency: 5

    Args:
        interval (str): ``batch`` or ``epoch``
        frequency (int): number of intervals between logs (>= 1)
    """

    def __init__(self, interval: str, frequency: int):
        self.interval = check_interval(interval, "LossCoefficientMonitor.interval")
        self.frequency = check_positive_int(frequency, "LossCoefficientMonitor.frequency")
        self._step_coeffs: dict[str, float] | None = None

    def setup(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, stage: str
    ) -> None:
        """"""
        if stage == "fit":
            loss_manager(pl_module, "LossCoefficientMonitor")

    @staticmethod
    def _coeffs(pl_module: lightning.LightningModule) -> dict[str, float]:
        return {
            name: float(entry.coeff)
            for name, entry in pl_module.loss.entries.items()
            if entry.coeff is not None
        }

    def on_before_backward(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, loss: Any
    ) -> None:
        """"""
        # the coefficients this step's loss was computed with
        self._step_coeffs = self._coeffs(pl_module)

    def on_train_batch_end(
        self,
        trainer: lightning.Trainer,
        pl_module: lightning.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """"""
        if self.interval != "batch" or not self._optimizer_stepped(trainer):
            return
        if trainer.global_step % self.frequency != 0:
            return
        coeffs = self._step_coeffs if self._step_coeffs is not None else self._coeffs(pl_module)
        self._log(trainer, pl_module, coeffs)

    def on_train_epoch_end(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule
    ) -> None:
        """"""
        if self.interval == "epoch" and trainer.current_epoch % self.frequency == 0:
            self._log(trainer, pl_module, self._coeffs(pl_module))

    def _log(
        self,
        trainer: lightning.Trainer,
        pl_module: lightning.LightningModule,
        coeffs: dict[str, float],
    ) -> None:
        metrics = {f"loss_coeff/{name}": value for name, value in coeffs.items()}
        applied = getattr(pl_module, "applied_task_weights", None)
        if applied:
            metrics.update({f"task_weight/{name}": float(w) for name, w in applied.items()})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
