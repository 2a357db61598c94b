"""Metric names as nequip and nequip-mtl log them, and their physical units.

nequip names a metric ``<field>_<kind>`` (``forces_mse``, ``per_atom_energy_mae``,
``stress_rmse``; per-type metrics append ``_<type name>``) and logs it under a prefix:
``train_loss_step/``, ``train_loss_epoch/``, ``train_metric_epoch/``, ``val<k>_epoch/``,
``test<k>_epoch/``. Energies are in eV (per atom for ``per_atom_energy``), forces in
eV/Å and stresses in eV/Å³ (the units of the data; nequip does not convert); an MSE is
in squared units.
"""

from __future__ import annotations

import dataclasses
import re

__all__ = ["MetricName", "parse_metric", "unit", "quantity_label", "axis_label", "KINDS"]

#: metric kind -> (display name, power of the field's unit)
KINDS: dict[str, tuple[str, int]] = {
    "mae": ("MAE", 1),
    "rmse": ("RMSE", 1),
    "mse": ("MSE", 2),
    "maxabserr": ("max abs. error", 1),
    "huber": ("Huber loss", 2),
    "l1": ("L1", 1),
}

FIELD_UNITS: dict[str, str] = {
    "total_energy": "eV",
    "per_atom_energy": "eV/atom",
    "atomic_energy": "eV",
    "energy": "eV",
    "forces": "eV/Å",
    "stress": "eV/Å³",
    "virial": "eV",
}

FIELD_LABELS: dict[str, str] = {
    "total_energy": "total energy",
    "per_atom_energy": "energy per atom",
    "atomic_energy": "atomic energy",
    "forces": "forces",
    "stress": "stress",
    "virial": "virial",
}

_SPLIT = re.compile(
    r"^(?P<split>train_loss|train_metric|val|test)(?P<index>\d*)_(?P<level>step|epoch)$"
)


@dataclasses.dataclass(frozen=True)
class MetricName:
    """A parsed metric name: ``field`` (``forces``), ``kind`` (``mse``; ``None`` if
    unrecognised), ``type_name`` (per-type metrics, else ``None``), ``dataset`` (the
    training dataset of a per-dataset component such as ``new/forces_mse``, else
    ``None``)."""

    name: str
    field: str
    kind: str | None
    type_name: str | None = None
    dataset: str | None = None

    @property
    def power(self) -> int | None:
        return KINDS[self.kind][1] if self.kind in KINDS else None

    @property
    def group(self) -> str:
        """What one color stands for: the field, per dataset (``new/forces``)."""
        return self.field if self.dataset is None else f"{self.dataset}/{self.field}"


def parse_metric(name: str) -> MetricName:
    """Split ``per_atom_energy_mae`` into field ``per_atom_energy`` and kind ``mae``
    (``forces_mae_Cu``: field ``forces``, kind ``mae``, type ``Cu``; ``new/forces_mse``:
    dataset ``new``, field ``forces``, kind ``mse``)."""
    dataset, sep, rest = name.rpartition("/")
    dataset = dataset if sep else None
    tokens = rest.split("_")
    for i in range(len(tokens) - 1, 0, -1):
        if tokens[i] in KINDS:
            field = "_".join(tokens[:i])
            type_name = "_".join(tokens[i + 1 :]) or None
            return MetricName(name, field, tokens[i], type_name, dataset)
    return MetricName(name, name, None)


def split_prefix(key: str) -> tuple[str, int, str] | None:
    """``val0_epoch`` -> ``("val", 0, "epoch")``; ``train_loss_step`` ->
    ``("train_loss", 0, "step")``; anything else -> ``None``."""
    m = _SPLIT.match(key)
    if m is None:
        return None
    return m["split"], int(m["index"] or 0), m["level"]


def unit(field: str, kind: str | None) -> str:
    """Unit string of a metric (``"(eV/Å)²"`` for ``forces`` ``mse``); ``""`` if unknown."""
    base = FIELD_UNITS.get(field)
    if base is None or kind not in KINDS:
        return ""
    power = KINDS[kind][1]
    if power == 1:
        return base
    return f"({base})²" if "/" in base else f"{base}²"


def quantity_label(field: str) -> str:
    return FIELD_LABELS.get(field, field.replace("_", " "))


def axis_label(field: str, kind: str | None) -> str:
    """``"forces MSE [(eV/Å)²]"``."""
    kind_label = KINDS[kind][0] if kind in KINDS else (kind or "value")
    u = unit(field, kind)
    return f"{quantity_label(field)} {kind_label}" + (f" [{u}]" if u else "")
