"""Benchmark-only: what ``weights_every: k`` holds fixed between refreshes (issue 12).

:class:`~nequip_mtl.train.MultitaskLightningModule` holds the aggregator's *raw* weights
``w_i`` of the last refresh: between refreshes it back-propagates ``sum_i w_i L_i``. A
normalised form such as ConFIG's keeps per-task *direction* weights ``a_i`` (update
``sum_i a_i g_i / |g_i|``); that needs every ``|g_i|`` on every step, which the single
backward pass between refreshes does not give. For an MSE loss ``L = |r|^2 / n`` the
gradient is ``g = (2/n) J^T r``, so ``|g|`` scales roughly like ``sqrt(L)``; holding
``a_i = w_i |g_i(ref)|`` then becomes, with the losses every step has anyway,

    w_i(t) = w_i(ref) * sqrt(L_i(ref) / L_i(t))        (detached scalars)

which keeps each task's contribution ``|w_i g_i|`` near its size at the refresh as the
losses fall. :class:`LossScaledHeldWeightsModule` trains with that form; everything else
(refresh steps, fault handling, logging) is the parent's. With ``loss_ema`` the losses are
exponential moving averages over steps (damping batch-to-batch noise) instead of the
single batch's values.

Only for the accuracy benchmark (``benchmarks.methods._held_form``): it refuses gradient
accumulation and DDP, where one micro-batch's or one rank's loss is not the step's.
"""

from __future__ import annotations

import math
from typing import Any

from nequip_mtl.step import StepEngine
from nequip_mtl.train import MultitaskLightningModule


def check_supported(trainer) -> None:
    """Refuse the configurations whose per-step losses this module does not track."""
    if trainer.accumulate_grad_batches != 1:
        raise ValueError(
            "LossScaledHeldWeightsModule (benchmark only) needs accumulate_grad_batches=1, got "
            f"{trainer.accumulate_grad_batches}: the loss scaling uses one batch's losses per "
            "optimizer step"
        )
    if trainer.world_size != 1:
        raise ValueError(
            "LossScaledHeldWeightsModule (benchmark only) does not support DDP "
            f"(world_size={trainer.world_size}): the loss scaling uses one rank's losses"
        )


def loss_scale(ref: float | None, now: float) -> float:
    """``sqrt(ref / now)``; 1 (the raw weight) where that is undefined."""
    if ref is None or not (0.0 < ref < math.inf and 0.0 < now < math.inf):
        return 1.0
    return math.sqrt(ref / now)


class LossScaledHeldWeightsEngine(StepEngine):
    """A :class:`~nequip_mtl.step.StepEngine` whose held steps use loss-scaled weights.

    Uses the engine's public hooks only: :meth:`add` sees each step's losses,
    :meth:`held_step_weights` gives the weights of a step between refreshes, and
    :meth:`finish` says whether a refresh was applied.
    """

    def __init__(self, *args, loss_ema: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_ema = loss_ema
        #: name -> the (averaged) loss of each task on the step of the held weights' refresh
        self.reference_losses: dict[str, float] = {}
        #: name -> the effective weights of the last step between refreshes
        self.scaled_weights: dict[str, float] = {}
        self.average: dict[str, float] = {}
        self._losses: dict[str, float] = {}

    def _step_losses(self, losses) -> dict[str, float]:
        """This step's (averaged) loss of each active task, as floats."""
        now = {name: float(x.detach()) for name, x in losses.items()}
        if self.loss_ema is None:
            return now
        beta = self.loss_ema
        for name, x in now.items():
            old = self.average.get(name)
            if math.isfinite(x):  # a non-finite batch is the engine's to skip
                self.average[name] = x if old is None else beta * old + (1 - beta) * x
        return {name: self.average.get(name, x) for name, x in now.items()}

    def add(self, losses) -> None:
        self._losses = self._step_losses(losses)
        super().add(losses)

    def held_step_weights(self, window, losses):
        self.scaled_weights = {
            name: w * loss_scale(self.reference_losses.get(name), self._losses[name])
            for name, w in window.weights.items()
        }
        return self.scaled_weights

    def finish(self, step, reduce=None):
        before = self.held
        outcome = super().finish(step, reduce)
        if self.held is not None and self.held is not before:
            self.reference_losses = dict(self._losses)  # the refresh was applied
        if outcome.held and outcome.applied:
            outcome.weights = dict(self.scaled_weights)  # the weights really applied
        return outcome


class LossScaledHeldWeightsModule(MultitaskLightningModule):
    """``weights_every: k`` holding ``w_i(ref) * sqrt(L_i(ref) / L_i(t))`` between refreshes.

    Args:
        loss_ema (float, optional): ``None`` (default): ``L_i`` is the batch's loss. A
            decay ``beta`` in ``(0, 1)``: ``L_i`` is the moving average
            ``beta * L_i + (1 - beta) * loss_i``, updated on every step (refresh steps
            included) and started at the first step's loss.
        **kwargs: arguments of :class:`~nequip_mtl.train.MultitaskLightningModule`
    """

    def __init__(self, loss_ema: float | None = None, **kwargs):
        super().__init__(**kwargs)
        if loss_ema is not None and not 0.0 < loss_ema < 1.0:
            raise ValueError(f"`loss_ema` must be null or in (0, 1), got {loss_ema!r}")
        self.engine.loss_ema = loss_ema

    def build_engine(self, aggregator, weights_every, on_nonfinite):
        return LossScaledHeldWeightsEngine(
            aggregator, weights_every=weights_every, on_nonfinite=on_nonfinite
        )

    @property
    def reference_losses(self) -> dict[str, float]:
        return self.engine.reference_losses

    @property
    def scaled_weights(self) -> dict[str, float]:
        return self.engine.scaled_weights

    def setup(self, stage: str) -> None:
        super().setup(stage)
        check_supported(self.trainer)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["held_form"] = {
            "reference_losses": dict(self.engine.reference_losses),
            "average": dict(self.engine.average),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("held_form", {})
        self.engine.reference_losses = dict(state.get("reference_losses", {}))
        self.engine.average = dict(state.get("average", {}))
