"""Metric names as nequip and nequip-mtl log them, and their physical units.

nequip names a metric ``<field>_<kind>`` (``forces_mse``, ``per_atom_energy_mae``,
``stress_rmse``; per-type metrics append ``_<type name>``) and logs it under a prefix:
``train_loss_step/``, ``train_loss_epoch/``, ``train_metric_epoch/``, ``val<k>_epoch/``,
``test<k>_epoch/`` (and, from :class:`~nequip_mtl.train.callbacks.DatasetMetricNames`,
``val_<dataset>_epoch/``, ``test_<dataset>_epoch/``). Units are those of the data (nequip
converts none): energies in the energy unit (per atom for ``per_atom_energy``), forces in
energy/length, stresses in energy/length³ (:class:`Units`; eV and Å when nothing says
otherwise); an MSE is in squared units.
"""

from __future__ import annotations

import dataclasses
import re

__all__ = [
    "MetricName",
    "parse_metric",
    "Prefix",
    "parse_prefix",
    "Units",
    "DEFAULT_UNITS",
    "parse_units",
    "unit",
    "quantity_label",
    "axis_label",
    "KINDS",
]

#: metric kind -> (display name, power of the field's unit)
KINDS: dict[str, tuple[str, int]] = {
    "mae": ("MAE", 1),
    "rmse": ("RMSE", 1),
    "mse": ("MSE", 2),
    "maxabserr": ("max abs. error", 1),
    "huber": ("Huber loss", 2),
    "l1": ("L1", 1),
}

#: the unit of each field, from the energy and length units of the data
FIELD_UNITS: dict[str, str] = {
    "total_energy": "{energy}",
    "per_atom_energy": "{energy}/atom",
    "atomic_energy": "{energy}",
    "energy": "{energy}",
    "forces": "{energy}/{length}",
    "stress": "{energy}/{length}³",
    "virial": "{energy}",
}

#: the spellings of Ångström read as ``Å``
_ANGSTROM = {"a", "ang", "angstrom", "ångström", "å"}


@dataclasses.dataclass(frozen=True)
class Units:
    """The energy and length units of a run's data (nequip converts none: the model
    predicts in the units of its training labels). ``source`` says where they come from
    (the run's config, ``--units``); ``None``: nothing said, eV and Å are assumed."""

    energy: str = "eV"
    length: str = "Å"
    source: str | None = None

    @property
    def assumed(self) -> bool:
        return self.source is None

    def of(self, field: str) -> str | None:
        """The unit of ``field`` (``"kcal/mol/Å"`` for ``forces``), ``None`` if unknown."""
        template = FIELD_UNITS.get(field)
        return None if template is None else template.format(**dataclasses.asdict(self))

    def describe(self) -> str:
        """``"kcal/mol and Å (from config.yaml)"``; ``"eV and Å (assumed: ...)"``."""
        where = (
            "assumed: neither the run's config nor --units gives them"
            if self.assumed
            else f"from {self.source}"
        )
        return f"{self.energy} and {self.length} ({where})"


#: eV and Å, assumed (nothing says otherwise)
DEFAULT_UNITS = Units()


def parse_units(spec, source: str = "--units") -> Units:
    """Units from ``spec``: a mapping ``{energy: ..., length: ...}`` (either may be left
    out: eV, Å), a string ``"energy=kcal/mol,length=Å"``, or a bare energy unit
    (``"kcal/mol"``, ``"meV"``: the length is Å). ``A``, ``Angstrom`` are read as ``Å``.

    Raises:
        ValueError: an unknown key, an empty unit or another type
    """
    if isinstance(spec, str):
        text = spec.strip()
        if not text:
            raise ValueError(f"{source}: empty units")
        if "=" not in text:
            spec = {"energy": text}
        else:
            spec = {}
            for part in text.replace(";", ",").split(","):
                if not part.strip():
                    continue
                key, sep, value = part.partition("=")
                if not sep:
                    raise ValueError(
                        f"{source}: {part.strip()!r} is not `key=unit` (e.g. "
                        "`energy=kcal/mol,length=Å`, or a bare energy unit such as `kcal/mol`)"
                    )
                spec[key.strip()] = value.strip()
    if not isinstance(spec, dict):
        raise ValueError(
            f"{source}: units must be a mapping {{energy: ..., length: ...}} or a string, "
            f"got {spec!r}"
        )
    unknown = sorted(set(spec) - {"energy", "length"})
    if unknown:
        raise ValueError(f"{source}: unknown unit key(s) {unknown}; the keys are energy, length")
    values = {}
    for key in ("energy", "length"):
        if key not in spec:
            continue
        value = spec[key]
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{source}: the {key} unit must be a non-empty string, got {value!r}")
        value = value.strip()
        values[key] = "Å" if key == "length" and value.lower() in _ANGSTROM else value
    return Units(source=source, **values)


FIELD_LABELS: dict[str, str] = {
    "total_energy": "total energy",
    "per_atom_energy": "energy per atom",
    "atomic_energy": "atomic energy",
    "forces": "forces",
    "stress": "stress",
    "virial": "virial",
}

_SPLIT = re.compile(
    r"^(?P<split>train_loss|train_metric|val|test)"
    r"(?:(?P<index>\d*)|_(?P<dataset>[A-Za-z0-9_][A-Za-z0-9_-]*))_(?P<level>step|epoch)$"
)


@dataclasses.dataclass(frozen=True)
class Prefix:
    """A parsed log prefix: ``val1_epoch`` (split ``val``, loader ``index`` 1),
    ``val_new_epoch`` (split ``val``, ``dataset`` ``new``: the loader of that dataset, as
    :class:`~nequip_mtl.train.callbacks.DatasetMetricNames` logs it), ``train_loss_step``."""

    split: str
    index: int | None
    dataset: str | None
    level: str


def parse_prefix(key: str) -> Prefix | None:
    """``val0_epoch`` -> ``Prefix("val", 0, None, "epoch")``; ``val_new_epoch`` ->
    ``Prefix("val", None, "new", "epoch")``; anything else -> ``None``."""
    m = _SPLIT.match(key)
    if m is None:
        return None
    if m["dataset"] is not None:
        if m["split"] not in ("val", "test"):
            return None
        return Prefix(m["split"], None, m["dataset"], m["level"])
    return Prefix(m["split"], int(m["index"] or 0), None, m["level"])


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


def unit(field: str, kind: str | None, units: Units = DEFAULT_UNITS) -> str:
    """Unit string of a metric (``"(eV/Å)²"`` for ``forces`` ``mse``); ``""`` if unknown."""
    base = units.of(field)
    if base is None or kind not in KINDS:
        return ""
    power = KINDS[kind][1]
    if power == 1:
        return base
    return f"({base})²" if "/" in base else f"{base}²"


def quantity_label(field: str) -> str:
    return FIELD_LABELS.get(field, field.replace("_", " "))


def axis_label(field: str, kind: str | None, units: Units = DEFAULT_UNITS) -> str:
    """``"forces MSE [(eV/Å)²]"``."""
    kind_label = KINDS[kind][0] if kind in KINDS else (kind or "value")
    u = unit(field, kind, units)
    return f"{quantity_label(field)} {kind_label}" + (f" [{u}]" if u else "")
