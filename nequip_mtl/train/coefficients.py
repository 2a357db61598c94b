"""Loss coefficients: the one check of their values, and strict updates.

Every place that takes loss coefficients from a user checks them with
:func:`validate_coeffs`: a training module's ``training_module.loss`` config
(:func:`check_loss_coeffs`, before nequip builds the loss), the loss managers and
wrappers (:class:`~nequip_mtl.train.MultitaskMetricsManager`, ``EnergyForceLoss`` & co.,
``PerDatasetLoss``), the coefficient callbacks and the modules' per-component arguments.
A coefficient is a finite number ``>= 0`` or ``null`` (the term is left out of the loss).

nequip's ``MetricsManager.set_coeffs`` treats a name missing from the update as "remove
this term", silently ignores unknown names and accepts negative or non-finite values.
:func:`update_coeffs` fixes all of that and works on nequip's own ``MetricsManager`` as
well as on :class:`nequip_mtl.train.MultitaskMetricsManager`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..step.tasks import NO_ACTIVE_COMPONENT

# ---------------------------------------------------------------- the check


def validate_coeffs(
    valid_names: Sequence[str] | None,
    coeffs: Any,
    where: str,
    *,
    exact: bool = False,
    positive: bool = False,
) -> dict[str, float | None]:
    """Check a ``{name: coeff}`` mapping; return it with plain ``float``/``None`` values.

    Each value must be ``None`` or a finite number ``>= 0`` (not a bool). ``where`` names
    the config key the mapping came from (e.g. ``LossCoefficientScheduler.schedule[3]``)
    and starts every message.

    Args:
        valid_names: the loss components a name must be one of (``None``: any name)
        coeffs: the mapping to check
        where: the config key of ``coeffs``, for the messages
        exact: every one of ``valid_names`` must be given
        positive: at least one value must be ``> 0`` (a loss with something to train)

    Raises:
        TypeError: ``coeffs`` is not a mapping, or a value is not a number or ``None``
        ValueError: an unknown (or, with ``exact``, a missing) name; a negative or
            non-finite value; with ``positive``, no value ``> 0``
    """
    if not isinstance(coeffs, Mapping):
        raise TypeError(
            f"{where}: expected a mapping of loss names to coefficients, got {coeffs!r}"
        )
    if valid_names is not None:
        valid = list(valid_names)
        unknown = [name for name in coeffs if name not in valid]
        if exact:
            missing = [name for name in valid if name not in coeffs]
            if unknown or missing:
                raise ValueError(
                    f"{where}: must have exactly the keys {valid}"
                    + (f"; unknown: {unknown}" if unknown else "")
                    + (f"; missing: {missing}" if missing else "")
                )
        elif unknown:
            raise ValueError(
                f"{where}: unknown loss component {unknown[0]!r}; valid names are {valid}"
            )
    checked: dict[str, float | None] = {}
    for name, value in coeffs.items():
        if value is None:
            checked[name] = None
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(
                f"{where}: coefficient of {name!r} must be a number or null, got {value!r}"
            )
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise ValueError(
                f"{where}: coefficient of {name!r} must be finite and >= 0 (or null), got {value!r}"
            )
        checked[name] = value
    if positive and not sum(v for v in checked.values() if v is not None) > 0:
        raise ValueError(f"{where}: at least one loss coefficient must be positive, got {checked}")
    return checked


def check_loss_coeffs(loss: Any, who: str) -> None:
    """Check the coefficients of a ``training_module.loss`` config before nequip builds it.

    nequip's ``MetricsManager`` accepts negative coefficients and normalises by their sum
    (so all-negative coefficients turn positive, and a zero sum leaves no loss); our modules
    need each to be finite and ``>= 0``. Checked here: ``loss.coeffs.<name>`` (nequip's
    ``EnergyForceLoss`` & co., ours), ``loss.coeffs.<dataset>.<name>`` (``PerDatasetLoss``)
    and ``loss.metrics[i].coeff`` (a ``MetricsManager``); anything else is left to the
    loss class itself.

    Raises:
        ValueError: a negative or non-finite coefficient; the message starts with ``who``
            (the module class) and the key, e.g. ``training_module.loss.coeffs``
        TypeError: a coefficient that is not a number or null
    """
    if not isinstance(loss, Mapping):
        return
    _check_coeff_tree(loss.get("coeffs"), "training_module.loss.coeffs", who)
    metrics = loss.get("metrics")
    if isinstance(metrics, (list, tuple)):
        for i, metric in enumerate(metrics):
            if isinstance(metric, Mapping):
                name = metric.get("name") or f"metrics[{i}]"
                where = f"{who}: `training_module.loss.metrics[{i}].coeff`"
                validate_coeffs(None, {name: metric.get("coeff")}, where)


def _check_coeff_tree(coeffs: Any, key: str, who: str) -> None:
    """``{name: coeff}``, or per dataset ``{dataset: {name: coeff}}`` (``PerDatasetLoss``)."""
    if not isinstance(coeffs, Mapping):
        return
    values = {name: v for name, v in coeffs.items() if not isinstance(v, Mapping)}
    validate_coeffs(None, values, f"{who}: `{key}`")
    for name, value in coeffs.items():
        if isinstance(value, Mapping):
            _check_coeff_tree(value, f"{key}.{name}", who)


# ---------------------------------------------------------------- reading


def current_coeffs(manager: Any) -> dict[str, float | None]:
    """The manager's coefficients, in loss-component order (``None``: inactive)."""
    return {name: entry.coeff for name, entry in manager.entries.items()}


def active_indices(manager: Any, required: bool = False) -> list[int]:
    """Positions of the loss components whose ``coeff`` is not ``None``; with
    ``required``, a ``RuntimeError`` if there is none."""
    active = [i for i, entry in enumerate(manager.entries.values()) if entry.coeff is not None]
    if required and not active:
        raise RuntimeError(NO_ACTIVE_COMPONENT)
    return active


def active_names(manager: Any) -> list[str]:
    """Names of the loss components whose ``coeff`` is not ``None``, in loss order."""
    names = list(manager.keys())
    return [names[i] for i in active_indices(manager)]


def positive_active_coeffs(manager: Any, who: str, what: str) -> dict[int, float]:
    """``{position: coeff}`` of the active loss components; every one must be > 0.

    ``what`` names the quantity the coefficients initialise, for the error message.
    """
    names = list(manager.keys())
    coeffs = {}
    for i in active_indices(manager):
        c = manager.entries[names[i]].coeff
        if not c > 0:
            raise ValueError(
                f"{who}: loss component {names[i]!r} has coefficient {c}; a zero coefficient "
                f"cannot initialise {what} (use null to exclude the term)"
            )
        coeffs[i] = c
    return coeffs


# ---------------------------------------------------------------- updating


def merge_coeffs(
    current: Mapping[str, float | None], updates: Mapping[str, float | None], where: str
) -> dict[str, float | None]:
    """Apply a partial update and normalise the active coefficients to sum to 1.

    Names absent from ``updates`` keep their current value; ``None`` removes a term.
    """
    merged = dict(current)
    merged.update(validate_coeffs(list(current), updates, where))
    merged = validate_coeffs(None, merged, where, positive=True)
    total = sum(v for v in merged.values() if v is not None)
    return {k: (None if v is None else v / total) for k, v in merged.items()}


def update_coeffs(manager: Any, updates: Mapping[str, Any], where: str) -> dict[str, float | None]:
    """Strictly update ``manager``'s loss coefficients in place; return the new ones.

    ``where`` names the config key the update came from, for error messages.
    """
    new = merge_coeffs(current_coeffs(manager), updates, where)
    # nequip's `set_coeffs` normalises again (a no-op on an already normalised dict)
    # and sets `do_weighted_sum`; giving it the full dict avoids its drop-missing rule.
    manager.set_coeffs(new)
    return new
