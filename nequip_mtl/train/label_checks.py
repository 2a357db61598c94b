"""Check, before training, that the labels each loss component reads are there and finite.

Two failures this catches early, with a message that names the cause:

- **a label a dataset lacks**: e.g. an energy-only dataset with a forces loss
  component. The error names the component, the dataset and the field. A per-dataset
  component built with ``ignore_missing`` (:func:`~nequip_mtl.train.PerDatasetLoss`) skips
  such a dataset instead.
- **non-finite labels**: e.g. forces that are NaN in every frame. With nequip's
  usual ``CommonDataStatisticsManager`` they also make the forces RMS, hence the model's
  per-type scale, NaN, so *every* output and every task gradient is NaN and the first
  component checked (``per_atom_energy_mse``) gets the blame. The error names the field
  and how many frames are affected, unless the component masks them (``ignore_nan``).

And one silent waste it warns about (:class:`UnusedLabelWarning`, once per dataset and
field): **a label no loss component trains on**, e.g. periodic frames with stress labels
and a loss of energy and forces only, so that the deployed model's stress is never fitted.
The warning names the dataset, the field, how many frames hold it and the config key that
trains it (see :func:`unused_labels`).

:func:`check_training_labels` scans a training dataset once (one ``dataset[i]`` per frame,
transforms included: about the cost of nequip's statistics pass). The gradient-aggregation
modules call :func:`check_module_labels` from ``on_fit_start``; with nequip's own
``NequIPLightningModule`` add the :class:`~nequip_mtl.train.callbacks.CheckTrainingLabels`
callback. :func:`nonfinite_model_state` names the non-finite parameters and buffers of a
model, for the message when every task gradient is non-finite.

Pure torch (no Lightning).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from nequip.data import AtomicDataDict

from ..data.keys import DATASET_INDEX_KEY
from ..distributed import rank
from .dataset_modifier import DatasetModifier, label_key

__all__ = [
    "LabelRequirement",
    "LabelCounts",
    "UnusedLabel",
    "UnusedLabelWarning",
    "HELD_LABELS",
    "label_requirements",
    "scan_labels",
    "unused_labels",
    "check_training_labels",
    "check_module_labels",
    "nonfinite_model_state",
]


@dataclasses.dataclass(frozen=True)
class LabelRequirement:
    """A label one loss component reads.

    Attributes:
        component: the component's name
        field: the label it reads (``forces``, ``total_energy``, ...)
        dataset_index: the dataset it is restricted to (``None``: every frame)
        dataset: that dataset's name (``None`` for all)
        ignore_nan: it masks NaN labels
        ignore_missing: it may skip a dataset without that label
        coeff: its coefficient in the loss (``None``: computed, not trained)
    """

    component: str
    field: str
    dataset_index: int | None
    dataset: str | None
    ignore_nan: bool
    ignore_missing: bool
    coeff: float | None = None

    @property
    def trains(self) -> bool:
        """Whether the component trains on its label (a positive coefficient)."""
        return self.coeff is not None and self.coeff > 0


#: The labels whose presence :func:`scan_labels` counts, so that one no loss component
#: trains on is reported (:func:`unused_labels`); ``True``: counted on frames with a
#: periodic cell only (a stress or virial of a frame without one is not a label to fit).
HELD_LABELS: dict[str, bool] = {
    AtomicDataDict.TOTAL_ENERGY_KEY: False,
    AtomicDataDict.FORCE_KEY: False,
    AtomicDataDict.STRESS_KEY: True,
    AtomicDataDict.VIRIAL_KEY: True,
}


class UnusedLabelWarning(UserWarning):
    """The training frames hold a label that no loss component trains on."""


@dataclasses.dataclass(frozen=True)
class UnusedLabel:
    """A label some training frames of one dataset hold and no loss component trains on.

    Attributes:
        dataset_index: the dataset (``None``: frames without a ``dataset_index``)
        dataset: its name (``None`` if unknown)
        field: the label
        frames: how many of its training frames hold a finite value of it (periodic
            frames only for stress and virial, see :data:`HELD_LABELS`)
        total: its training frames
        untrained: the loss components that read it for that dataset without training on
            it (coefficient ``0`` or ``null``)
    """

    dataset_index: int | None
    dataset: str | None
    field: str
    frames: int
    total: int
    untrained: tuple[str, ...] = ()


@dataclasses.dataclass
class LabelCounts:
    """Frames of one dataset, and how many lack a label, have non-finite values in it, or
    (among those) infinite ones; and how many hold a finite value of each of
    :data:`HELD_LABELS` (``held``)."""

    frames: int = 0
    missing: dict[str, int] = dataclasses.field(default_factory=dict)
    nonfinite: dict[str, int] = dataclasses.field(default_factory=dict)
    infinite: dict[str, int] = dataclasses.field(default_factory=dict)
    held: dict[str, int] = dataclasses.field(default_factory=dict)


def label_requirements(manager: Any) -> list[LabelRequirement]:
    """The labels a loss ``MetricsManager`` reads (components with ``field: null`` read the
    whole data dict and are not listed)."""
    out = []
    for name, entry in manager.entries.items():
        field = entry.field
        if field is None:
            continue
        per = field if isinstance(field, DatasetModifier) else None
        out.append(
            LabelRequirement(
                component=name,
                field=label_key(field),
                dataset_index=None if per is None else per.dataset_index,
                dataset=None if per is None else per.dataset,
                ignore_nan=bool(entry.ignore_nan),
                ignore_missing=per is not None and per.missing_ok,
                coeff=None if entry.coeff is None else float(entry.coeff),
            )
        )
    return out


def _frame_index(frame: Mapping[str, Any]) -> int | None:
    if DATASET_INDEX_KEY not in frame:
        return None
    return int(torch.as_tensor(frame[DATASET_INDEX_KEY]).reshape(-1)[0])


def _periodic(frame: Mapping[str, Any]) -> bool:
    """A frame with a cell and periodic boundaries along at least one axis."""
    if AtomicDataDict.CELL_KEY not in frame or AtomicDataDict.PBC_KEY not in frame:
        return False
    return bool(torch.as_tensor(frame[AtomicDataDict.PBC_KEY]).any())


def _finite(frame: Mapping[str, Any], field: str) -> bool:
    return field in frame and bool(torch.isfinite(torch.as_tensor(frame[field])).all())


def scan_labels(dataset: Any, fields: Sequence[str]) -> dict[int | None, LabelCounts]:
    """Count, per dataset index (``None`` for frames without one), the frames that lack
    each of ``fields``, have a non-finite value in it, or an infinite one; and the frames
    that hold a finite value of each of :data:`HELD_LABELS`."""
    counts: dict[int | None, LabelCounts] = {}
    fields = list(dict.fromkeys(fields))
    for i in range(len(dataset)):
        frame = dataset[i]
        c = counts.setdefault(_frame_index(frame), LabelCounts())
        c.frames += 1
        periodic = None
        for f, periodic_only in HELD_LABELS.items():
            if periodic_only and periodic is None:
                periodic = _periodic(frame)
            if (periodic or not periodic_only) and _finite(frame, f):
                c.held[f] = c.held.get(f, 0) + 1
        for f in fields:
            if f not in frame:
                c.missing[f] = c.missing.get(f, 0) + 1
                continue
            value = torch.as_tensor(frame[f])
            if not bool(torch.isfinite(value).all()):
                c.nonfinite[f] = c.nonfinite.get(f, 0) + 1
                if bool(torch.isinf(value).any()):
                    c.infinite[f] = c.infinite.get(f, 0) + 1
    return counts


def _where(index: int | None, names: Mapping[int, str]) -> str:
    if index is None:
        return "the training data"
    return f"training dataset {names.get(index, str(index))!r}"


def unused_labels(
    reqs: Sequence[LabelRequirement],
    counts: Mapping[int | None, LabelCounts],
    names: Mapping[int, str] | None = None,
) -> list[UnusedLabel]:
    """The labels (of :data:`HELD_LABELS`) that some training frames of a dataset hold and
    that no component of ``reqs`` trains on for that dataset (none reads it, or those
    that do have a coefficient of ``0`` or ``null``), by dataset index (frames without one
    last), then in the order of :data:`HELD_LABELS`.

    A component without a dataset (nequip's own loss components) trains on every
    dataset's frames; a per-dataset one on its dataset's only.
    """
    names = dict(names or {})
    out = []
    for k in sorted(counts, key=lambda k: (k is None, k or 0)):
        c = counts[k]
        for f in HELD_LABELS:
            n = c.held.get(f, 0)
            reading = [r for r in reqs if r.field == f and r.dataset_index in (None, k)]
            if n == 0 or any(r.trains for r in reading):
                continue
            out.append(
                UnusedLabel(
                    dataset_index=k,
                    dataset=None if k is None else names.get(k),
                    field=f,
                    frames=n,
                    total=c.frames,
                    untrained=tuple(r.component for r in reading),
                )
            )
    return out


#: the coefficient keys of ``PerDatasetLoss`` (``coeffs.<dataset>.<key>``)
_PER_DATASET_KEYS = (
    AtomicDataDict.TOTAL_ENERGY_KEY,
    AtomicDataDict.FORCE_KEY,
    AtomicDataDict.STRESS_KEY,
)


def _unused_message(u: UnusedLabel, per_dataset: bool) -> str:
    where = _where(u.dataset_index, {} if u.dataset is None else {u.dataset_index: u.dataset})
    periodic = " with a periodic cell" if HELD_LABELS.get(u.field) else ""
    how = (
        f" (read by {', '.join(repr(n) for n in u.untrained)} with a coefficient of 0 or null)"
        if u.untrained
        else ""
    )
    if per_dataset and u.dataset is not None and u.field in _PER_DATASET_KEYS:
        fix = (
            f"give it a positive coefficient, `training_module.loss.coeffs.{u.dataset}."
            f"{u.field}` (nequip_mtl.train.PerDatasetLoss)"
        )
    elif per_dataset:
        fix = (
            f"add a component on `{u.field}` to `training_module.loss` "
            "(nequip_mtl.train.PerDatasetLoss trains total_energy, forces and stress, "
            "`coeffs.<dataset>.<field>`)"
        )
    else:
        fix = (
            f"add a component on `{u.field}` with a positive `coeff` to "
            "`training_module.loss` (e.g. nequip.train.EnergyForceStressLoss for energy, "
            "forces and stress)"
        )
    return (
        f"{where}: {u.frames} of {u.total} training frames{periodic} hold `{u.field}` "
        f"labels, but no loss component trains on them{how}, so the model's `{u.field}` "
        f"is never fitted to them. To train it, {fix}; if that is intended, ignore this "
        "warning."
    )


def check_training_labels(
    manager: Any, dataset: Any, dataset_names: Sequence[str] | None = None
) -> dict[int | None, LabelCounts]:
    """Refuse a loss whose components read labels the training data lacks or has non-finite;
    warn about labels the training data holds and no component trains on.

    For every component (see :func:`label_requirements`) and every dataset it reads:

    - the dataset has no finite value of the field in any frame (absent or all NaN): an
      error naming the component, the dataset and the field, unless the component has
      ``ignore_missing`` (it then skips that dataset);
    - some frames have non-finite values: an error naming the field and the number of
      frames affected, unless the component has ``ignore_nan`` (nequip masks NaN labels;
      infinities are always refused).

    Then, from the same scan, an :class:`UnusedLabelWarning` for each dataset and label of
    :data:`HELD_LABELS` its frames hold (stress and virial: frames with a periodic cell)
    that no component trains on (:func:`unused_labels`), naming the dataset, the field,
    the number of frames and the key that trains it (``training_module.loss.coeffs.
    <dataset>.<field>`` for a ``PerDatasetLoss``); on rank 0 only.

    Args:
        manager: the loss ``MetricsManager``
        dataset: the training dataset (frames are ``AtomicDataDict`` dicts, with a
            ``dataset_index`` when several datasets are mixed)
        dataset_names: names of the dataset indices, for messages (default: the names of
            the loss's per-dataset components)

    Returns:
        the counts per dataset index
    """
    reqs = label_requirements(manager)
    counts = scan_labels(dataset, [r.field for r in reqs])
    names: dict[int, str] = dict(enumerate(dataset_names or ()))
    for r in reqs:
        if r.dataset_index is not None:
            names.setdefault(r.dataset_index, r.dataset)
    problems = []
    for r in reqs:
        targets = (
            [r.dataset_index]
            if r.dataset_index is not None
            else [k for k in counts]  # a plain component reads every dataset
        )
        for k in targets:
            c = counts.get(k)
            if c is None:
                if r.dataset_index is not None and None in counts:
                    problems.append(
                        f"loss component {r.component!r} keeps the frames of dataset "
                        f"{r.dataset!r}, but the training frames carry no `{DATASET_INDEX_KEY}`:"
                        " use nequip_mtl.data.MultiDatasetDataModule as the data module"
                    )
                continue  # no frames of that dataset: nothing to check
            where = _where(k, names)
            bad = c.missing.get(r.field, 0)
            nonfinite = c.nonfinite.get(r.field, 0)
            infinite = c.infinite.get(r.field, 0)
            if infinite and (r.ignore_nan or r.ignore_missing):
                # nequip's `ignore_nan` masks NaN only: an infinite label is an infinite loss
                problems.append(
                    f"loss component {r.component!r}: the label `{r.field}` is infinite in "
                    f"{infinite} of {c.frames} frames of {where}; `ignore_nan` masks NaN "
                    "labels only: fix the data"
                )
                continue
            if bad + nonfinite == c.frames:  # not one finite value: the dataset lacks it
                if r.ignore_missing:
                    continue
                how = (
                    "absent"
                    if bad == c.frames
                    else "non-finite (NaN/inf)"
                    if nonfinite == c.frames
                    else "absent or non-finite"
                )
                fix = (
                    "Fix the data or remove the component"
                    if r.dataset_index is None and k is None
                    else "Fix the data, remove the component, or let it skip that dataset "
                    "(`ignore_missing` of nequip_mtl.train.PerDatasetLoss)"
                )
                problems.append(
                    f"loss component {r.component!r} needs the label `{r.field}`, which "
                    f"{where} lacks: {how} in all {c.frames} of {c.frames} frames. {fix}"
                )
                continue
            if bad:
                problems.append(
                    f"loss component {r.component!r} needs the label `{r.field}`, which is "
                    f"absent from {bad} of {c.frames} frames of {where}"
                )
            if nonfinite and not r.ignore_nan:
                problems.append(
                    f"loss component {r.component!r}: the label `{r.field}` is non-finite "
                    f"(NaN/inf) in {nonfinite} of {c.frames} frames of {where}; fix the data, "
                    "or set `ignore_nan: true` for that component to mask NaN labels"
                )
    if problems:
        raise ValueError(
            "the training labels do not fit the loss (`training_module.loss`):\n- "
            + "\n- ".join(dict.fromkeys(problems))
        )
    if rank() == 0:
        per_dataset = any(r.dataset_index is not None for r in reqs)
        for u in unused_labels(reqs, counts, names):
            warnings.warn(_unused_message(u, per_dataset), UnusedLabelWarning, stacklevel=2)
    return counts


def check_module_labels(module: Any) -> dict[int | None, LabelCounts] | None:
    """:func:`check_training_labels` for a training module's ``loss`` and its trainer's
    data module's ``train_dataset`` (nothing to check, ``None``, without either).

    Call it from ``on_fit_start`` (the data module is set up, no step has run yet).
    """
    manager = getattr(module, "loss", None)
    trainer = getattr(module, "_trainer", None)
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    dataset = getattr(datamodule, "train_dataset", None)
    if manager is None or not hasattr(manager, "entries") or dataset is None:
        return None
    if isinstance(dataset, Sequence):  # NequIPDataModule keeps a list of datasets
        dataset = torch.utils.data.ConcatDataset(list(dataset)) if len(dataset) else []
    names = getattr(datamodule, "datasets", None)
    names = list(names) if isinstance(names, Mapping) else None
    return check_training_labels(manager, dataset, names)


def nonfinite_model_state(model: torch.nn.Module) -> list[str]:
    """Names of the model's parameters and buffers with a NaN or infinite entry.

    For the message when every task gradient is non-finite: a non-finite per-type scale
    (e.g. from NaN forces in nequip's ``forces_rms`` statistic) makes every output NaN,
    whatever the loss component.

    Returns:
        ``["<name> (parameter|buffer, k of n entries non-finite)", ...]``; empty if all
        are finite
    """
    out = []
    for kind, items in (
        ("parameter", model.named_parameters()),
        ("buffer", model.named_buffers()),
    ):
        for name, t in items:
            if t is None or not (t.is_floating_point() or t.is_complex()):
                continue
            bad = int((~torch.isfinite(t.detach())).sum())
            if bad:
                out.append(f"{name} ({kind}, {bad} of {t.numel()} entries non-finite)")
    return out
