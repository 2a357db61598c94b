"""Calibrate-then-freeze: choose fixed loss coefficients from a short measurement of the
task gradients, then train a plain weighted sum at the weighted-sum cost."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import lightning
import torch

from ...aggregators import Aggregator, GramAggregator, Sum
from ...diagnostics.calibration import (
    DATASET_SHARES,
    RULES,
    GradientCalibration,
    keep_group_shares,
)
from ..aggregator_spec import build_aggregator
from ..coefficients import update_coeffs
from ._common import (
    WeightingCallback,
    active_names,
    check_choice,
    check_coeff_writer_allowed,
    check_positive_int,
    no_coefficient_schedule,
    single_adaptive_callback,
)
from .gradient_conflict import TaskGradientProbe

PREFIX = "calibration"
WHO = "CalibrateLossCoefficients"

__all__ = ["CalibrateLossCoefficients"]

_log = logging.getLogger(__name__)


class CalibrateLossCoefficients(WeightingCallback):
    """Measure the task gradients for a few steps, set the loss coefficients once, freeze.

    Gradient aggregators (ConFIG, UPGrad, ...) need one backward pass per loss component,
    so a step costs more than the plain weighted sum. This callback measures one gradient
    per *active* loss component (``coeff`` not ``null``) on every optimizer step of a
    short calibration phase (the first ``steps`` optimizer steps, or the steps of the
    first ``epochs`` epochs), chooses fixed loss coefficients from the time-averaged
    statistics by ``rule``, sets them once through
    :func:`nequip_mtl.train.update_coeffs`, and from then on does nothing: training is
    the plain weighted sum, at exactly its cost. (In the spirit of AutoScale,
    arXiv:2508.13979, which picks fixed loss weights from gradient statistics instead of
    searching for them.)

    **Rules** (``c0``: the configured coefficients, normalised to sum to 1 as nequip's
    ``MetricsManager`` does; ``L_i``: the *unweighted* loss component, nequip's
    ``train_loss_step/<name>``; ``n_i``: the mean over the calibration steps of
    ``|grad L_i|``):

    - ``gradnorm``: ``c_i ∝ c0_i / n_i``, so the time-averaged gradient norms of the
      weighted components, ``c_i n_i``, are in the ratio of the configured coefficients:
      equal when those are equal.
    - ``aggregator``: ``c_i ∝`` the mean over the calibration steps of the weights
      ``w_i = aggregator.weights(gram, c0)`` a Gram-space aggregator would have used (its
      update is ``w @ G = grad sum_i w_i L_i``, so ``w`` are coefficients of the raw
      components); components with a zero gradient on a step get weight 0 there. A
      negative mean weight is an error (a loss coefficient must be >= 0).

    The chosen coefficients are normalised to sum to 1, as nequip normalises every
    coefficient update; for ``aggregator`` this rescales the update by ``1/S``, where
    ``S = sum_i mean w_i`` is logged as ``calibration/weight_sum`` (fold it into the
    learning rate if the aggregator's scale matters to you). See
    :class:`nequip_mtl.diagnostics.GradientCalibration` for the math.

    **How the gradients are measured**: exactly as
    :class:`~nequip_mtl.train.callbacks.GradientConflictMonitor` does (the shared
    :class:`~nequip_mtl.train.callbacks.gradient_conflict.TaskGradientProbe`). With
    nequip's ``NequIPLightningModule`` / ``EMALightningModule``: one extra forward per
    micro-batch and one ``torch.autograd.grad`` per component, on the calibration steps
    only, from a private copy of the loss and a forked RNG, so the trajectory is that of
    the plain module. With ``nequip_mtl.train.MultitaskLightningModule`` (and its EMA
    variant) the module's own Gram matrix is reused, at no extra cost. One measurement per
    optimizer step: with ``accumulate_grad_batches = k`` the gradients of the whole
    window (as ``.grad``); under DDP of the global batch, and rank 0's choice is broadcast
    so every rank sets identical coefficients.

    **Several datasets** (a per-dataset loss, e.g. replay fine-tuning): with
    ``datasets: within`` (the default) the rule balances the components *of each dataset*
    (``new/forces_mse`` against ``new/per_atom_energy_mse``) and every dataset keeps the
    share of the configured coefficients it had (the replay weight stays the user's
    choice); ``datasets: across`` applies the rule to all (dataset, component) parts at
    once, which also reweights the datasets against each other. Components of no dataset
    form one group of their own. With one dataset both are the same.

    **Which modules**: the calibrated coefficients are the weights of a weighted-sum
    update, so the module must train the weighted sum: nequip's ``NequIPLightningModule``
    and ``EMALightningModule`` (recommended: the weighted sum at its own cost after
    calibration), or ``MultitaskLightningModule`` / ``EMAMultitaskLightningModule`` with
    the ``Sum`` aggregator (the same trajectory, but it keeps paying one backward pass
    per component). Any other aggregator, nequip's ``ConFIGLightningModule`` (manual
    optimization, coefficients are ConFIG's right-hand side) and the modules that learn
    their own task weights (uncertainty weighting, FAMO) are refused at setup, as is any
    other callback that sets coefficients (SoftAdapt, DWA, RLW, coefficient schedulers,
    ours or nequip's).

    **Logged** once, to every logger, at the first step trained with the new coefficients:
    ``calibration/coeff/<name>``, ``calibration/grad_norm/<name>`` (the mean ``n_i``),
    ``calibration/steps`` (steps counted) and, for ``aggregator``,
    ``calibration/weight/<name>`` and ``calibration/weight_sum``; plus one info line.

    **Restarts**: the state (accumulated statistics, the calibration window, the chosen
    coefficients) is saved in checkpoints. A restart after calibration keeps the chosen
    coefficients and does not recalibrate; a restart in the middle continues it exactly.

    Example:

    .. code-block:: yaml

        trainer:
          callbacks:
            - _target_: nequip_mtl.train.callbacks.CalibrateLossCoefficients
              rule: aggregator            # or gradnorm
              steps: 200                  # or epochs: 1 (exactly one of the two)
              aggregator:
                _target_: nequip_mtl.aggregators.UPGrad

        training_module:
          _target_: nequip.train.NequIPLightningModule   # the plain weighted sum
          loss:
            _target_: nequip.train.EnergyForceStressLoss
            coeffs: {total_energy: 1.0, forces: 1.0, stress: 1.0}   # c0

    Args:
        rule (str): ``gradnorm`` or ``aggregator``
        steps (int): calibrate over this many optimizer steps (>= 1) ...
        epochs (int): ... or over the optimizer steps of this many epochs (>= 1; counted
            as ``epochs * ceil(batches per epoch / accumulate_grad_batches)`` steps when
            calibration starts). Exactly one of ``steps`` and ``epochs``.
        aggregator (dict or Aggregator): for ``rule: aggregator`` only: a Hydra
            ``_target_`` dict (or instance) of a Gram-space
            :class:`nequip_mtl.aggregators.GramAggregator`
        datasets (str): ``within`` (default: calibrate inside each dataset, keep the
            datasets' configured shares) or ``across`` (calibrate all parts together)

    Attributes:
        coefficients (dict): the chosen coefficients (``None`` until calibrated)
        calibration (GradientCalibration): the accumulated statistics
    """

    def __init__(
        self,
        rule: str = "gradnorm",
        steps: int | None = None,
        epochs: int | None = None,
        aggregator: Mapping | Aggregator | None = None,
        datasets: str = "within",
    ):
        self.rule = check_choice(rule, RULES, f"{WHO}.rule")
        self.datasets = check_choice(datasets, DATASET_SHARES, f"{WHO}.datasets")
        if (steps is None) == (epochs is None):
            raise ValueError(
                f"{WHO}: give exactly one of `steps` (optimizer steps) and `epochs`; got "
                f"steps={steps!r}, epochs={epochs!r}"
            )
        self.steps = None if steps is None else check_positive_int(steps, f"{WHO}.steps")
        self.epochs = None if epochs is None else check_positive_int(epochs, f"{WHO}.epochs")
        self.aggregator = _build_gram_aggregator(self.rule, aggregator)
        self._aggregator_name = None if self.aggregator is None else repr(self.aggregator)

        self.coefficients: dict[str, float | None] | None = None
        self.calibration: GradientCalibration | None = None
        self._start_step: int | None = None
        self._end_step: int | None = None
        self._probe = TaskGradientProbe(WHO, per_component=True)
        self._warned_skip = False

    @property
    def state_key(self) -> str:
        # at most one coefficient-setting callback per run: a fixed key, so a restart
        # finds the state even if the rule was edited (load_state_dict then decides)
        return WHO

    @property
    def done(self) -> bool:
        """Whether the coefficients have been chosen and set."""
        return self.coefficients is not None

    def _config(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "steps": self.steps,
            "epochs": self.epochs,
            "aggregator": self._aggregator_name,
            "datasets": self.datasets,
        }

    # ------------------------------------------------------------------ setup

    def setup(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, stage: str
    ) -> None:
        """"""
        if stage != "fit":
            return
        self._probe.setup(pl_module)  # a loss MetricsManager and a `model`
        check_coeff_writer_allowed(pl_module, WHO)
        if not pl_module.automatic_optimization:
            raise ValueError(
                f"{WHO} chooses the coefficients of a weighted-sum loss, but "
                f"{type(pl_module).__name__} uses manual optimization and does not train "
                "the weighted sum (e.g. nequip's ConFIGLightningModule, whose coefficients are "
                "ConFIG's right-hand side); use nequip.train.NequIPLightningModule"
            )
        aggregator = getattr(pl_module, "aggregator", None)
        if isinstance(aggregator, Aggregator) and not isinstance(aggregator, Sum):
            raise ValueError(
                f"{WHO} chooses the coefficients of a weighted-sum loss, but "
                f"`training_module.aggregator` is {type(aggregator).__name__}, whose update is "
                "not the weighted sum; use nequip.train.NequIPLightningModule (the weighted "
                "sum at its own cost after calibration) or `aggregator: {_target_: "
                "nequip_mtl.aggregators.Sum}`. To calibrate towards an aggregator, use "
                f"`rule: aggregator` with `{WHO}.aggregator`"
            )
        single_adaptive_callback(trainer, self, WeightingCallback)
        no_coefficient_schedule(
            trainer, f"{WHO} sets the loss coefficients once and keeps them; it cannot be "
            "combined with a callback that also sets them"
        )  # fmt: skip

    def on_train_start(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule
    ) -> None:
        """"""
        if self.done:
            # a restart after calibration: the module's checkpoint holds these already;
            # setting them again keeps them whatever the module was built with
            update_coeffs(pl_module.loss, dict(self.coefficients), WHO)
            return
        names = active_names(pl_module.loss)
        if not names:
            raise ValueError(f"{WHO}: every loss component has `coeff: null`")
        if self.calibration is None:  # a fresh calibration
            self._start_step = trainer.global_step
            self._end_step = self._start_step + self._num_steps(trainer)
            self.calibration = self._new_calibration(pl_module, names)
        elif self.calibration.names != names:
            raise ValueError(
                f"{WHO}: resuming a calibration of loss components {self.calibration.names}, "
                f"but the active components are now {names}"
            )
        self._probe.on_train_start(pl_module)
        if trainer.global_step >= self._end_step:
            self._finish(trainer, pl_module)

    def teardown(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, stage: str
    ) -> None:
        """"""
        self._probe.teardown()

    def _num_steps(self, trainer: lightning.Trainer) -> int:
        if self.steps is not None:
            return self.steps
        batches = trainer.num_training_batches
        if not math.isfinite(batches):
            raise ValueError(
                f"{WHO}.epochs needs a training dataloader with a length; use {WHO}.steps instead"
            )
        return self.epochs * math.ceil(int(batches) / trainer.accumulate_grad_batches)

    def _new_calibration(self, pl_module: Any, names: list[str]) -> GradientCalibration:
        entries = pl_module.loss.entries
        dtype = next((p.dtype for p in pl_module.model.parameters()), torch.float64)
        return GradientCalibration(
            names,
            [entries[n].coeff for n in names],
            self.rule,
            aggregator=self.aggregator,
            source_dtype=dtype,
        )

    # ------------------------------------------------------------------ calibration

    def _calibrating(self, trainer: lightning.Trainer) -> bool:
        return (
            not self.done
            and self._end_step is not None
            and self._start_step <= trainer.global_step < self._end_step
        )

    def on_train_batch_start(
        self,
        trainer: lightning.Trainer,
        pl_module: lightning.LightningModule,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """"""
        if self.done:
            return
        self._probe.on_train_batch_start(
            trainer, batch, batch_idx, lambda: self._calibrating(trainer)
        )

    def on_before_optimizer_step(
        self,
        trainer: lightning.Trainer,
        pl_module: lightning.LightningModule,
        optimizer: torch.optim.Optimizer,
    ) -> None:
        """"""
        if self.done:
            return
        measured = self._probe.measure(trainer, pl_module)
        if measured is None:
            return
        names = self.calibration.names
        if not set(measured.names) <= set(names):
            raise ValueError(
                f"{WHO}: the active loss components changed during calibration (calibrating "
                f"{names}, measured {measured.names}); no other callback may change them"
            )
        if not self.calibration.add(measured.full_gram(names)) and not self._warned_skip:
            self._warned_skip = True
            _log.warning(
                "%s: a calibration step had non-finite task gradients and was not counted "
                "(further cases are not reported)",
                WHO,
            )

    def on_train_batch_end(
        self,
        trainer: lightning.Trainer,
        pl_module: lightning.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """"""
        if not self.done and self._end_step is not None and trainer.global_step >= self._end_step:
            self._finish(trainer, pl_module)

    def on_train_epoch_end(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule
    ) -> None:
        """"""
        if not self.done:
            self._probe.reset_window()

    def _finish(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        """Choose the coefficients (identical on every rank: rank 0's are broadcast), set
        them, log them, and stop all work."""
        chosen = self.calibration.coefficients(WHO)
        if self.datasets == "within":
            fields = {n: e.field for n, e in pl_module.loss.entries.items()}
            initial = dict(zip(self.calibration.names, self.calibration.initial_coeffs.tolist()))
            group_of = {n: getattr(fields[n], "dataset", None) for n in chosen}
            chosen = keep_group_shares(chosen, initial, group_of)
        chosen = trainer.strategy.broadcast(chosen, src=0)
        self.coefficients = update_coeffs(pl_module.loss, chosen, WHO)
        self._probe.teardown()  # drop the private loss copy: nothing more to measure

        cal = self.calibration
        metrics = {f"{PREFIX}/coeff/{n}": float(c) for n, c in chosen.items()}
        metrics.update(
            {f"{PREFIX}/grad_norm/{n}": float(v) for n, v in zip(cal.names, cal.mean_norms)}
        )
        metrics[f"{PREFIX}/steps"] = float(cal.num_steps)
        if self.rule == "aggregator":
            metrics.update(
                {f"{PREFIX}/weight/{n}": float(v) for n, v in zip(cal.names, cal.mean_weights)}
            )
            metrics[f"{PREFIX}/weight_sum"] = cal.weight_sum
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
            text = ", ".join(f"{n}={c:.6g}" for n, c in chosen.items())
            _log.info(
                "%s: rule %s over %d steps (global steps %d-%d) set the loss coefficients %s",
                WHO,
                self.rule,
                cal.num_steps,
                self._start_step,
                self._end_step - 1,
                text,
            )

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """"""
        return {
            "config": self._config(),
            "start_step": self._start_step,
            "end_step": self._end_step,
            "calibration": None if self.calibration is None else self.calibration.state_dict(),
            "coefficients": None if self.coefficients is None else dict(self.coefficients),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """"""
        config = dict(state_dict["config"])
        # checkpoints written before `datasets` existed: the configured setting applies
        config.setdefault("datasets", self.datasets)
        done = state_dict["coefficients"] is not None
        if config != self._config():
            if not done:
                raise ValueError(
                    f"{WHO}: the checkpoint holds an unfinished calibration with {config}, but "
                    f"the callback is configured with {self._config()}; restore the settings "
                    "to resume it (or remove the callback's state to start over)"
                )
            _log.warning(
                "%s: the checkpoint's calibration (%s) is finished; its coefficients are kept "
                "and the new settings (%s) are not used",
                WHO,
                config,
                self._config(),
            )
        self._start_step = state_dict["start_step"]
        self._end_step = state_dict["end_step"]
        self.coefficients = None if not done else dict(state_dict["coefficients"])
        cal = state_dict["calibration"]
        if cal is None:
            self.calibration = None
            return
        self.calibration = GradientCalibration(
            cal["names"],
            cal["initial_coeffs"],
            cal["rule"],
            aggregator=self.aggregator if cal["rule"] == "aggregator" else None,
        )
        self.calibration.load_state_dict(cal)


def _build_gram_aggregator(rule: str, aggregator: Any) -> Any:
    if rule != "aggregator":
        if aggregator is not None:
            raise ValueError(
                f"{WHO}.aggregator is only used with `rule: aggregator`; got rule {rule!r}"
            )
        return None
    if aggregator is None:
        raise ValueError(
            f"{WHO}.aggregator is required with `rule: aggregator` (e.g. "
            "{_target_: nequip_mtl.aggregators.UPGrad})"
        )
    built = build_aggregator(aggregator, f"{WHO}.aggregator")
    if not isinstance(built, GramAggregator):
        raise ValueError(
            f"{WHO}.aggregator must be a Gram-space aggregator (a GramAggregator, whose "
            f"update is weights @ G); {type(built).__name__} is not"
        )
    return built
