"""Strict loss-coefficient updates, shared by every callback that changes coefficients.

nequip's ``MetricsManager.set_coeffs`` treats a name missing from the update as "remove
this term", silently ignores unknown names and accepts negative or non-finite values.
:func:`update_coeffs` fixes all of that and works on nequip's own ``MetricsManager`` as
well as on :class:`nequip_mtl.train.MultitaskMetricsManager`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def current_coeffs(manager: Any) -> dict[str, float | None]:
    """The manager's coefficients, in loss-component order (``None``: inactive)."""
    return {name: entry.coeff for name, entry in manager.entries.items()}


def validate_coeffs(
    valid_names: list[str], updates: Mapping[str, Any], where: str
) -> dict[str, float | None]:
    """Check a ``{name: coeff}`` mapping; return it with plain ``float``/``None`` values.

    Raises ``ValueError`` naming ``where`` (the config key) for an unknown name, a
    negative or non-finite value, or a value that is not a number.
    """
    if not isinstance(updates, Mapping):
        raise TypeError(
            f"{where}: expected a mapping of loss names to coefficients, got {updates!r}"
        )
    checked: dict[str, float | None] = {}
    for name, value in updates.items():
        if name not in valid_names:
            raise ValueError(
                f"{where}: unknown loss component {name!r}; valid names are {list(valid_names)}"
            )
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
    return checked


def merge_coeffs(
    current: Mapping[str, float | None], updates: Mapping[str, float | None], where: str
) -> dict[str, float | None]:
    """Apply a partial update and normalise the active coefficients to sum to 1.

    Names absent from ``updates`` keep their current value; ``None`` removes a term.
    """
    merged = dict(current)
    merged.update(validate_coeffs(list(current), updates, where))
    total = sum(v for v in merged.values() if v is not None)
    if not total > 0:
        raise ValueError(
            f"{where}: at least one loss coefficient must be positive after the update, got {merged}"
        )
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
