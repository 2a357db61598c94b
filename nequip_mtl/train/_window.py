"""The state of one optimizer step (accumulation window) of an aggregation module, and
the weights held between refreshes (``weights_every``).

A window is created at the first micro-batch of an optimizer step and dropped after the
step: what it holds lives exactly that long. Pure Python/torch, no Lightning.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class StepWindow:
    """What one optimizer step back-propagates, and with which scaling.

    Attributes:
        active: positions of the active loss components (``coeff`` not null)
        tasks: the components back-propagated one by one; row ``j`` of the task-gradient
            storage holds ``tasks[j]`` (empty between weight refreshes)
        weights: between refreshes, ``{position: weight}``: the window back-propagates
            the single loss ``sum_i weights[i] * L_i`` into row 0; ``None`` on a refresh
        scale: the ``GradScaler``'s loss scale (``1.0`` without one)
        factor: what every back-propagated loss is multiplied by
            (``scale / accumulate_grad_batches``)
        backward_passes: backward passes run in this window so far
    """

    active: list[int]
    tasks: list[int]
    weights: dict[int, float] | None
    scale: float
    factor: float
    backward_passes: int = 0


@dataclasses.dataclass
class HeldWeights:
    """Aggregation weights kept between refreshes (``weights_every > 1``).

    The update between refreshes is ``sum_i weights[i] * grad L_i``: the raw weights of
    the last refresh applied to the current task gradients, so the step stays a
    combination of task gradients at the cost of one backward pass.

    Attributes:
        weights: ``{name: weight}`` of the components that entered the refresh's update
        coeffs: ``{name: coeff}`` of every active component at the refresh; a change of
            either the coefficients or the active set invalidates the weights
        age: optimizer steps applied with these weights since the refresh
    """

    weights: dict[str, float]
    coeffs: dict[str, float]
    age: int = 0

    @classmethod
    def from_refresh(cls, weights: dict[str, float], coeffs: dict[str, float]) -> HeldWeights:
        return cls(dict(weights), dict(coeffs), 0)

    def valid_for(self, coeffs: dict[str, float], every: int) -> bool:
        """Whether a step with these coefficients may reuse the weights (no refresh due)."""
        return coeffs == self.coeffs and self.age + 1 < every

    def weights_by_index(self, names: list[str]) -> dict[int, float]:
        return {names.index(n): w for n, w in self.weights.items()}

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> HeldWeights:
        return cls(dict(state["weights"]), dict(state["coeffs"]), int(state["age"]))
