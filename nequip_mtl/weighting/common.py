"""Small shared helpers for the weighting rules: stable softmax, normalisation and how
the user's coefficients enter an adaptive rule (``scale_by``).

Everything here works on plain ``{name: float}`` dicts (insertion order = loss order).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

#: How the user's loss coefficients enter an adaptive rule's weights.
#:
#: - ``initial``: multiply by the coefficients captured when training started
#:   (the user's configured coefficients), then renormalise
#: - ``current``: multiply by the coefficients in force when the weights are computed
#:   (nequip's ``SoftAdapt`` behaviour; repeated updates compound multiplicatively)
#: - ``none``: ignore the user's coefficients (the original papers)
SCALE_BY = ("initial", "current", "none")


def check_choice(value: object, allowed: Sequence[str], where: str) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise a ``ValueError`` naming ``where``."""
    if value not in allowed:
        raise ValueError(f"`{where}` must be one of {list(allowed)}, got {value!r}")
    return value  # type: ignore[return-value]


def check_positive_int(value: object, where: str) -> int:
    """Return ``value`` if it is an integer >= 1, else raise naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{where}` must be an integer >= 1, got {value!r}")
    return value


def check_finite(
    value: object, where: str, *, positive: bool = False, nonneg: bool = False
) -> float:
    """Return ``value`` as a float if it is a finite number (optionally > 0 or >= 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{where}` must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"`{where}` must be finite, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"`{where}` must be > 0, got {value!r}")
    if nonneg and value < 0:
        raise ValueError(f"`{where}` must be >= 0, got {value!r}")
    return value


def softmax(
    values: Mapping[str, float], scale: float = 1.0, prefactors: Mapping[str, float] | None = None
) -> dict[str, float]:
    """``w_k = p_k exp(scale * x_k) / sum_l p_l exp(scale * x_l)``, computed stably.

    ``prefactors`` (``p_k``, default 1) must be >= 0; if they are all zero the result is
    uniform.
    """
    names = list(values)
    if not names:
        return {}
    scaled = [scale * values[k] for k in names]
    shift = max(scaled)
    exps = [math.exp(x - shift) for x in scaled]
    if prefactors is not None:
        exps = [e * prefactors[k] for e, k in zip(exps, names)]
    total = sum(exps)
    if not total > 0:
        return {k: 1.0 / len(names) for k in names}
    return {k: e / total for k, e in zip(names, exps)}


def normalise(weights: Mapping[str, float]) -> dict[str, float]:
    """Scale ``weights`` to sum to 1 (uniform if they sum to zero)."""
    total = sum(weights.values())
    if not total > 0:
        return {k: 1.0 / len(weights) for k in weights}
    return {k: v / total for k, v in weights.items()}


def scale_weights(
    weights: Mapping[str, float],
    scale_by: str,
    initial: Mapping[str, float | None] | None,
    current: Mapping[str, float | None],
) -> dict[str, float]:
    """Combine a rule's weights with the user's coefficients according to ``scale_by``.

    ``initial`` and ``current`` map loss names to coefficients (``None``: inactive). With
    ``scale_by="initial"``, a name without an initial coefficient (a term that was
    inactive when training started) falls back to its current coefficient.
    """
    check_choice(scale_by, SCALE_BY, "scale_by")
    if scale_by == "none":
        return normalise(weights)
    out = {}
    for name, w in weights.items():
        ref = None
        if scale_by == "initial" and initial is not None:
            ref = initial.get(name)
        if ref is None:
            ref = current.get(name)
        if ref is None:
            raise ValueError(f"loss component {name!r} has no coefficient to scale by")
        out[name] = w * ref
    return normalise(out)


def mean_weights(cycle: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Element-wise mean of a non-empty sequence of weight dicts with equal keys."""
    names = list(cycle[0])
    return {k: sum(w[k] for w in cycle) / len(cycle) for k in names}
