"""Which micro-batches belong to one optimizer step, and what that step back-propagates.

Pure Python: nothing here imports Lightning.
"""

from __future__ import annotations

import dataclasses
from typing import Any


class WindowTracker:
    """Tells the first micro-batch of every optimizer step (an *accumulation window*).

    With ``accumulate_grad_batches = k`` every micro-batch of a window sees the same
    optimizer-step counter (Lightning's ``trainer.global_step``, which advances only in the
    optimizer step, during the window's last micro-batch); without accumulation every
    batch is a window of one. The one rule used by the training modules, FAMO, the
    coefficient callbacks and the gradient probe:

    .. code-block:: python

        tracker = WindowTracker()
        if tracker.starts(trainer.global_step):   # in on_train_batch_start / training_step
            ...  # the first micro-batch of a new optimizer step
        if tracker.stepped(trainer.global_step):  # in on_train_batch_end
            ...  # this micro-batch ended with the optimizer step
    """

    def __init__(self) -> None:
        #: the optimizer-step counter of the current window (``None``: none started yet)
        self.step: int | None = None

    def starts(self, step: int) -> bool:
        """Whether a micro-batch at optimizer step ``step`` opens a new window (and open it)."""
        if step == self.step:
            return False
        self.step = step
        return True

    def stepped(self, step: int) -> bool:
        """After a micro-batch: whether it ended its window with an optimizer step."""
        return step != self.step

    def reset(self) -> None:
        """Forget the current window (a new fit, or a measurement that was dropped)."""
        self.step = None


@dataclasses.dataclass
class StepWindow:
    """What one optimizer step back-propagates, and with which scaling.

    Attributes:
        active: the active tasks (``coeff`` not null), in loss order
        coeffs: ``{task: coeff}`` of the active tasks, read once when the window opens
        tasks: the tasks back-propagated one by one; row ``j`` of the task-gradient rows
            holds ``tasks[j]`` (empty between weight refreshes)
        weights: between refreshes, ``{task: weight}``: the window back-propagates the
            single loss ``sum_i weights[i] * L_i`` into row 0; ``None`` on a refresh
        scale: the ``GradScaler``'s loss scale (``1.0`` without one)
        loss_scaled: whether a ``GradScaler`` scales the losses (it then owns skipped steps)
        factor: what every back-propagated loss is multiplied by
            (``scale / accumulate_grad_batches``)
        backward_passes: backward passes run in this window so far
    """

    active: list[str]
    coeffs: dict[str, float]
    tasks: list[str]
    weights: dict[str, float] | None
    scale: float
    loss_scaled: bool
    factor: float
    backward_passes: int = 0

    @property
    def held(self) -> bool:
        """Whether this window trains on held weights (a step between refreshes)."""
        return self.weights is not None

    @property
    def num_rows(self) -> int:
        """Task-gradient rows this window fills."""
        return 1 if self.held else len(self.tasks)


@dataclasses.dataclass
class HeldWeights:
    """Aggregation weights kept between refreshes (``weights_every > 1``).

    The update between refreshes is ``sum_i weights[i] * grad L_i``: the raw weights of
    the last refresh applied to the current task gradients, so the step stays a
    combination of task gradients at the cost of one backward pass.

    Attributes:
        weights: ``{task: weight}`` of the tasks that entered the refresh's update
        coeffs: ``{task: coeff}`` of every active task at the refresh; a change of either
            the coefficients or the active set invalidates the weights
        age: optimizer steps applied with these weights since the refresh
    """

    weights: dict[str, float]
    coeffs: dict[str, float]
    age: int = 0

    def valid_for(self, coeffs: dict[str, float], every: int) -> bool:
        """Whether a step with these coefficients may reuse the weights (no refresh due)."""
        return coeffs == self.coeffs and self.age + 1 < every

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> HeldWeights:
        return cls(dict(state["weights"]), dict(state["coeffs"]), int(state["age"]))
