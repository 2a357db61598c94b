"""Turn a stream of per-interval loss observations into coefficient updates.

Shared by the loss-history rules (SoftAdapt, Dynamic Weight Average): every observation
after the first gives one candidate weight dict (``rule(previous, new)``, combined with the
user's coefficients per ``scale_by``); every ``frequency`` candidates, their mean is the
new coefficient dict. ``frequency: 1`` therefore updates on every observation, and the
mean always covers every candidate of the cycle.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from .common import SCALE_BY, check_choice, check_positive_int, mean_weights, scale_weights

Rule = Callable[[Mapping[str, float], Mapping[str, float]], dict[str, float]]


class LossHistoryWeighting:
    """State machine: ``observe(losses, current, initial) -> new coefficients or None``.

    Only *active* components (``current[name] is not None``) take part. If the set of
    active components changes, the history restarts (the previous observation and the
    partial cycle are dropped). An observation with a missing or non-finite value for an
    active component is skipped (counted in ``skipped``) and leaves the state unchanged.

    Args:
        rule: ``rule(prev, new) -> {name: weight}`` for the names of ``new``
        frequency: number of candidates averaged into one update (>= 1)
        scale_by: ``initial``, ``current`` or ``none`` (see :data:`~.common.SCALE_BY`)
    """

    def __init__(self, rule: Rule, frequency: int, scale_by: str = "initial"):
        self.rule = rule
        self.frequency = check_positive_int(frequency, "frequency")
        self.scale_by = check_choice(scale_by, SCALE_BY, "scale_by")
        self.prev: dict[str, float] | None = None
        self.cycle: list[dict[str, float]] = []
        self.skipped = 0

    def observe(
        self,
        losses: Mapping[str, Any],
        current: Mapping[str, float | None],
        initial: Mapping[str, float | None] | None = None,
    ) -> dict[str, float] | None:
        names = [k for k, v in current.items() if v is not None]
        if not names:
            return None
        new: dict[str, float] = {}
        for name in names:
            value = losses.get(name)
            if value is None or not math.isfinite(float(value)):
                self.skipped += 1
                return None
            new[name] = float(value)
        if self.prev is None or list(self.prev) != names:
            self.prev = new
            self.cycle = []
            return None
        raw = self.rule(self.prev, new)
        self.prev = new
        self.cycle.append(scale_weights(raw, self.scale_by, initial, current))
        if len(self.cycle) < self.frequency:
            return None
        out = mean_weights(self.cycle)
        self.cycle = []
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "prev": None if self.prev is None else dict(self.prev),
            "cycle": [dict(w) for w in self.cycle],
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.prev = None if state["prev"] is None else dict(state["prev"])
        self.cycle = [dict(w) for w in state["cycle"]]
        self.skipped = int(state.get("skipped", 0))
