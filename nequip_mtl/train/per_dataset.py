"""The user-facing per-dataset loss and metrics: ``pretrain/forces_mse``, ``new/forces_mse``, ...

:func:`PerDatasetLoss` and :func:`PerDatasetMetrics` expand nequip's usual energy / forces /
stress components per training dataset, each a :class:`~nequip_mtl.train.DatasetModifier`
entry of a :class:`~nequip_mtl.train.PerDatasetMetricsManager` (what an absent dataset
gives is described there, in :mod:`nequip_mtl.train.per_dataset_manager`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from nequip.data import AtomicDataDict, PerAtomModifier
from nequip.train import MeanAbsoluteError, MeanSquaredError, RootMeanSquaredError

from .coefficients import validate_coeffs
from .dataset_modifier import DatasetModifier, label_key
from .per_dataset_manager import PerDatasetMetricsManager

__all__ = [
    "DatasetModifier",
    "PerDatasetMetricsManager",
    "PerDatasetLoss",
    "PerDatasetMetrics",
    "label_key",
]


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
    :mod:`nequip_mtl.train.per_dataset_manager`).

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
