"""Each task's share of the applied update, from the logged aggregation weights and
gradient norms (pure numpy).

A gradient-aggregation module applies ``update = sum_i w_i g_i`` with the *unnormalised*
task gradients ``g_i`` and logs ``mtl/weight/<name>`` (``w_i``) and
``mtl/grad_norm/<name>`` (``|g_i|``) together, at the same step. The raw weights are hard
to read: a task with a small gradient (stress, typically) gets a large weight, so weights
of different tasks differ by orders of magnitude. What a user can read is the size of
each task's term in the update relative to the others:

``share_i = |w_i| |g_i| / sum_j |w_j| |g_j|``

which lies in ``[0, 1]`` and sums to one over the tasks of a record. A negative weight
means that the update contains that task's gradient with a minus sign (it moves against
that task, to first order; ConFIG and IMTL-G can do this to cancel part of a conflicting
gradient): its share is still the size of its term, ``|w_i| |g_i|``, and
:attr:`UpdateShares.negative` marks it.

Where the gradient norms were not logged at the weights' step (e.g. ``task_weight/*`` of
:class:`~nequip_mtl.train.callbacks.LossCoefficientMonitor` without ``mtl/grad_norm/*``),
the *normalised weights* ``w_i / sum_j |w_j|`` are given instead (``kind ==
"normalised weight"``; they keep the weight's sign, and their absolute values sum to
one).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .logs import Series

__all__ = ["UpdateShares", "update_shares", "SHARE", "NORMALISED"]

SHARE = "share"
NORMALISED = "normalised weight"


@dataclasses.dataclass
class UpdateShares:
    """Per-task shares of the update (or normalised weights) at each logged record.

    ``step``: the steps of the records used (sorted); ``value[name]``: the task's share
    (or normalised weight) at each of them, ``NaN`` where the task was not in that
    record (an inactive or dropped task); ``negative[name]``: where its weight was
    negative. ``left_out``: the steps of weight records that could not be used (gradient
    norms missing for some of its tasks, or every term zero)."""

    kind: str
    step: np.ndarray
    value: dict[str, np.ndarray]
    negative: dict[str, np.ndarray]
    left_out: np.ndarray


def _at(series: Series, steps: np.ndarray) -> np.ndarray:
    """The series' finite value at each of ``steps`` (the last one logged at a step),
    ``NaN`` where it has none."""
    out = np.full(len(steps), np.nan)
    ok = np.isfinite(series.value)
    s, v = series.step[ok], series.value[ok]
    if len(s) == 0:
        return out
    idx = np.searchsorted(s, steps, side="right") - 1
    hit = (idx >= 0) & (s[np.clip(idx, 0, None)] == steps)
    out[hit] = v[idx[hit]]
    return out


def update_shares(weights: dict[str, Series], norms: dict[str, Series]) -> UpdateShares:
    """Share of the update of each task (``|w_i| |g_i| / sum_j |w_j| |g_j|``) at every
    step where ``weights`` are logged and every task of the record has its gradient norm
    in ``norms`` at the same step; records without the norms are left out
    (:attr:`UpdateShares.left_out`). If no record has its norms, the normalised weights
    ``w_i / sum_j |w_j|`` of every record instead (``kind == NORMALISED``).

    ``weights``, ``norms``: ``{task name: series}``, e.g. ``logs.with_prefix("mtl/weight/")``
    and ``logs.with_prefix("mtl/grad_norm/")``.
    """
    names = list(weights)
    steps = np.unique(np.concatenate([weights[n].step for n in names])) if names else np.array([])
    w = np.stack([_at(weights[n], steps) for n in names]) if names else np.empty((0, 0))
    g = (
        np.stack(
            [_at(norms[n], steps) if n in norms else np.full(len(steps), np.nan) for n in names]
        )
        if names
        else np.empty((0, 0))
    )
    present = np.isfinite(w)
    has_record = present.any(axis=0)
    has_norms = has_record & (np.isfinite(g) | ~present).all(axis=0)

    if has_norms.any():
        kind = SHARE
        terms = np.where(present, np.abs(w) * np.where(np.isfinite(g), np.abs(g), 0.0), np.nan)
    else:
        kind = NORMALISED
        has_norms = has_record
        terms = np.where(present, np.abs(w), np.nan)
    total = np.nansum(terms, axis=0)
    use = has_norms & (total > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        values = terms[:, use] / total[use]
    if kind == NORMALISED:
        values = np.sign(w[:, use]) * values
    return UpdateShares(
        kind=kind,
        step=steps[use],
        value={n: values[i] for i, n in enumerate(names)},
        negative={n: present[i, use] & (w[i, use] < 0) for i, n in enumerate(names)},
        left_out=steps[has_record & ~use],
    )
