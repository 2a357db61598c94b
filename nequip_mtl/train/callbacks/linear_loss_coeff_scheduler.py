"""Smooth loss-coefficient transitions (strict drop-in for nequip's
``LinearLossCoefficientScheduler``, plus a batch interval and a cosine shape)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning

from ..coefficients import merge_coeffs, update_coeffs, validate_coeffs
from ._common import (
    IntervalCallback,
    check_choice,
    check_coeff_writer_allowed,
    check_interval,
    current_coeffs,
    loss_manager,
)

SHAPES = ("linear", "cosine")


def _nonneg_int(value: Any, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{where}` must be an integer >= {minimum}, got {value!r}")
    return value


class LinearLossCoefficientScheduler(IntervalCallback):
    """Move loss coefficients smoothly from their values at the start of a window to
    ``final_coeffs`` over the window.

    The coefficients are captured when the window starts (``start_epoch``, or global step
    ``start_step`` with ``interval: batch``); at position ``p`` in the window the
    coefficients are ``c(p) = c_start + alpha(p) (c_final - c_start)`` with
    ``alpha = (p - start) / length`` (``shape: linear``) or
    ``alpha = (1 - cos(pi (p - start) / length)) / 2`` (``shape: cosine``).

    ``final_coeffs`` is a partial update of the captured coefficients: listed names get
    the given relative values, unlisted names keep theirs; the target is then normalised
    like any coefficient dict. A listed term that was inactive (``null``) at the start
    fades in from 0. Names are checked against the loss before training starts; unknown
    names, negative, non-finite or ``null`` values are errors (remove a term with
    :class:`LossCoefficientScheduler`).

    With gradient accumulation, ``interval: batch`` positions are *optimizer* steps
    (``trainer.global_step``): the coefficients are set once per step, at the first
    micro-batch of its accumulation window, and are constant within the window.

    Several instances compose (multi-stage schedules); their windows must not overlap,
    which is checked when training starts. Each has its own ``state_key`` derived from
    its configuration, so checkpoints restore each one's captured start values.

    .. code-block:: yaml

        callbacks:
          # 1:1:1 -> 1:5:1 over epochs 50-150, then -> 1:1:1 over epochs 200-400
          - _target_: nequip_mtl.train.callbacks.LinearLossCoefficientScheduler
            final_coeffs:
              per_atom_energy_mse: 1.0
              forces_mse: 5.0
              stress_mse: 1.0
            start_epoch: 50
            transition_epochs: 100
          - _target_: nequip_mtl.train.callbacks.LinearLossCoefficientScheduler
            final_coeffs:
              forces_mse: 1.0
            start_epoch: 200
            transition_epochs: 200
            shape: cosine
          # per optimizer step instead of per epoch
          - _target_: nequip_mtl.train.callbacks.LinearLossCoefficientScheduler
            interval: batch
            final_coeffs:
              stress_mse: 0.5
            start_step: 10000
            transition_steps: 5000

    Args:
        final_coeffs (dict): ``{loss_name: coeff}`` target (partial update)
        transition_epochs (int): window length in epochs (``interval: epoch``)
        start_epoch (int): first epoch of the window (default 0; ``interval: epoch``)
        interval (str): ``epoch`` (default) or ``batch``
        start_step (int): first global step of the window (default 0; ``interval: batch``)
        transition_steps (int): window length in global steps (``interval: batch``)
        shape (str): ``linear`` (default) or ``cosine``
    """

    def __init__(
        self,
        final_coeffs: Mapping[str, float],
        transition_epochs: int | None = None,
        start_epoch: int | None = None,
        interval: str = "epoch",
        start_step: int | None = None,
        transition_steps: int | None = None,
        shape: str = "linear",
    ):
        cls = "LinearLossCoefficientScheduler"
        self.interval = check_interval(interval, f"{cls}.interval")
        self.shape = check_choice(shape, SHAPES, f"{cls}.shape")
        if self.interval == "epoch":
            if start_step is not None or transition_steps is not None:
                raise ValueError(
                    f"{cls}: `start_step`/`transition_steps` are for `interval: batch`; with "
                    "`interval: epoch` use `start_epoch`/`transition_epochs`"
                )
            if transition_epochs is None:
                raise ValueError(f"{cls}: `transition_epochs` is required with `interval: epoch`")
            self.start = _nonneg_int(
                0 if start_epoch is None else start_epoch, f"{cls}.start_epoch", 0
            )
            self.length = _nonneg_int(transition_epochs, f"{cls}.transition_epochs", 1)
        else:
            if start_epoch is not None or transition_epochs is not None:
                raise ValueError(
                    f"{cls}: `start_epoch`/`transition_epochs` are for `interval: epoch`; with "
                    "`interval: batch` use `start_step`/`transition_steps`"
                )
            if transition_steps is None:
                raise ValueError(f"{cls}: `transition_steps` is required with `interval: batch`")
            self.start = _nonneg_int(
                0 if start_step is None else start_step, f"{cls}.start_step", 0
            )
            self.length = _nonneg_int(transition_steps, f"{cls}.transition_steps", 1)
        if not isinstance(final_coeffs, Mapping) or not final_coeffs:
            raise ValueError(
                f"{cls}.final_coeffs must be a non-empty mapping, got {final_coeffs!r}"
            )
        nulls = [k for k, v in final_coeffs.items() if v is None]
        if nulls:
            raise ValueError(
                f"{cls}.final_coeffs: {nulls} are null; a transition needs a target value "
                "(use LossCoefficientScheduler to remove a term)"
            )
        checked = validate_coeffs(None, final_coeffs, f"{cls}.final_coeffs", positive=True)
        self.final_coeffs: dict[str, float] = checked  # type: ignore[assignment]
        self.captured: dict[str, float | None] | None = None
        self.finished = False

    @property
    def state_key(self) -> str:
        """"""
        final = ",".join(f"{k}={v!r}" for k, v in sorted(self.final_coeffs.items()))
        return (
            f"{self.__class__.__qualname__}[{self.interval} {self.start}+{self.length},"
            f"{self.shape},{final}]"
        )

    @property
    def window(self) -> tuple[int, int]:
        return self.start, self.start + self.length

    def setup(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, stage: str
    ) -> None:
        """Check names and that windows of several instances do not overlap."""
        if stage != "fit":
            return
        cls = "LinearLossCoefficientScheduler"
        manager = loss_manager(pl_module, cls)
        check_coeff_writer_allowed(pl_module, cls)
        validate_coeffs(list(manager.entries), self.final_coeffs, f"{cls}.final_coeffs")
        for cb in trainer.callbacks:
            if cb is self or not isinstance(cb, LinearLossCoefficientScheduler):
                continue
            if cb.interval != self.interval:
                continue
            (a0, a1), (b0, b1) = self.window, cb.window
            if a0 < b1 and b0 < a1:
                raise ValueError(
                    f"{cls}: windows overlap: {self.interval}s {a0}-{a1} ({self.final_coeffs}) "
                    f"and {b0}-{b1} ({cb.final_coeffs}); run the transitions one after the other"
                )

    def _alpha(self, position: int) -> float:
        frac = min(max((position - self.start) / self.length, 0.0), 1.0)
        if self.shape == "cosine":
            return 0.5 * (1.0 - math.cos(math.pi * frac))
        return frac

    def _on_interval(self, pl_module: lightning.LightningModule, position: int) -> None:
        if self.finished or position < self.start:
            return
        where = "LinearLossCoefficientScheduler.final_coeffs"
        if self.captured is None:
            self.captured = current_coeffs(pl_module.loss)
        start = {
            k: (0.0 if v is None and k in self.final_coeffs else v)
            for k, v in self.captured.items()
        }
        target = merge_coeffs(start, self.final_coeffs, where)
        if position == self.start:
            return
        alpha = self._alpha(position)
        update = {
            k: start[k] + alpha * (target[k] - start[k])  # type: ignore[operator]
            for k in target
            if target[k] is not None
        }
        update_coeffs(pl_module.loss, update, where)
        if position >= self.start + self.length:
            self.finished = True

    def state_dict(self) -> dict[str, Any]:
        """"""
        return {
            "captured": None if self.captured is None else dict(self.captured),
            "finished": self.finished,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """"""
        captured = state_dict.get("captured")
        self.captured = None if captured is None else dict(captured)
        self.finished = bool(state_dict.get("finished", False))
