"""FAMO (Liu et al. 2023) as a NequIP training module."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from nequip.train import NequIPLightningModule

from ..step import WindowTracker
from ..weighting.famo import FAMOLogits
from ._compile import log_train_time_compile
from .arguments import check_module_arguments
from .coefficients import (
    active_indices,
    check_loss_coeffs,
    positive_active_coeffs,
    validate_coeffs,
)
from .forward_losses import training_loss_components
from .label_checks import check_module_labels

_CKPT_KEY = "nequip_mtl_famo"


class FAMOLightningModule(NequIPLightningModule):
    """Fast Adaptive Multitask Optimization (FAMO; Liu, Liu, Stone & Liu, NeurIPS 2023).

    Each step trains on ``sum_k w_k L_k`` with detached weights
    ``w_k = (z_k / d_k) / sum_l (z_l / d_l)``, ``z = softmax(xi)``, ``d_k = L_k - m_k + eps``
    -- the gradient of FAMO's ``sum_k z_k log d_k`` up to a positive factor. The task
    logits ``xi`` then follow FAMO's rule: an Adam step (learning rate ``logit_lr``,
    weight decay ``logit_weight_decay``) along ``J_softmax^T delta`` with ``delta_k`` the
    decrease of ``log d_k`` over the last optimizer step. Tasks that improve less gain
    weight. The extra cost is O(number of tasks) scalar work per step: no extra forward
    or backward pass.

    *Why a module and not a callback*: the weights depend on the *current* step's losses
    (``1 / d_k``), which only exist inside ``training_step``; a callback could only use
    the previous step's. The logits are not trained by the model's optimizer, so they
    are plain state (saved in checkpoints under ``nequip_mtl_famo``), not parameters.

    *Loss change*: the reference implementation re-evaluates the losses on the same batch
    after the update (one more forward pass; for force fields that includes a gradient
    pass). Here ``delta`` compares the mean loss of the previous optimizer step with the
    first micro-batch of the current one (the next batch), which costs nothing; its
    batch-to-batch noise averages out over steps.

    The loss coefficients are used only to initialise ``xi_k = log c_k`` (centred), so the
    first step follows the configured coefficients (equal coefficients give FAMO's
    ``xi = 0``). Callbacks that change loss coefficients (schedulers, SoftAdapt, ...) are
    refused when training starts. ``applied_task_weights`` holds the last step's ``w`` (logged by
    :class:`~nequip_mtl.train.callbacks.LossCoefficientMonitor`); ``famo/logit/<name>`` is
    logged every step.

    .. code-block:: yaml

        training_module:
          _target_: nequip_mtl.train.FAMOLightningModule
          logit_lr: 0.025
          logit_weight_decay: 0.001
          loss:
            _target_: nequip_mtl.train.EnergyForceStressLoss
            coeffs: {total_energy: 1.0, forces: 1.0, stress: 1.0}
          # model, optimizer, lr_scheduler, metrics: as for nequip.train.NequIPLightningModule

    Args:
        logit_lr (float): learning rate of the logits' Adam (default 0.025)
        logit_weight_decay (float): FAMO's ``gamma`` (default 0.001)
        min_losses (dict, optional): ``{loss_name: m_k}`` lower bounds of the losses (default 0)
        eps (float): added to ``L_k - m_k`` (default ``1e-8``)
        **kwargs: arguments of :class:`~nequip.train.NequIPLightningModule`
    """

    ignores_loss_coeff_values = True

    def __init__(
        self,
        logit_lr: float = 0.025,
        logit_weight_decay: float = 1e-3,
        min_losses: Mapping[str, float] | None = None,
        eps: float = 1e-8,
        **kwargs,
    ):
        check_module_arguments(type(self), kwargs)
        check_loss_coeffs(kwargs.get("loss"), type(self).__name__)
        super().__init__(**kwargs)
        cls = type(self).__name__
        if self.loss is None:
            raise ValueError(f"{cls} needs a `loss`")
        for key, value, positive in (
            ("logit_lr", logit_lr, True),
            ("logit_weight_decay", logit_weight_decay, False),
            ("eps", eps, True),
        ):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
                or (positive and value == 0)
            ):
                raise ValueError(
                    f"{cls}.{key} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}"
                )
        names = list(self.loss.keys())
        self._names = names
        coeffs = positive_active_coeffs(self.loss, cls, "a FAMO logit")
        active = list(coeffs)
        init = torch.zeros(len(names), dtype=torch.float64)
        for i, c in coeffs.items():
            init[i] = math.log(c)
        if active:
            init[active] -= init[active].mean()
        mins = torch.zeros(len(names), dtype=torch.float64)
        if min_losses is not None:
            checked = validate_coeffs(names, min_losses, f"{cls}.min_losses")
            for k, v in checked.items():
                mins[names.index(k)] = 0.0 if v is None else v
        self.min_losses = mins
        self.eps = float(eps)
        self.famo = FAMOLogits(len(names), lr=logit_lr, weight_decay=logit_weight_decay, init=init)
        self._prev_losses: torch.Tensor | None = None
        self._acc_sum = torch.zeros(len(names), dtype=torch.float64)
        self._acc_count = 0
        self._windows = WindowTracker()
        #: name -> weight of that loss component in the last step's loss (sums to 1)
        self.applied_task_weights: dict[str, float] = {}
        #: FAMO computes no per-task gradients (``TaskGradientObservable``)
        self.task_gradient_statistics = None

    measures_task_gradients = False

    def on_fit_start(self) -> None:
        """"""
        super().on_fit_start()
        log_train_time_compile(self)
        check_module_labels(self)  # labels the loss needs: present and finite

    def training_step(self, batch, batch_idx: int, dataloader_idx: int = 0):
        """"""
        delim = self.logging_delimiter
        loss_dict = training_loss_components(self, batch, batch_idx, dataloader_idx)

        names = self._names
        active = active_indices(self.loss, required=True)
        values = torch.stack([loss_dict[f"train_loss_step{delim}{n}"].detach() for n in names])
        values = values.to(device="cpu", dtype=torch.float64)
        mask = torch.zeros(len(names), dtype=torch.bool)
        mask[active] = True

        if self._windows.starts(int(self.trainer.global_step)):
            # first micro-batch of a new optimizer step: close the previous step and let
            # the logits see the loss change it produced
            if self._acc_count > 0:
                self._prev_losses = self._acc_sum / self._acc_count
            self._acc_sum = torch.zeros_like(self._acc_sum)
            self._acc_count = 0
            if self._prev_losses is not None:
                self.famo.update(self._prev_losses, values, mask, self.min_losses, self.eps)
        self._acc_sum = self._acc_sum + values
        self._acc_count += 1

        weights = self.famo.weights(values, mask, self.min_losses, self.eps)
        self.applied_task_weights = {names[i]: float(weights[i]) for i in active}
        loss = sum(
            float(weights[i]) * loss_dict[f"train_loss_step{delim}{names[i]}"] for i in active
        )
        for i in active:
            self.log(f"famo{delim}logit{delim}{names[i]}", float(self.famo.logits[i]))
        return loss * self.world_size

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """"""
        super().on_save_checkpoint(checkpoint)
        checkpoint[_CKPT_KEY] = {
            "logits": self.famo.state_dict(),
            "prev_losses": None if self._prev_losses is None else self._prev_losses.clone(),
            "acc_sum": self._acc_sum.clone(),
            "acc_count": self._acc_count,
            "acc_step": self._windows.step,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """"""
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get(_CKPT_KEY)
        if state is None:
            return
        self.famo.load_state_dict(state["logits"])
        prev = state["prev_losses"]
        self._prev_losses = None if prev is None else torch.as_tensor(prev, dtype=torch.float64)
        self._acc_sum = torch.as_tensor(state["acc_sum"], dtype=torch.float64)
        self._acc_count = int(state["acc_count"])
        self._windows.step = state["acc_step"]
