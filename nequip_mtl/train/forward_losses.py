"""The loss part of a training step, shared by the modules that replace the weighted sum."""

from __future__ import annotations

from typing import Any

import torch

from ..step.tasks import NO_ACTIVE_COMPONENT
from .sub_batches import forward_per_dataset


def active_indices(manager: Any, required: bool = False) -> list[int]:
    """Positions of the loss components whose ``coeff`` is not ``None``; with
    ``required``, a ``RuntimeError`` if there is none."""
    active = [i for i, entry in enumerate(manager.entries.values()) if entry.coeff is not None]
    if required and not active:
        raise RuntimeError(NO_ACTIVE_COMPONENT)
    return active


def active_names(manager: Any) -> list[str]:
    """Names of the loss components whose ``coeff`` is not ``None``, in loss order."""
    names = list(manager.keys())
    return [names[i] for i in active_indices(manager)]


def positive_active_coeffs(manager: Any, who: str, what: str) -> dict[int, float]:
    """``{position: coeff}`` of the active loss components; every one must be > 0.

    ``what`` names the quantity the coefficients initialise, for the error message.
    """
    names = list(manager.keys())
    coeffs = {}
    for i in active_indices(manager):
        c = manager.entries[names[i]].coeff
        if not c > 0:
            raise ValueError(
                f"{who}: loss component {names[i]!r} has coefficient {c}; a zero coefficient "
                f"cannot initialise {what} (use null to exclude the term)"
            )
        coeffs[i] = c
    return coeffs


def training_loss_components(
    module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0, per_dataset: bool = False
) -> dict[str, torch.Tensor]:
    """Forward pass and loss components, logged exactly as nequip's ``training_step`` does.

    With ``per_dataset``, one forward pass per training dataset's frames
    (:func:`~nequip_mtl.train.sub_batches.forward_per_dataset`), the outputs concatenated.
    Returns the loss ``MetricsManager``'s dict, keyed ``train_loss_step/<name>`` (with the
    module's logging delimiter), including ``weighted_sum``.
    """
    return training_losses_and_output(module, batch, batch_idx, dataloader_idx, per_dataset)[0]


def training_losses_and_output(
    module: Any,
    batch: Any,
    batch_idx: int,
    dataloader_idx: int = 0,
    per_dataset: bool = False,
    keep_parts: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """:func:`training_loss_components` and the model's output it was computed from; with
    ``per_dataset`` and ``keep_parts`` a
    :class:`~nequip_mtl.train.sub_batches.SubBatchOutput` when the batch held several
    datasets (each per-dataset loss component then reads its own sub-batch's output)."""
    delim = module.logging_delimiter
    if per_dataset:
        output, batch = forward_per_dataset(module, batch, keep_parts=keep_parts)
        target = module.process_target(batch, batch_idx, dataloader_idx)
    else:
        target = module.process_target(batch, batch_idx, dataloader_idx)
        output = module(batch)
    if module.train_metrics is not None:
        with torch.no_grad():
            module.log_dict(
                module.train_metrics(output, target, prefix=f"train_metric_step{delim}")
            )
    loss_dict = module.loss(output, target, prefix=f"train_loss_step{delim}")
    module.log_dict(loss_dict)
    return loss_dict, output
