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
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..data.keys import DATASET_INDEX_KEY
from .dataset_modifier import DatasetModifier, label_key

__all__ = [
    "LabelRequirement",
    "LabelCounts",
    "label_requirements",
    "scan_labels",
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
    """

    component: str
    field: str
    dataset_index: int | None
    dataset: str | None
    ignore_nan: bool
    ignore_missing: bool


@dataclasses.dataclass
class LabelCounts:
    """Frames of one dataset, and how many lack a label, have non-finite values in it, or
    (among those) infinite ones."""

    frames: int = 0
    missing: dict[str, int] = dataclasses.field(default_factory=dict)
    nonfinite: dict[str, int] = dataclasses.field(default_factory=dict)
    infinite: dict[str, int] = dataclasses.field(default_factory=dict)


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
            )
        )
    return out


def _frame_index(frame: Mapping[str, Any]) -> int | None:
    if DATASET_INDEX_KEY not in frame:
        return None
    return int(torch.as_tensor(frame[DATASET_INDEX_KEY]).reshape(-1)[0])


def scan_labels(dataset: Any, fields: Sequence[str]) -> dict[int | None, LabelCounts]:
    """Count, per dataset index (``None`` for frames without one), the frames that lack
    each field, have a non-finite value in it, or an infinite one."""
    counts: dict[int | None, LabelCounts] = {}
    fields = list(dict.fromkeys(fields))
    for i in range(len(dataset)):
        frame = dataset[i]
        c = counts.setdefault(_frame_index(frame), LabelCounts())
        c.frames += 1
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


def check_training_labels(
    manager: Any, dataset: Any, dataset_names: Sequence[str] | None = None
) -> dict[int | None, LabelCounts]:
    """Refuse a loss whose components read labels the training data lacks or has non-finite.

    For every component (see :func:`label_requirements`) and every dataset it reads:

    - the dataset has no finite value of the field in any frame (absent or all NaN): an
      error naming the component, the dataset and the field, unless the component has
      ``ignore_missing`` (it then skips that dataset);
    - some frames have non-finite values: an error naming the field and the number of
      frames affected, unless the component has ``ignore_nan`` (nequip masks NaN labels;
      infinities are always refused).

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
