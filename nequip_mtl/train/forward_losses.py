"""The forward pass and the loss components of a training step, logged as nequip logs them.

Shared by the training modules that replace nequip's weighted sum (the gradient-aggregation
modules, FAMO, uncertainty weighting): they need the loss components one by one, where
nequip's ``training_step`` returns only their weighted sum.
"""

from __future__ import annotations

from typing import Any

import torch

from .sub_batches import forward_per_dataset


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
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """:func:`training_loss_components` and the model's output it was computed from; with
    ``per_dataset`` a :class:`~nequip_mtl.train.sub_batches.SubBatchOutput` when the batch
    held several datasets (each per-dataset loss component then reads its own sub-batch's
    output)."""
    delim = module.logging_delimiter
    if per_dataset:
        output, batch = forward_per_dataset(module, batch)
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
