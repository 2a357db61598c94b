"""The metrics manager of per-dataset loss components and metrics, and what an absent dataset gives.

When a batch mixes the frames of several training datasets (each frame carries its
dataset's position in :data:`nequip_mtl.data.keys.DATASET_INDEX_KEY`), a per-dataset
component is nequip's usual metric restricted to one dataset's rows by a
:class:`~nequip_mtl.train.DatasetModifier` field; :class:`PerDatasetMetricsManager` holds
such components (built by :func:`~nequip_mtl.train.PerDatasetLoss` and
:func:`~nequip_mtl.train.PerDatasetMetrics`) beside nequip's.

**A dataset absent from a batch.** nequip's metrics return a constant NaN for an empty
selection; in a weighted sum that NaN would end the run. Here the component's step value
is instead an exact ``0``: on one forward pass of the batch it is connected to the model
output with an exactly zero gradient; on a batch forwarded one dataset at a time it reaches
no sub-batch's graph (:mod:`nequip_mtl.train.sub_batches`). So:

- :class:`~nequip.train.NequIPLightningModule`'s weighted sum gets ``+ 0`` from it, and a
  batch of one dataset only still has a loss that back-propagates;
- the gradient-aggregation modules see an exactly zero task gradient and leave the task
  out of that step (counted in ``mtl/dropped/<name>``), as for a stress component masked
  with ``ignore_nan`` in a batch without stresses; no NaN, no skipped step;
- the component's running state is not updated, so its epoch value (``compute``) is the
  mean over that dataset's frames (atoms) of the whole epoch, weighted by their number,
  exactly as if the other steps had not happened; an epoch without that dataset gives
  NaN for the component (there is nothing to average), and the ``weighted_sum`` of that
  epoch leaves it out;
- ``metrics_values_step`` (read by the coefficient callbacks with ``interval: batch``)
  holds NaN for it: "not observed on this step", which the loss-history callbacks skip,
  instead of a misleading 0.

Under DDP (``dist_sync_on_step``, which nequip sets for the loss), the emptiness is
decided over all ranks with one small all-reduce, so every rank takes the same branch; a
rank without the dataset contributes a zero gradient to the global mean.

Pure torch (no Lightning).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..data.binding import unknown_dataset_message
from ..distributed import several_ranks
from .dataset_modifier import DatasetModifier
from .metrics_manager import MultitaskMetricsManager

__all__ = ["PerDatasetMetricsManager"]


class _ZeroWhenEmpty(torch.nn.Module):
    """A metric that gives an exact, graph-connected ``0`` for an empty selection.

    Wraps a nequip/torchmetrics metric: ``forward`` on an empty selection (on every DDP
    rank, when syncing on step) returns ``0 * preds.sum()`` and leaves the metric's state
    alone; otherwise it is the wrapped metric's ``forward`` (plus an exact zero on a rank
    whose own selection is empty, so the value has a gradient path there too).
    ``compute``/``reset`` are the wrapped metric's; ``seen`` says whether any data reached
    it since the last ``reset``.
    """

    def __init__(self, metric: torch.nn.Module) -> None:
        super().__init__()
        self.metric = metric
        # torchmetrics syncs a step (`dist_sync_on_step`) by gathering every rank's state; a
        # rank whose selection is empty still holds the *defaults*, which for nequip's
        # metrics have other dtypes than an updated state (`sum`: int64 vs float64;
        # `max_error`: float32 vs float64), and gloo/NCCL then gather garbage. Float64
        # defaults make every rank's state the same dtype, updated or not.
        defaults = getattr(metric, "_defaults", None)
        if isinstance(defaults, dict):
            for name, default in defaults.items():
                if isinstance(default, torch.Tensor) and not default.is_complex():
                    defaults[name] = default.to(torch.float64)
                    setattr(metric, name, getattr(metric, name).to(torch.float64))
        self.seen = False
        self.empty_step = False

    @property
    def dist_sync_on_step(self) -> bool:
        return bool(getattr(self.metric, "dist_sync_on_step", False))

    @dist_sync_on_step.setter
    def dist_sync_on_step(self, value: bool) -> None:
        self.metric.dist_sync_on_step = value

    def _global_count(self, local: int, device: torch.device) -> int:
        if self.dist_sync_on_step and several_ranks():
            n = torch.tensor([local], dtype=torch.long, device=device)
            torch.distributed.all_reduce(n)
            return int(n.item())
        return local

    def forward(self, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        local = preds.numel()
        zero = (preds.sum() * 0.0).to(torch.float64)
        self.empty_step = self._global_count(local, preds.device) == 0
        if self.empty_step:
            return zero
        self.seen = True
        value = self.metric(preds, target)
        return value if local > 0 else value.detach() + zero

    def compute(self) -> torch.Tensor:
        if not self.seen:
            return torch.tensor(math.nan, dtype=torch.float64)
        return self.metric.compute()

    def reset(self) -> None:
        self.seen = False
        self.empty_step = False
        self.metric.reset()


class PerDatasetMetricsManager(MultitaskMetricsManager):
    """A :class:`~nequip_mtl.train.MultitaskMetricsManager` with per-dataset components.

    Takes the arguments of :class:`~nequip.train.MetricsManager`. Every entry whose
    ``field`` is a :class:`DatasetModifier` is computed on that dataset's part of the batch
    and behaves as the module docstring describes when the dataset is absent from a batch
    (an exact 0 with a zero gradient; no state update; NaN in ``metrics_values_step``).
    Other entries are nequip's. ``per_type`` is not supported on per-dataset entries.

    .. code-block:: yaml

        training_module:
          _target_: nequip_mtl.train.MultitaskLightningModule
          loss:
            _target_: nequip_mtl.train.PerDatasetMetricsManager
            metrics:
              - name: pretrain/forces_mse
                field: {_target_: nequip_mtl.train.DatasetModifier, field: forces,
                        dataset: pretrain}
                coeff: 1.0
                metric: {_target_: nequip.train.MeanSquaredError}
              - name: new/forces_mse
                field: {_target_: nequip_mtl.train.DatasetModifier, field: forces,
                        dataset: new}
                coeff: 1.0
                metric: {_target_: nequip.train.MeanSquaredError}

    Args:
        metrics (list of dict): as for :class:`~nequip.train.MetricsManager`
        type_names (list of str, optional): as for :class:`~nequip.train.MetricsManager`
    """

    def __init__(self, metrics: list[dict[str, Any]], type_names: list[str] | None = None):
        wrapped = []
        for i, metric in enumerate(metrics):
            metric = dict(metric)
            if isinstance(metric.get("field"), DatasetModifier):
                if metric.get("per_type", False):
                    label = metric.get("name", f"metrics[{i}]")
                    raise ValueError(
                        f"PerDatasetMetricsManager: `per_type` is not supported on the "
                        f"per-dataset component {label!r}"
                    )
                metric["metric"] = _ZeroWhenEmpty(metric["metric"])
            wrapped.append(metric)
        super().__init__(wrapped, type_names=type_names)

    #: the key under the manager's config that names its datasets (for messages):
    #: ``datasets`` when built by :func:`PerDatasetLoss` / :func:`PerDatasetMetrics`
    datasets_key = "metrics"

    def bind_datasets(self, names: Sequence[str], where: str = "training_module.loss") -> None:
        """Bind every per-dataset component to the data module's datasets ``names`` by name
        (the data module calls this at setup, see :mod:`nequip_mtl.data.binding`).

        Refuses a dataset name the data module lacks (naming ``where``, the component and the
        closest dataset) and, for the loss (``where`` ending in ``.loss``) whose components
        are all per-dataset, a training dataset that no component reads.
        """
        fields = {name: entry.field for name, entry in self.entries.items()}
        per = {n: f for n, f in fields.items() if isinstance(f, DatasetModifier)}
        for component, field in per.items():
            if not field.bind(names):
                raise ValueError(
                    unknown_dataset_message(f"{where}.{self.datasets_key}", field.dataset, names)
                    + f" (loss/metric component {component!r})"
                )
        if where.endswith(".loss") and per and len(per) == len(fields):
            read = {f.dataset_index for f in per.values()}
            unread = [n for i, n in enumerate(names) if i not in read]
            if unread:
                raise ValueError(
                    f"`data.datasets` has the training dataset(s) {unread}, which no component "
                    f"of `{where}` reads (its datasets: "
                    f"{list(dict.fromkeys(f.dataset for f in per.values()))}): add them to "
                    f"`{where}.{self.datasets_key}` or remove them from `data.datasets`"
                )

    def _per_dataset(self) -> dict[str, _ZeroWhenEmpty]:
        return {name: self[name] for name in self.entries if isinstance(self[name], _ZeroWhenEmpty)}

    def forward(self, preds, target, prefix: str = "", suffix: str = ""):
        """As nequip's; an absent dataset's component is an exact 0 (NaN in
        ``metrics_values_step``)."""
        out = super().forward(preds, target, prefix=prefix, suffix=suffix)
        for name, metric in self._per_dataset().items():
            if metric.empty_step:
                self.metrics_values_step[name] = math.nan
        return out

    def compute(self, prefix: str = "", suffix: str = ""):
        """As nequip's; a per-dataset component without data this epoch is NaN and is
        left out of ``weighted_sum``."""
        out = super().compute(prefix=prefix, suffix=suffix)
        unseen = [n for n, m in self._per_dataset().items() if not _seen_anywhere(m)]
        if self.do_weighted_sum and unseen:
            total = 0.0
            for name, entry in self.entries.items():
                if entry.coeff is not None and name not in unseen:
                    total = total + out[f"{prefix}{name}{suffix}"] * entry.coeff
            out[f"{prefix}weighted_sum{suffix}"] = torch.as_tensor(total, dtype=torch.float64)
        return out


def _seen_anywhere(metric: _ZeroWhenEmpty) -> bool:
    seen = metric.seen
    if several_ranks():
        flag = torch.tensor([int(seen)], dtype=torch.long)
        if torch.distributed.get_backend() == "nccl":
            flag = flag.cuda()
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        seen = bool(flag.item())
    return seen
