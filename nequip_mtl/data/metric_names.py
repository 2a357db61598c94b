"""Validation and test metrics logged under the names of their datasets."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback


class DatasetMetricNames(Callback):
    """Logs each validation/test loader's metrics a second time under its dataset's name.

    nequip logs validation loader ``j`` as ``val{j}_epoch/<metric>``; with a
    :class:`~nequip_mtl.data.MultiDatasetDataModule` this callback adds
    ``val_<name>_epoch/<metric>`` (and ``test_<name>_epoch/<metric>``), ``<name>`` being the
    dataset of loader ``j`` (``datamodule.val_dataloader_names[j]``). The original names stay,
    so checkpoint monitors such as ``val0_epoch/weighted_sum`` keep working. It reads the
    lightning module's public ``val_metrics`` / ``test_metrics`` (nequip's ``MetricsManager``
    lists) just before the module computes and resets them.

    Example::

        trainer:
          callbacks:
            - _target_: nequip_mtl.data.DatasetMetricNames
    """

    def _log(self, trainer, pl_module, split: str) -> None:
        names = getattr(trainer.datamodule, f"{split}_dataloader_names", None)
        managers = getattr(pl_module, f"{split}_metrics", None)
        if names is None or managers is None:
            raise RuntimeError(
                "DatasetMetricNames needs a data module with "
                f"`{split}_dataloader_names` (nequip_mtl.data.MultiDatasetDataModule) and a "
                f"lightning module with `{split}_metrics` (nequip's NequIPLightningModule)"
            )
        delimiter = getattr(pl_module, "logging_delimiter", "/")
        for name, manager in zip(names, managers):
            pl_module.log_dict(manager.compute(prefix=f"{split}_{name}_epoch{delimiter}"))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._log(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._log(trainer, pl_module, "test")
