"""A strict :class:`~nequip.train.MetricsManager` and drop-in loss wrappers that use it.

:class:`MultitaskMetricsManager` behaves like nequip's ``MetricsManager`` except that
``set_coeffs`` is a *partial, validated* update (see
:func:`nequip_mtl.train.coefficients.update_coeffs`): unknown names are an error that
lists the valid ones, names not given keep their coefficient, ``null`` removes a term,
negative or non-finite values are errors, and the result is normalised to sum to 1.
nequip's ``set_coeffs`` instead drops every name that is not given, ignores unknown
names and accepts negative values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nequip.data import AtomicDataDict, PerAtomModifier
from nequip.train import MeanSquaredError, MetricsManager

from .coefficients import current_coeffs, merge_coeffs, validate_coeffs


class MultitaskMetricsManager(MetricsManager):
    """nequip's ``MetricsManager`` with strict, partial coefficient updates.

    Takes exactly the arguments of :class:`~nequip.train.MetricsManager`. Each metric's
    ``coeff`` must be ``null`` or a finite number >= 0. After construction,
    ``set_coeffs({name: value})`` changes only the names given (``null`` removes a term)
    and renormalises the active coefficients to sum to 1.

    .. code-block:: yaml

        training_module:
          _target_: nequip.train.NequIPLightningModule
          loss:
            _target_: nequip_mtl.train.MultitaskMetricsManager
            metrics:
              - name: per_atom_energy_mse
                field:
                  _target_: nequip.data.PerAtomModifier
                  field: total_energy
                coeff: 1.0
                metric:
                  _target_: nequip.train.MeanSquaredError
              - name: forces_mse
                field: forces
                coeff: 5.0
                metric:
                  _target_: nequip.train.MeanSquaredError

    Args:
        metrics (list of dict): as for :class:`~nequip.train.MetricsManager`
        type_names (list of str, optional): as for :class:`~nequip.train.MetricsManager`
    """

    def __init__(self, metrics: list[dict[str, Any]], type_names: list[str] | None = None):
        for i, metric in enumerate(metrics):
            label = metric.get("name", f"metrics[{i}]")
            validate_coeffs(
                None, {label: metric.get("coeff")}, f"{type(self).__name__}.metrics[{i}]"
            )
        super().__init__(metrics, type_names=type_names)
        self._strict_coeffs = True

    def set_coeffs(self, coeff_dict: Mapping[str, float | None]) -> None:
        """Partially update the coefficients (strict; see the class docstring)."""
        if not getattr(self, "_strict_coeffs", False):
            # construction and checkpoint restore: nequip's exact-dict semantics
            super().set_coeffs(coeff_dict)
            return
        new = merge_coeffs(current_coeffs(self), coeff_dict, f"{type(self).__name__}.set_coeffs")
        super().set_coeffs(new)

    def set_extra_state(self, state: dict) -> None:
        """Restore from a checkpoint; its coefficient names must match this manager's."""
        names = list(self.entries)
        saved = state["coeff_dict"]
        if set(saved) != set(names):
            raise ValueError(
                f"checkpoint loss components {sorted(saved)} do not match this loss's "
                f"components {names}; the loss configuration changed between runs"
            )
        validate_coeffs(names, saved, "checkpoint `coeff_dict`")
        self._strict_coeffs = False
        try:
            super().set_extra_state(state)
        finally:
            self._strict_coeffs = True


def _energy_entry(per_atom_energy: bool, coeff: float | None, ignore_nan: bool) -> dict[str, Any]:
    return {
        "name": "per_atom_energy_mse" if per_atom_energy else "total_energy_mse",
        "field": (
            PerAtomModifier(AtomicDataDict.TOTAL_ENERGY_KEY)
            if per_atom_energy
            else AtomicDataDict.TOTAL_ENERGY_KEY
        ),
        "coeff": coeff,
        "metric": MeanSquaredError(),
        "ignore_nan": ignore_nan,
    }


def _forces_entry(
    coeff: float | None, per_type_forces_coeffs: Mapping[str, float] | None, ignore_nan: bool
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": "forces_mse",
        "field": AtomicDataDict.FORCE_KEY,
        "coeff": coeff,
        "metric": MeanSquaredError(),
        "ignore_nan": ignore_nan,
    }
    if per_type_forces_coeffs is not None:
        entry["per_type"] = True
        entry["per_type_coeffs"] = per_type_forces_coeffs
    return entry


def _with_extra(metrics: list, extra_metrics: list | None) -> list:
    return metrics if extra_metrics is None else [*metrics, *extra_metrics]


def EnergyForceLoss(
    coeffs: Mapping[str, float | None] = {
        AtomicDataDict.TOTAL_ENERGY_KEY: 1.0,
        AtomicDataDict.FORCE_KEY: 1.0,
    },
    per_atom_energy: bool = True,
    per_type_forces_coeffs: Mapping[str, float] | None = None,
    type_names: list[str] | None = None,
    extra_metrics: list[dict[str, Any]] | None = None,
) -> MultitaskMetricsManager:
    """Drop-in for :func:`nequip.train.EnergyForceLoss` built on :class:`MultitaskMetricsManager`.

    Same arguments and loss component names (``per_atom_energy_mse`` or
    ``total_energy_mse``, and ``forces_mse``). ``coeffs`` must have exactly the keys
    ``total_energy`` and ``forces`` (nequip silently ignores extra keys); a value may be
    ``null`` to compute a term without training on it.

    .. code-block:: yaml

        training_module:
          _target_: nequip.train.NequIPLightningModule
          loss:
            _target_: nequip_mtl.train.EnergyForceLoss
            per_atom_energy: true
            coeffs:
              total_energy: 1.0
              forces: 1.0

    Args:
        coeffs (dict): weights of ``total_energy`` and ``forces`` (default 1:1)
        per_atom_energy (bool): normalise the energy by the number of atoms (default ``True``)
        per_type_forces_coeffs (dict, optional): per-type forces weights, as in nequip
        extra_metrics (list of dict, optional): further metric entries
    """
    c = validate_coeffs(
        ("total_energy", "forces"), coeffs, "EnergyForceLoss.coeffs", exact=True, positive=True
    )
    metrics = [
        _energy_entry(per_atom_energy, c["total_energy"], False),
        _forces_entry(c["forces"], per_type_forces_coeffs, False),
    ]
    for m in metrics:
        m.pop("ignore_nan")
    return MultitaskMetricsManager(_with_extra(metrics, extra_metrics), type_names=type_names)


def EnergyForceStressLoss(
    coeffs: Mapping[str, float | None] = {
        AtomicDataDict.TOTAL_ENERGY_KEY: 1.0,
        AtomicDataDict.FORCE_KEY: 1.0,
        AtomicDataDict.STRESS_KEY: 1.0,
    },
    per_atom_energy: bool = True,
    per_type_forces_coeffs: Mapping[str, float] | None = None,
    type_names: list[str] | None = None,
    ignore_nan: Mapping[str, bool] | None = None,
    extra_metrics: list[dict[str, Any]] | None = None,
) -> MultitaskMetricsManager:
    """Drop-in for :func:`nequip.train.EnergyForceStressLoss` built on :class:`MultitaskMetricsManager`.

    Loss component names: ``per_atom_energy_mse`` (or ``total_energy_mse``),
    ``forces_mse``, ``stress_mse``. ``coeffs`` must have exactly the keys
    ``total_energy``, ``forces`` and ``stress``.

    .. code-block:: yaml

        training_module:
          _target_: nequip.train.NequIPLightningModule
          loss:
            _target_: nequip_mtl.train.EnergyForceStressLoss
            per_atom_energy: true
            coeffs:
              total_energy: 1.0
              forces: 1.0
              stress: 1.0
            # ignore_nan:
            #   stress: true

    Args:
        coeffs (dict): weights of ``total_energy``, ``forces`` and ``stress`` (default 1:1:1)
        per_atom_energy (bool): normalise the energy by the number of atoms (default ``True``)
        per_type_forces_coeffs (dict, optional): per-type forces weights, as in nequip
        ignore_nan (dict, optional): ``{field: bool}`` NaN masking per field, as in nequip
        extra_metrics (list of dict, optional): further metric entries
    """
    c = validate_coeffs(
        ("total_energy", "forces", "stress"),
        coeffs,
        "EnergyForceStressLoss.coeffs",
        exact=True,
        positive=True,
    )
    ignore_nan = dict(ignore_nan or {})
    unknown = [k for k in ignore_nan if k not in ("total_energy", "forces", "stress")]
    if unknown:
        raise ValueError(
            f"EnergyForceStressLoss: unknown `ignore_nan` keys {unknown}; valid keys are "
            "['total_energy', 'forces', 'stress']"
        )
    metrics = [
        _energy_entry(per_atom_energy, c["total_energy"], ignore_nan.get("total_energy", False)),
        _forces_entry(c["forces"], per_type_forces_coeffs, ignore_nan.get("forces", False)),
        {
            "name": "stress_mse",
            "field": AtomicDataDict.STRESS_KEY,
            "coeff": c["stress"],
            "metric": MeanSquaredError(),
            "ignore_nan": ignore_nan.get("stress", False),
        },
    ]
    return MultitaskMetricsManager(_with_extra(metrics, extra_metrics), type_names=type_names)


def EnergyOnlyLoss(
    per_atom_energy: bool = True,
    type_names: list[str] | None = None,
    extra_metrics: list[dict[str, Any]] | None = None,
) -> MultitaskMetricsManager:
    """Drop-in for :func:`nequip.train.EnergyOnlyLoss` built on :class:`MultitaskMetricsManager`.

    .. code-block:: yaml

        training_module:
          _target_: nequip.train.NequIPLightningModule
          loss:
            _target_: nequip_mtl.train.EnergyOnlyLoss
            per_atom_energy: true

    Args:
        per_atom_energy (bool): normalise the energy by the number of atoms (default ``True``)
        extra_metrics (list of dict, optional): further metric entries
    """
    entry = _energy_entry(per_atom_energy, 1.0, False)
    entry.pop("ignore_nan")
    return MultitaskMetricsManager(_with_extra([entry], extra_metrics), type_names=type_names)
