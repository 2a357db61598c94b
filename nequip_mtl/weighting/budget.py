"""A loss budget as a constraint: the multiplier of ``ratio <= bound`` by dual ascent.

Fine-tuning with replay asks for ``min L_new(theta)`` subject to
``L_replay(theta) <= (1 + tolerance) * L_replay(theta_0)``: improve on the new data, and
lose at most ``tolerance`` of what the pretrained model ``theta_0`` knew. Its Lagrangian,
``L_new + lambda * (L_replay - (1 + tolerance) L_replay(theta_0))``, has the gradient of the
weighted sum ``L_new + lambda L_replay``: the replay weight *is* the multiplier. Training the
weighted sum while moving ``lambda`` up when the constraint is violated and down when it is
slack is dual ascent (primal-dual gradient descent-ascent).

The multiplier moves in log space, ``log lambda += step_size * (ratio / bound - 1)``
(exponentiated gradient ascent on the dual): the step is relative, so it needs no knowledge
of the loss's scale, and ``lambda`` stays positive without a projection. At a fixed point
either the constraint is active (``ratio = bound``) or ``lambda`` sits at its lower
bound with the constraint slack (the replay costs nothing: fine-tuning alone keeps the
budget). ``ratio`` is the mean of the observed ratios since the last update, so that one
noisy batch does not move the multiplier; a weighted mean where the observations carry
weights (``observe(loss / reference, weight=reference)`` over batches: the ratio of the
summed losses).

With ``proportional > 0`` the multiplier is a PI controller of the violation (the
PID Lagrangian of Stooke, Achiam & Abbeel, ICML 2020, here in log space):
``log lambda = I + proportional * (ratio / bound - 1)``, where the integral ``I`` is the
dual-ascent sum above (kept within the bounds: no wind-up beyond them). The proportional
term answers a violation at once and leaves again when it ends, so the integral can move
slowly (a smaller ``step_size``) and noisy or transient ratios, e.g. the loss spike of a
fresh optimizer's first steps, do not accumulate in it. At a fixed point the violation is
zero and the proportional term vanishes: the same optimum as plain dual ascent.

Pure Python (no torch, no Lightning); the Lightning glue is
:class:`~nequip_mtl.train.callbacks.ForgettingBudget`.
"""

from __future__ import annotations

import math
from typing import Any

#: the largest change of ``log lambda`` in one update (a ratio far over its bound, e.g. of a
#: loss whose reference is nearly zero, would overflow ``exp``)
_MAX_LOG_STEP = 30.0


class DualAscentMultiplier:
    """The multiplier of one budget constraint ``ratio <= bound``.

    Args:
        bound: the largest allowed ratio, ``> 0`` (``1 + tolerance`` for a relative budget:
            ``1.05`` lets the constrained loss rise 5 % above its reference)
        step_size: log-space step per unit of relative violation (default ``1.0``: a ratio
            10 % over the bound multiplies ``lambda`` by ``e^0.1`` per update; one step
            changes ``lambda`` by at most ``e^30``, however large the violation)
        every: update the multiplier every this many optimizer steps (:meth:`step`;
            default ``10``)
        initial: the multiplier's starting value (default ``1.0``: the configured weight)
        bounds: ``(min, max)`` of the multiplier (default ``(1e-3, 1e3)``)
        proportional: log-space gain on the current violation (default ``0.0``: plain
            dual ascent)
    """

    def __init__(
        self,
        bound: float,
        step_size: float = 1.0,
        every: int = 10,
        initial: float = 1.0,
        bounds: tuple[float, float] = (1e-3, 1e3),
        proportional: float = 0.0,
    ) -> None:
        low, high = (float(b) for b in bounds)
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not bound > 0:
            raise ValueError(f"the budget's bound must be a number > 0, got {bound!r}")
        if not step_size > 0:
            raise ValueError(f"`step_size` must be > 0, got {step_size!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"`every` must be an integer >= 1, got {every!r}")
        if not 0 < low <= high:
            raise ValueError(f"`bounds` must be (min, max) with 0 < min <= max, got {bounds!r}")
        if isinstance(proportional, bool) or not proportional >= 0:
            raise ValueError(f"`proportional` must be >= 0, got {proportional!r}")
        if not low <= initial <= high:
            raise ValueError(f"`initial` must lie within `bounds` {bounds!r}, got {initial!r}")
        self.bound = float(bound)
        self.step_size = float(step_size)
        self.every = every
        self.bounds = (low, high)
        self.proportional = float(proportional)
        self.multiplier = float(initial)
        #: the integral term, ``log`` of the multiplier without the proportional one
        self.integral = math.log(self.multiplier)
        #: the weighted sum of the ratios observed since the last update, and their weights
        self._sum = 0.0
        self._weight = 0.0
        #: the mean ratio of the last update (``nan`` before the first)
        self.last_ratio = math.nan
        self.updates = 0
        self.steps = 0

    def observe(self, ratio: float, weight: float = 1.0) -> None:
        """Record one observed ratio with its ``weight`` in the mean (a non-finite ratio,
        e.g. of a batch without the constrained data, or a weight that is not finite and
        positive, is ignored)."""
        ratio, weight = float(ratio), float(weight)
        if math.isfinite(ratio) and math.isfinite(weight) and weight > 0:
            self._sum += weight * ratio
            self._weight += weight

    @property
    def next_step_updates(self) -> bool:
        """Whether the next :meth:`step` is an ``every``-th one (it updates, given ratios)."""
        return (self.steps + 1) % self.every == 0

    def step(self) -> bool:
        """One optimizer step has passed: update the multiplier on every ``every``-th step
        from the ratios observed since the last update (if any). Returns whether it did."""
        due = self.next_step_updates
        self.steps += 1
        if not due or self._weight == 0:
            return False
        self.update()
        return True

    def update(self) -> None:
        """One dual-ascent step from the mean of the ratios observed since the last one."""
        if self._weight == 0:
            return
        mean = self._sum / self._weight
        violation = mean / self.bound - 1.0
        low, high = self.bounds
        log_low, log_high = math.log(low), math.log(high)
        integral = self.integral + _clip(self.step_size * violation)
        self.integral = min(log_high, max(log_low, integral))
        log_multiplier = self.integral + _clip(self.proportional * violation)
        # at a bound, the bound itself (exp(log(b)) may differ from b in the last bit)
        self.multiplier = (low if log_multiplier <= log_low else
                           high if log_multiplier >= log_high else math.exp(log_multiplier))  # fmt: skip
        self.last_ratio = mean
        self._sum, self._weight = 0.0, 0.0
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "multiplier": self.multiplier,
            "integral": self.integral,
            "sum": self._sum,
            "count": self._weight,  # the weights' sum, under the key of older states
            "last_ratio": self.last_ratio,
            "updates": self.updates,
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.multiplier = float(state["multiplier"])
        # a state saved before the proportional term: the integral is the multiplier's log
        self.integral = float(state.get("integral", math.log(self.multiplier)))
        self._sum = float(state["sum"])
        self._weight = float(state["count"])
        self.last_ratio = float(state["last_ratio"])
        self.updates = int(state["updates"])
        self.steps = int(state["steps"])


def _clip(step: float) -> float:
    """A log-space step within ``±_MAX_LOG_STEP``."""
    return max(-_MAX_LOG_STEP, min(_MAX_LOG_STEP, step))
