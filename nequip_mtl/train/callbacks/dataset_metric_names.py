"""Validation and test metrics logged under the names of their datasets, one printed table
per dataset, and a validation before training."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.seed import isolate_rng

__all__ = ["DatasetMetricNames", "loader_metrics", "OPTIMIZER_STEPS"]

#: logged with every validation of a fit: the optimizer steps taken before it (0: the
#: validation before training)
OPTIMIZER_STEPS = "val_optimizer_steps"


def _dataset_of(entry) -> str | None:
    """The dataset a metric entry reads (a ``DatasetModifier`` field), else ``None``."""
    field = getattr(entry, "field", None)
    inner = getattr(field, "inner", None)
    if inner is None or not hasattr(field, "dataset_index"):
        return None
    return getattr(field, "dataset", None)


def _entry_keys(name: str, entry, type_names) -> list[str]:
    """The keys ``MetricsManager.compute`` gives one entry (per-type ones too)."""
    if getattr(entry, "per_type", False):
        return [name, *(f"{name}_{t}" for t in type_names or ())]
    return [name]


def loader_metrics(
    manager, dataset: str, values: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The metrics of a loader that holds the frames of ``dataset`` only.

    ``values`` is ``manager.compute()`` (no prefix) of that loader's metrics manager. A
    per-dataset component of *another* dataset (``xtb/forces_mae`` of a
    :func:`~nequip_mtl.train.PerDatasetMetrics` on the ``dft`` loader) never sees a frame
    there: it is always NaN and is left out. Returns:

    - ``kept``: the others under the manager's names (``dft/forces_mae``,
      ``weighted_sum``), as nequip logs them under ``val{j}_epoch/``;
    - ``named``: the same values with the dataset's own ``<dataset>/`` prefix removed
      (``forces_mae``), for ``val_<dataset>_epoch/`` (a name that would collide with
      another metric keeps its prefix).

    When components were left out, ``weighted_sum`` is the coefficient-weighted mean of the
    kept components with a coefficient and a value (the coefficients renormalised over
    them); otherwise it is the manager's own.
    """
    type_names = getattr(manager, "type_names", None)
    entries = getattr(manager, "entries", {})
    others = {
        key
        for name, entry in entries.items()
        if _dataset_of(entry) not in (None, dataset)
        for key in _entry_keys(name, entry, type_names)
    }
    kept = {k: v for k, v in values.items() if k not in others}
    if others and "weighted_sum" in kept:
        total, norm = 0.0, 0.0
        for name, entry in entries.items():
            value = kept.get(name)
            if entry.coeff is None or value is None:
                continue
            if _dataset_of(entry) is not None and math.isnan(float(value)):
                continue  # no frame of it this epoch (e.g. a label the dataset lacks)
            total, norm = total + value * entry.coeff, norm + entry.coeff
        kept["weighted_sum"] = (
            torch.as_tensor(total / norm, dtype=torch.float64)
            if norm > 0
            else torch.tensor(math.nan, dtype=torch.float64)
        )
    prefix = f"{dataset}/"
    named = {}
    for key, value in kept.items():
        short = key[len(prefix) :] if key.startswith(prefix) else key
        named[key if short != key and short in kept else short] = value
    return kept, named


def _skip_next_compute(manager) -> None:
    """Make ``manager.compute`` return ``{}`` once (then it is the class's method again)."""

    def compute(*args, **kwargs):
        manager.__dict__.pop("compute", None)
        return {}

    manager.__dict__["compute"] = compute


class DatasetMetricNames(Callback):
    """Each validation/test loader's metrics under its dataset's name, one table per dataset,
    and a validation before training.

    With a :class:`~nequip_mtl.data.MultiDatasetDataModule`, validation loader ``j`` holds
    the frames of dataset ``<name>`` (``datamodule.val_dataloader_names[j]``). At the end of
    each loader, this callback computes that loader's metrics (the lightning module's
    ``val_metrics[j]``, nequip's ``MetricsManager``) and logs them twice:

    - ``val{j}_epoch/<metric>``: nequip's names, so checkpoint monitors such as
      ``val0_epoch/weighted_sum`` keep working;
    - ``val_<name>_epoch/<metric>``: the same values under the dataset's name.

    (``test{j}_epoch/...`` and ``test_<name>_epoch/...`` for the test loaders.) They are
    logged while Lightning runs that loader, so the table Lightning prints after
    ``trainer.validate``/``trainer.test`` (``nequip-train`` with ``run: [val, test]``) shows
    under "DataLoader j" the metrics of dataset ``j`` only; nequip itself logs every loader's
    metrics at the end of the epoch, which Lightning attributes to every loader (this
    callback logs them in its place: nequip's compute returns nothing once).

    Per-dataset metrics (:func:`~nequip_mtl.train.PerDatasetMetrics`) on a dataset's own
    loader: the components of the other datasets never see a frame there (always NaN) and
    are not logged, and the dataset's own are named without their doubled dataset name:
    ``val_dft_epoch/forces_mae`` (and nequip's ``val0_epoch/dft/forces_mae``), not
    ``val_dft_epoch/dft/forces_mae``, no ``val_dft_epoch/xtb/*``, no ``val0_epoch/xtb/*``.
    Their ``weighted_sum`` is the coefficient-weighted mean of the dataset's own components
    (see :func:`loader_metrics`).

    **Before training.** With ``validate_before_training`` (the default), a fit that starts
    at step 0 first runs Lightning's validation loop once, before the first optimizer step,
    and logs it like any validation, at step 0, with ``val_optimizer_steps`` 0 (every
    validation of a fit logs the optimizer steps taken before it): the errors of the model as it starts (for
    fine-tuning: the pretrained model's errors on every dataset, against which forgetting
    shows). Lightning's sanity check is not logged, nor is any validation before the first
    epoch's end otherwise. Every callback sees this validation as a validation (an
    ``EarlyStopping`` counts it); ``ModelCheckpoint`` saves nothing at step 0. The global
    random state is restored afterwards, as after Lightning's sanity check.

    Example:

    .. code-block:: yaml

        trainer:
          callbacks:
            - _target_: nequip_mtl.train.callbacks.DatasetMetricNames
              # validate_before_training: true

    Args:
        validate_before_training (bool): run and log a validation before the first
            optimizer step of a fit that starts at step 0 (default ``True``)
    """

    def __init__(self, validate_before_training: bool = True) -> None:
        super().__init__()
        self.validate_before_training = bool(validate_before_training)
        self._done: set[int] = set()
        self._skipped: list = []

    # ------------------------------------------------------------------ names

    @staticmethod
    def _names_and_managers(trainer, pl_module, split: str):
        names = getattr(trainer.datamodule, f"{split}_dataloader_names", None)
        managers = getattr(pl_module, f"{split}_metrics", None)
        if names is None or managers is None:
            raise RuntimeError(
                "DatasetMetricNames needs a data module with "
                f"`{split}_dataloader_names` (nequip_mtl.data.MultiDatasetDataModule) and a "
                f"lightning module with `{split}_metrics` (nequip's NequIPLightningModule)"
            )
        return list(names), managers

    @staticmethod
    def _num_batches(trainer, split: str, index: int):
        if split == "test":
            counts = trainer.num_test_batches
        elif trainer.sanity_checking:
            counts = trainer.num_sanity_val_batches
        else:
            counts = trainer.num_val_batches
        return counts[index] if index < len(counts) else None

    def _log_loader(self, trainer, pl_module, split: str, index: int) -> None:
        names, managers = self._names_and_managers(trainer, pl_module, split)
        manager, name = managers[index], names[index]
        kept, named = loader_metrics(manager, name, manager.compute())
        delimiter = getattr(pl_module, "logging_delimiter", "/")
        values = {f"{split}{index}_epoch{delimiter}{k}": v for k, v in kept.items()}
        values.update({f"{split}_{name}_epoch{delimiter}{k}": v for k, v in named.items()})
        # under the loader's index, without Lightning's `/dataloader_idx_j` suffix: the
        # values land in loader j's printed table only; one value an epoch (batch_size 1:
        # logged as is)
        pl_module.log_dict(
            values, on_step=False, on_epoch=True, add_dataloader_idx=False, batch_size=1
        )
        manager.reset()
        self._done.add(index)

    def _batch_end(self, trainer, pl_module, split: str, batch_idx: int, index: int) -> None:
        if batch_idx + 1 == self._num_batches(trainer, split, index):
            self._log_loader(trainer, pl_module, split, index)

    def _epoch_end(self, trainer, pl_module, split: str) -> None:
        _, managers = self._names_and_managers(trainer, pl_module, split)
        for index in range(len(managers)):
            if index not in self._done:  # a loader whose last batch was not seen
                self._log_loader(trainer, pl_module, split, index)
        self._done.clear()
        if split == "val" and trainer.state.fn == "fit" and not trainer.sanity_checking:
            # the logged `step` of a validation is that of the last training batch (the
            # pre-training one and the first epoch's share step 0 when an epoch has one
            # batch): the optimizer steps taken tell them apart
            pl_module.log(OPTIMIZER_STEPS, float(trainer.global_step), batch_size=1)
        # nequip's `on_{split}_epoch_end` (after this hook) computes, logs and resets every
        # loader's metrics: they are logged above, so its compute gives nothing this once
        for manager in managers:
            _skip_next_compute(manager)
            self._skipped.append(manager)

    def _restore(self) -> None:
        for manager in self._skipped:
            manager.__dict__.pop("compute", None)
        self._skipped.clear()
        self._done.clear()

    # ------------------------------------------------------------------ hooks

    def on_train_start(self, trainer, pl_module) -> None:
        if not self.validate_before_training or trainer.global_step != 0:
            return
        if not trainer.enable_validation:
            return
        stage = trainer.state.stage
        with isolate_rng():
            trainer.validating = True  # as Lightning's training loop does before validating
            try:
                trainer.fit_loop.epoch_loop.val_loop.run()
            finally:
                trainer.state.stage = stage

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self._batch_end(trainer, pl_module, "val", batch_idx, dataloader_idx)

    def on_test_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self._batch_end(trainer, pl_module, "test", batch_idx, dataloader_idx)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._epoch_end(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._epoch_end(trainer, pl_module, "test")

    def on_validation_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_test_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()
