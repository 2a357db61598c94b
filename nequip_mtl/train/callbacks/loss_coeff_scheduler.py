"""Step-wise loss-coefficient schedule (strict drop-in for nequip's ``LossCoefficientScheduler``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning

from ..coefficients import merge_coeffs, update_coeffs, validate_coeffs
from ._common import (
    IntervalCallback,
    check_coeff_writer_allowed,
    check_interval,
    current_coeffs,
    loss_manager,
)


class LossCoefficientScheduler(IntervalCallback):
    """Change loss coefficients at given epochs (or global steps).

    ``schedule`` maps an epoch (``interval: epoch``, default) or a global optimizer step
    (``interval: batch``) to a ``{loss_name: coeff}`` dict that is applied at the start of
    that epoch/step. Unlike nequip's callback, an entry is a *partial update*: names not
    listed keep their current coefficient, ``null`` removes a term, unknown names and
    negative or non-finite values are errors; the active coefficients are then
    normalised to sum to 1. The whole schedule is checked against the loss when training
    starts (before the first step), not when an entry is reached.

    With gradient accumulation (``trainer.accumulate_grad_batches``), ``interval: batch``
    counts *optimizer* steps: an entry is applied once, at the first micro-batch of that
    step's accumulation window, and every micro-batch of the window uses the same
    coefficients.

    Stateless: the coefficients themselves are saved with the loss in checkpoints, so a
    resumed run continues with the scheduled values.

    .. code-block:: yaml

        callbacks:
          - _target_: nequip_mtl.train.callbacks.LossCoefficientScheduler
            schedule:
              100:
                per_atom_energy_mse: 1.0
                forces_mse: 5.0
              200:
                forces_mse: 1.0      # energy keeps its value
                stress_mse: null     # stop training on stress

    Args:
        schedule (dict): ``{epoch_or_step: {loss_name: coeff_or_null}}``
        interval (str): ``epoch`` (default) or ``batch`` (keys are global steps)
    """

    def __init__(self, schedule: Mapping[Any, Mapping[str, Any]], interval: str = "epoch"):
        self.interval = check_interval(interval, "LossCoefficientScheduler.interval")
        if not isinstance(schedule, Mapping) or not schedule:
            raise ValueError(
                f"LossCoefficientScheduler.schedule must be a non-empty mapping of "
                f"{interval} -> {{loss_name: coeff}}, got {schedule!r}"
            )
        parsed: dict[int, dict[str, Any]] = {}
        for key, coeffs in schedule.items():
            try:
                at = int(key)
            except (TypeError, ValueError):
                at = None
            if at is None or at < 0 or (isinstance(key, float) and key != at):
                raise ValueError(
                    f"LossCoefficientScheduler.schedule: key {key!r} must be an integer "
                    f"{interval} >= 0"
                )
            if at in parsed:
                raise ValueError(
                    f"LossCoefficientScheduler.schedule: {interval} {at} is given twice"
                )
            where = f"LossCoefficientScheduler.schedule[{at}]"
            if not isinstance(coeffs, Mapping) or not coeffs:
                raise ValueError(
                    f"{where} must be a non-empty mapping of loss names to coefficients"
                )
            # values are checked now; names once the loss is known (setup)
            validate_coeffs(None, coeffs, where)
            parsed[at] = dict(coeffs)
        self.schedule = dict(sorted(parsed.items()))

    def setup(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, stage: str
    ) -> None:
        """Check every schedule entry against the loss before training."""
        if stage != "fit":
            return
        manager = loss_manager(pl_module, "LossCoefficientScheduler")
        check_coeff_writer_allowed(pl_module, "LossCoefficientScheduler")
        coeffs = current_coeffs(manager)
        # simulate the schedule on the starting coefficients: catches unknown names and
        # entries that would leave no active term
        for at, update in self.schedule.items():
            coeffs = merge_coeffs(coeffs, update, f"LossCoefficientScheduler.schedule[{at}]")

    def _on_interval(self, pl_module: lightning.LightningModule, at: int) -> None:
        update = self.schedule.get(at)
        if update is not None:
            update_coeffs(pl_module.loss, update, f"LossCoefficientScheduler.schedule[{at}]")
