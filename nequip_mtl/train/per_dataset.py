"""Per-dataset loss components and metrics: ``pretrain/forces_mse``, ``new/forces_mse``, ...

When a batch mixes the frames of several training datasets (each frame carries its
dataset's position in the integer per-frame field
:data:`nequip_mtl.data.keys.DATASET_INDEX_KEY`), a per-dataset component is nequip's usual
metric restricted to one dataset's frames (and their atoms, for per-atom fields):

- :class:`DatasetModifier` is a nequip field modifier that keeps one dataset's part of a
  field (frames for per-frame fields such as energies and stresses, atoms for per-atom
  fields such as forces, edges for per-edge fields);
- :class:`PerDatasetMetricsManager` is a :class:`~nequip_mtl.train.MultitaskMetricsManager`
  in which a component whose ``field`` is a :class:`DatasetModifier` handles a batch
  *without* that dataset (see below);
- :func:`PerDatasetLoss` and :func:`PerDatasetMetrics` expand nequip's usual energy /
  forces / stress components per dataset, named ``<dataset>/<component>``.

**A dataset absent from a batch.** nequip's metrics return a constant NaN for an empty
selection; in a weighted sum that NaN would end the run. Here the component's step value
is instead an exact ``0`` that is connected to the model output with an exactly zero
gradient. So:

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
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from nequip.data import AtomicDataDict, BaseModifier, PerAtomModifier
from nequip.train import MeanAbsoluteError, MeanSquaredError, RootMeanSquaredError

from ..data.binding import unknown_dataset_message
from ..data.keys import DATASET_INDEX_KEY
from ..distributed import several_ranks
from .coefficients import validate_coeffs
from .metrics_manager import MultitaskMetricsManager
from .sub_batches import dataset_part

__all__ = [
    "DatasetModifier",
    "PerDatasetMetricsManager",
    "PerDatasetLoss",
    "PerDatasetMetrics",
    "label_key",
]


def label_key(field: BaseModifier) -> str:
    """The label (target field) a nequip field modifier reads."""
    if isinstance(field, DatasetModifier):
        return label_key(field.inner)
    return getattr(field, "target_field", field.field)


class DatasetModifier(BaseModifier):
    """Keep one training dataset's part of a field (a nequip field modifier).

    For a per-frame field (``total_energy``, ``stress``, or a
    :class:`~nequip.data.PerAtomModifier`) the frames whose
    ``dataset_index`` equals ``dataset_index`` are kept; for a per-atom field (``forces``)
    the atoms of those frames; for a per-edge field the edges starting at those atoms. The
    dataset index is read from the labels (the second data dict), where nequip always keeps
    it.

    .. code-block:: yaml

        # one entry of a PerDatasetMetricsManager's `metrics`
        - name: new/forces_mse
          field:
            _target_: nequip_mtl.train.DatasetModifier
            field: forces
            dataset: new          # the data module's dataset `new`, bound by name
          coeff: 1.0
          metric:
            _target_: nequip.train.MeanSquaredError

    **Bound by name.** A modifier with a ``dataset`` name reads that dataset's frames,
    wherever it stands in the data module's ``datasets``: when a trainer sets up
    :class:`~nequip_mtl.data.MultiDatasetDataModule`, the manager holding the modifier
    resolves the name to its position (:meth:`bind`), and a name the data module lacks is
    refused there. ``dataset_index`` is used as given only without a ``dataset`` name, or
    outside a trainer before any binding.

    Args:
        field (str or BaseModifier): the field, or a nequip modifier of it
        dataset_index (int, optional): the dataset's position in the data module's
            ``datasets`` (a name's position is taken from the data module at setup)
        dataset (str, optional): the dataset's name (the default: ``str(dataset_index)``,
            bound to nothing)
        missing_ok (bool): when the labels have no such field at all, give an empty
            selection instead of an error (default ``False``; see ``ignore_missing`` of
            :func:`PerDatasetLoss`)
    """

    def __init__(
        self,
        field: str | BaseModifier,
        dataset_index: int | None = None,
        dataset: str | None = None,
        missing_ok: bool = False,
    ) -> None:
        inner = BaseModifier(field) if isinstance(field, str) else field
        if not isinstance(inner, BaseModifier):
            raise TypeError(
                f"DatasetModifier.field must be a field name or a nequip field modifier, "
                f"got {field!r}"
            )
        if dataset_index is None and dataset is None:
            raise ValueError("DatasetModifier needs a `dataset` name (or a `dataset_index`)")
        if dataset_index is not None:
            if isinstance(dataset_index, bool) or not isinstance(dataset_index, int):
                raise TypeError(
                    f"DatasetModifier.dataset_index must be an int, got {dataset_index!r}"
                )
            if dataset_index < 0:
                raise ValueError(f"DatasetModifier.dataset_index must be >= 0, got {dataset_index}")
        super().__init__(inner.field)
        self.inner = inner
        self.dataset_index = dataset_index
        #: the name binds; without one the modifier keeps its index
        self.named = dataset is not None
        self.dataset = str(dataset_index) if dataset is None else str(dataset)
        self.missing_ok = bool(missing_ok)

    def bind(self, names: Sequence[str]) -> bool:
        """Read the frames of the data module's dataset of this modifier's name: its
        position in ``names`` (the data module's datasets). ``False`` if ``names`` lacks it
        (a modifier without a name keeps its index and is always bound)."""
        if not self.named:
            return True
        if self.dataset not in names:
            return False
        self.dataset_index = list(names).index(self.dataset)
        return True

    @property
    def type(self) -> str:
        return self.inner.type

    def __str__(self) -> str:
        return f"{self.dataset}/{self.inner}"

    def _mask(self, data: AtomicDataDict.Type) -> torch.Tensor:
        if DATASET_INDEX_KEY not in data:
            raise KeyError(
                f"the loss/metric component {self} keeps the frames of dataset "
                f"{self.dataset!r}, but the batch has no `{DATASET_INDEX_KEY}` field: use "
                "nequip_mtl.data.MultiDatasetDataModule (whose frames carry it) as the data module"
            )
        if self.dataset_index is None:
            raise RuntimeError(
                f"the loss/metric component {self} keeps the frames of dataset "
                f"{self.dataset!r}, but no data module has bound that name to a dataset: "
                "train with nequip_mtl.data.MultiDatasetDataModule, or call the manager's "
                "`bind_datasets(names)` first"
            )
        frames = data[DATASET_INDEX_KEY].reshape(-1) == self.dataset_index
        kind = self.type
        if kind == "graph":
            return frames
        if AtomicDataDict.BATCH_KEY in data:
            atoms = frames[data[AtomicDataDict.BATCH_KEY]]
        else:  # an unbatched single frame
            num = data[AtomicDataDict.POSITIONS_KEY].shape[0]
            atoms = frames[:1].expand(num)
        if kind == "node":
            return atoms
        if kind == "edge":
            return atoms[data[AtomicDataDict.EDGE_INDEX_KEY][0]]
        raise ValueError(f"DatasetModifier: unsupported field type {kind!r} of {self.inner}")

    def __call__(self, data1: AtomicDataDict.Type, data2: AtomicDataDict.Type | None = None):
        # which graph the selection reaches is the sub-batch contract's (dataset_part)
        if data2 is None:
            return dataset_part(self.inner, data1, self.dataset_index, self._mask(data1))
        mask = self._mask(data2)
        if self.missing_ok and label_key(self.inner) not in data2:
            empty = dataset_part(self.inner, data1, None, torch.zeros_like(mask))
            return empty, empty.detach()
        target = self.inner(data1, data2)[1]
        return dataset_part(self.inner, data1, self.dataset_index, mask), target[mask]


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


# ------------------------------------------------------------------ the user-facing wrappers

#: ``coeffs`` key -> (component suffix, label field)
_LOSS_KEYS = {
    "total_energy": AtomicDataDict.TOTAL_ENERGY_KEY,
    "forces": AtomicDataDict.FORCE_KEY,
    "stress": AtomicDataDict.STRESS_KEY,
}


def _check_datasets(datasets: Any, who: str) -> list[str]:
    if isinstance(datasets, str) or not isinstance(datasets, Sequence) or not datasets:
        raise ValueError(
            f"{who}: `datasets` must be a non-empty list of dataset names (the data module's), "
            f"got {datasets!r}"
        )
    names = [str(d) for d in datasets]
    for d in names:
        if not d or "/" in d or "." in d:
            raise ValueError(
                f"{who}: dataset name {d!r} in `datasets` must be non-empty and contain no "
                "'/' or '.'"
            )
    dupes = sorted({d for d in names if names.count(d) > 1})
    if dupes:
        raise ValueError(f"{who}: `datasets` has duplicate names {dupes}")
    return names


def _per_dataset(
    value: Any, datasets: list[str], allowed: Sequence[str], key: str, who: str
) -> dict[str, dict[str, Any]]:
    """``{component: x}`` for every dataset, or ``{dataset: {component: x}}``."""
    if value is None:
        return {d: {} for d in datasets}
    if not isinstance(value, Mapping):
        raise TypeError(f"{who}: `{key}` must be a mapping, got {value!r}")
    keys = list(value)
    if keys and all(k in allowed for k in keys):
        return {d: dict(value) for d in datasets}
    unknown = [k for k in keys if k not in datasets]
    if unknown:
        raise ValueError(
            f"{who}: `{key}` must map either components {list(allowed)} (the same for every "
            f"dataset) or dataset names {datasets} to such a mapping; unknown keys: {unknown}"
        )
    out = {}
    for d in datasets:
        sub = value.get(d, {})
        if not isinstance(sub, Mapping):
            raise TypeError(f"{who}: `{key}.{d}` must be a mapping, got {sub!r}")
        bad = [k for k in sub if k not in allowed]
        if bad:
            raise ValueError(
                f"{who}: `{key}.{d}` has unknown keys {bad}; valid keys are {list(allowed)}"
            )
        out[d] = dict(sub)
    return out


def _flags(value: Any, datasets: list[str], key: str, who: str) -> dict[str, dict[str, bool]]:
    """``ignore_nan``/``ignore_missing``: a bool, ``{component: bool}`` or per dataset."""
    if isinstance(value, bool):
        return {d: dict.fromkeys(_LOSS_KEYS, value) for d in datasets}
    flags = _per_dataset(value, datasets, tuple(_LOSS_KEYS), key, who)
    for d, sub in flags.items():
        for k, v in sub.items():
            if not isinstance(v, bool):
                raise TypeError(f"{who}: `{key}` values must be true/false, got {d}.{k}: {v!r}")
    return flags


def _expand(
    who: str,
    datasets: Any,
    coeffs: Any,
    components: Mapping[str, Sequence[tuple[str, Any]]],
    per_atom_energy: bool,
    ignore_nan: Any,
    ignore_missing: Any,
) -> list[dict[str, Any]]:
    """The per-dataset metric entries. ``components`` maps a ``coeffs`` key to its
    ``(metric name, metric class)`` pairs; the first pair of each key gets the coefficient."""
    names = _check_datasets(datasets, who)
    per = _per_dataset(coeffs, names, tuple(components), "coeffs", who)
    nan = _flags(ignore_nan, names, "ignore_nan", who)
    missing = _flags(ignore_missing, names, "ignore_missing", who)
    entries = []
    for index, d in enumerate(names):
        if not per[d]:
            raise ValueError(
                f"{who}: dataset {d!r} has no components in `coeffs`; give it at least one of "
                f"{list(components)}"
            )
        for key, value in per[d].items():
            where = f"{who}: `coeffs` of dataset {d!r}"
            value = validate_coeffs([key], {key: value}, where)[key]
            field_key = _LOSS_KEYS[key]
            energy = field_key == AtomicDataDict.TOTAL_ENERGY_KEY
            inner = PerAtomModifier(field_key) if energy and per_atom_energy else field_key
            prefix = "per_atom_energy" if energy and per_atom_energy else field_key
            skip = missing[d].get(key, False)
            for j, (kind, metric_cls) in enumerate(components[key]):
                entries.append(
                    {
                        "name": f"{d}/{prefix}_{kind}",
                        "field": DatasetModifier(inner, index, dataset=d, missing_ok=skip),
                        "coeff": value if j == 0 else None,
                        "metric": metric_cls(),
                        # ignore_missing also masks the NaN-filled labels of a dataset
                        # without that field (what a mixed batch of it holds)
                        "ignore_nan": nan[d].get(key, False) or skip,
                    }
                )
    return entries


def PerDatasetLoss(
    datasets: Sequence[str],
    coeffs: Mapping[str, Any] | None = None,
    per_atom_energy: bool = True,
    ignore_nan: bool | Mapping[str, Any] = False,
    ignore_missing: bool | Mapping[str, Any] = False,
    type_names: list[str] | None = None,
    extra_metrics: list[dict[str, Any]] | None = None,
) -> PerDatasetMetricsManager:
    """nequip's energy/forces/stress MSE loss, one set of components per training dataset.

    Components are named ``<dataset>/per_atom_energy_mse`` (or ``total_energy_mse``),
    ``<dataset>/forces_mse`` and ``<dataset>/stress_mse``; each is the MSE over that
    dataset's frames (atoms, for forces) in the batch, with its own coefficient. These
    names are what coefficient callbacks (``LossCoefficientScheduler``, ``SoftAdapt``, ...)
    and the gradient-aggregation modules (one task per component) use. A dataset absent
    from a batch contributes an exact 0 with a zero gradient (see
    :mod:`nequip_mtl.train.per_dataset`).

    ``coeffs`` is either one mapping for every dataset, with nequip's keys
    ``total_energy``, ``forces``, ``stress`` (a key left out means no such component; a
    ``null`` value computes it without training on it), or a mapping from dataset name to
    such a mapping. ``ignore_nan`` and ``ignore_missing`` take ``true``/``false``, a
    ``{key: bool}`` mapping, or one per dataset.

    The training labels are checked when training starts
    (:func:`nequip_mtl.train.label_checks.check_training_labels`): a component whose
    dataset has no such label at all is refused, naming the dataset and the field, unless
    ``ignore_missing`` is set for it (then the component skips that dataset: it is always
    0 and never trains); a dataset with some NaN labels is refused unless ``ignore_nan`` is
    set for it (nequip's masking of NaN labels); infinite labels are always refused.

    .. code-block:: yaml

        training_module:
          _target_: nequip_mtl.train.MultitaskLightningModule
          loss:
            _target_: nequip_mtl.train.PerDatasetLoss
            datasets: [pretrain, new]      # the data module's `datasets`, bound by name
            coeffs:
              pretrain: {total_energy: 1.0, forces: 1.0}
              new: {total_energy: 1.0, forces: 1.0, stress: 1.0}
            # per_atom_energy: true
            # ignore_nan: {new: {stress: true}}    # some `new` frames have NaN stresses
            # ignore_missing: {pretrain: {forces: true}}

    Args:
        datasets (list of str): the training datasets' names, in any order: each is bound by
            name to the data module's dataset of that name when training starts (a name the
            data module lacks, or a training dataset missing here, is refused)
        coeffs (dict): the components and their coefficients (default: energy and forces,
            1:1, for every dataset)
        per_atom_energy (bool): normalise the energy by the number of atoms (default ``True``)
        ignore_nan (bool or dict): mask NaN labels (nequip's ``ignore_nan``)
        ignore_missing (bool or dict): let a component skip a dataset that lacks its label
        extra_metrics (list of dict, optional): further metric entries
    """
    if coeffs is None:
        coeffs = {"total_energy": 1.0, "forces": 1.0}
    components = {k: [("mse", MeanSquaredError)] for k in _LOSS_KEYS}
    entries = _expand(
        "PerDatasetLoss",
        datasets,
        coeffs,
        components,
        per_atom_energy,
        ignore_nan,
        ignore_missing,
    )
    if not any(e["coeff"] for e in entries):
        raise ValueError(
            f"PerDatasetLoss: at least one coefficient in `coeffs` must be positive, got {coeffs}"
        )
    return _named(
        PerDatasetMetricsManager([*entries, *(extra_metrics or [])], type_names=type_names)
    )


def _named(manager: PerDatasetMetricsManager) -> PerDatasetMetricsManager:
    manager.datasets_key = "datasets"
    return manager


def PerDatasetMetrics(
    datasets: Sequence[str],
    fields: Sequence[str] | Mapping[str, Sequence[str]] = ("total_energy", "forces"),
    per_atom_energy: bool = True,
    ignore_nan: bool | Mapping[str, Any] = False,
    ignore_missing: bool | Mapping[str, Any] = False,
    type_names: list[str] | None = None,
    extra_metrics: list[dict[str, Any]] | None = None,
) -> PerDatasetMetricsManager:
    """MAE and RMSE per training dataset: ``<dataset>/forces_mae``, ``<dataset>/forces_rmse``, ...

    For ``train_metrics``/``val_metrics``/``test_metrics``. ``fields`` lists
    ``total_energy``, ``forces``, ``stress`` for every dataset, or per dataset. The energy
    metrics are per atom unless ``per_atom_energy: false``. The ``weighted_sum`` is the
    mean of the RMSEs (each with coefficient 1), leaving out a dataset without frames in
    that epoch (its metrics are NaN).

    .. code-block:: yaml

        training_module:
          val_metrics:
            _target_: nequip_mtl.train.PerDatasetMetrics
            datasets: [pretrain, new]
            fields: [total_energy, forces]   # or {pretrain: [...], new: [...]}

    Args:
        datasets (list of str): as for :func:`PerDatasetLoss`
        fields (list or dict): the fields (default energy and forces)
        per_atom_energy (bool): per-atom energies (default ``True``)
        ignore_nan (bool or dict): as for :func:`PerDatasetLoss`
        ignore_missing (bool or dict): as for :func:`PerDatasetLoss`
        extra_metrics (list of dict, optional): further metric entries
    """
    names = _check_datasets(datasets, "PerDatasetMetrics")
    if isinstance(fields, Mapping):
        coeffs = {d: dict.fromkeys(fields.get(d, ()), 1.0) for d in names}
    else:
        coeffs = {d: dict.fromkeys(fields, 1.0) for d in names}
    components = {
        k: [("rmse", RootMeanSquaredError), ("mae", MeanAbsoluteError)] for k in _LOSS_KEYS
    }
    try:
        entries = _expand(
            "PerDatasetMetrics",
            names,
            coeffs,
            components,
            per_atom_energy,
            ignore_nan,
            ignore_missing,
        )
    except ValueError as err:
        raise ValueError(str(err).replace("`coeffs`", "`fields`")) from None
    return _named(
        PerDatasetMetricsManager([*entries, *(extra_metrics or [])], type_names=type_names)
    )
