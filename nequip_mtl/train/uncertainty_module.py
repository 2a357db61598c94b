"""Uncertainty weighting (Kendall, Gal & Cipolla 2018) as a NequIP training module."""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any

import torch
from hydra.utils import instantiate
from nequip.train import NequIPLightningModule

from ..weighting.uncertainty import uncertainty_weights
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

_DEFAULT_PARAM_GROUPS = {"_target_": "nequip.train.lightning._default_param_group_factory"}
_EXTRA_GROUPS: ContextVar[list[dict[str, Any]] | None] = ContextVar(
    "nequip_mtl_extra_param_groups", default=None
)


def param_groups_with_extra(model: Any, inner: Any) -> list[dict[str, Any]]:
    """Param-group factory: the configured groups of ``model`` plus the pending extra groups.

    Used through :func:`configure_optimizers_with_extra_groups`; do not configure directly.
    """
    groups = list(instantiate(inner, model=model))
    if groups and isinstance(groups[0], Mapping):
        groups = [dict(g) for g in groups]
    else:
        groups = [{"params": groups}]
    return groups + list(_EXTRA_GROUPS.get() or [])


def configure_optimizers_with_extra_groups(
    module: Any, extra_groups: list[dict[str, Any]], parent_cls: type
):
    """Run ``parent_cls.configure_optimizers(module)`` with ``extra_groups`` appended to the
    optimizer's parameter groups *before* the LR scheduler is built (so every scheduler,
    including ``ReduceLROnPlateau``, sees every group)."""
    original = module.optimizer_config
    cfg = dict(original)
    inner = cfg.get("param_groups", _DEFAULT_PARAM_GROUPS)
    cfg["param_groups"] = {
        "_target_": f"{__name__}.param_groups_with_extra",
        "_recursive_": False,
        "inner": inner,
    }
    token = _EXTRA_GROUPS.set(extra_groups)
    module.optimizer_config = cfg
    try:
        return parent_cls.configure_optimizers(module)
    finally:
        module.optimizer_config = original
        _EXTRA_GROUPS.reset(token)


class UncertaintyWeightingLightningModule(NequIPLightningModule):
    """Train on ``sum_k 0.5 exp(-s_k) L_k + 0.5 s_k`` with learnable log-variances ``s_k``
    (homoscedastic uncertainty weighting, Kendall et al. 2018).

    ``L_k`` are the active components of the ``loss`` MetricsManager (``coeff`` not
    ``null``). The log-variances are a parameter of this module (saved in checkpoints)
    and are optimised by the configured optimizer, in an extra parameter group with
    ``weight_decay: 0`` and learning rate ``log_variance_lr`` (default: the optimizer's).
    A learnable parameter is why this is a training module and not a callback.

    The loss coefficients are used only to initialise ``s_k = -log(K c_k)`` (``K``: number
    of active components), so the first step weighs the components as configured (equal
    coefficients give Kendall et al.'s ``s = 0``); ``initial_log_variances`` overrides this.
    At the optimum ``0.5 exp(-s_k) = 1 / (2 L_k)``: components with a large irreducible
    loss are down-weighted. Callbacks that change loss coefficients (schedulers, SoftAdapt,
    ...) are refused when training starts.

    Logged: ``uncertainty/log_variance/<name>`` and ``train_loss_step/uncertainty_objective``;
    ``applied_task_weights`` holds the multipliers ``0.5 exp(-s_k)`` of the last step (logged
    by :class:`~nequip_mtl.train.callbacks.LossCoefficientMonitor`).

    .. code-block:: yaml

        training_module:
          _target_: nequip_mtl.train.UncertaintyWeightingLightningModule
          log_variance_lr: 0.01        # optional
          loss:
            _target_: nequip_mtl.train.EnergyForceStressLoss
            coeffs: {total_energy: 1.0, forces: 1.0, stress: 1.0}
          # model, optimizer, lr_scheduler, metrics: as for nequip.train.NequIPLightningModule

    Args:
        initial_log_variances (dict, optional): ``{loss_name: s_k}`` starting values
        log_variance_lr (float, optional): learning rate of the log-variances
        **kwargs: arguments of :class:`~nequip.train.NequIPLightningModule`
    """

    ignores_loss_coeff_values = True

    def __init__(
        self,
        initial_log_variances: Mapping[str, float] | None = None,
        log_variance_lr: float | None = None,
        **kwargs,
    ):
        check_module_arguments(type(self), kwargs)
        check_loss_coeffs(kwargs.get("loss"), type(self).__name__)
        super().__init__(**kwargs)
        cls = type(self).__name__
        if self.loss is None:
            raise ValueError(f"{cls} needs a `loss`")
        names = list(self.loss.keys())
        coeffs = positive_active_coeffs(
            self.loss, cls, "a log-variance (or give `initial_log_variances`)"
        )
        init = torch.zeros(len(names), dtype=torch.float64)
        for i, c in coeffs.items():
            init[i] = -math.log(len(coeffs) * c)
        if initial_log_variances is not None:
            checked = validate_coeffs(
                names, {k: 0.0 for k in initial_log_variances}, f"{cls}.initial_log_variances"
            )
            for k in checked:
                v = initial_log_variances[k]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ValueError(
                        f"{cls}.initial_log_variances[{k!r}] must be a finite number, got {v!r}"
                    )
                init[names.index(k)] = float(v)
        if log_variance_lr is not None and not (
            isinstance(log_variance_lr, (int, float)) and log_variance_lr > 0
        ):
            raise ValueError(f"{cls}.log_variance_lr must be > 0 or null, got {log_variance_lr!r}")
        self.log_variance_lr = log_variance_lr
        self.log_variances = torch.nn.Parameter(init)
        #: name -> multiplier 0.5 exp(-s) of that loss component in the last step
        self.applied_task_weights: dict[str, float] = {}
        #: computes no per-task gradients (``TaskGradientObservable``)
        self.task_gradient_statistics = None

    measures_task_gradients = False

    def configure_optimizers(self):
        """The configured optimizer/scheduler, with the log-variances as an extra group."""
        group: dict[str, Any] = {"params": [self.log_variances], "weight_decay": 0.0}
        if self.log_variance_lr is not None:
            group["lr"] = float(self.log_variance_lr)
        return configure_optimizers_with_extra_groups(self, [group], NequIPLightningModule)

    def on_fit_start(self) -> None:
        """"""
        super().on_fit_start()
        log_train_time_compile(self)
        check_module_labels(self)  # labels the loss needs: present and finite

    def training_step(self, batch, batch_idx: int, dataloader_idx: int = 0):
        """"""
        delim = self.logging_delimiter
        loss_dict = training_loss_components(self, batch, batch_idx, dataloader_idx)

        names = list(self.loss.keys())
        active = active_indices(self.loss, required=True)
        losses = torch.stack([loss_dict[f"train_loss_step{delim}{names[i]}"] for i in active])
        s = self.log_variances[active].to(losses.dtype)
        # DDP averages gradients over ranks; the loss values are already global means, so
        # (as in nequip) the model gradient needs the world-size factor, but the
        # log-variance gradient (from global values, identical on every rank) must not get it
        model_term = (0.5 * torch.exp(-s.detach()) * losses).sum() * self.world_size
        s_term = (0.5 * torch.exp(-s) * losses.detach() + 0.5 * s).sum()
        objective = model_term + s_term

        weights = uncertainty_weights(s.detach())
        self.applied_task_weights = {names[i]: float(w) for i, w in zip(active, weights)}
        with torch.no_grad():
            true_value = (0.5 * torch.exp(-s) * losses + 0.5 * s).sum()
        self.log(f"train_loss_step{delim}uncertainty_objective", true_value)
        for i in active:
            self.log(
                f"uncertainty{delim}log_variance{delim}{names[i]}", self.log_variances[i].detach()
            )
        return objective
