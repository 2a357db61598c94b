"""Check the training labels against the loss before the first step."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback

from ..label_checks import check_module_labels


class CheckTrainingLabels(Callback):
    """Refuse, at the start of training, a loss whose labels the training data lacks; warn
    about labels it holds and the loss does not train.

    Runs :func:`nequip_mtl.train.label_checks.check_training_labels` on the training
    module's ``loss`` and the data module's ``train_dataset``: a component that needs a
    label a dataset lacks, or whose label is non-finite in some frames (without
    ``ignore_nan``), is an error naming the component, the dataset, the field and the
    number of frames. A label the frames hold and no component trains on (e.g. the stress
    of periodic frames under an energy and forces loss) is an
    :class:`~nequip_mtl.train.label_checks.UnusedLabelWarning` naming the dataset, the
    field, the frames and the key that trains it. The gradient-aggregation modules of this
    package run the same check themselves; add this callback to use it with nequip's
    ``NequIPLightningModule``.

    .. code-block:: yaml

        trainer:
          callbacks:
            - _target_: nequip_mtl.train.callbacks.CheckTrainingLabels
    """

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """"""
        check_module_labels(pl_module)
