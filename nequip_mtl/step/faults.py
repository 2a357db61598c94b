"""Bookkeeping of skipped optimizer steps and dropped tasks: counted, bounded (pure Python).

Pure Python: the training module reports what happened on each optimizer step; this
object keeps the counts, names the first cause of a run of skipped steps, and decides
when skipping has to stop the run.
"""

from __future__ import annotations

from typing import Any


class SkippedStepsError(FloatingPointError):
    """Training was stopped because optimizer steps kept being skipped."""


class StepFaults:
    """Counts of skipped steps and dropped tasks, with the stop rule.

    A run stops with :class:`SkippedStepsError` when

    - ``max_consecutive`` optimizer steps in a row were skipped (``None``: no limit), or
    - the first epoch ends without a single applied optimizer step (nothing trained,
      whatever the limit), before validation could checkpoint the untrained model.

    Args:
        max_consecutive: the limit on consecutive skipped steps, or ``None``
        task_noun: what a task is called in the messages (``"loss component"``, ``"dataset"``)
    """

    def __init__(self, max_consecutive: int | None, task_noun: str = "loss component"):
        self.max_consecutive = max_consecutive
        self.task_noun = task_noun
        self.skipped = 0  #: skipped optimizer steps in the whole run
        self.applied = 0  #: applied optimizer steps in the whole run
        self.consecutive = 0  #: skipped steps since the last applied one
        self.first_cause: str | None = None  #: cause of the first step of that run of skips
        self.dropped: dict[str, int] = {}  #: task name -> steps it was left out of

    def drop(self, name: str) -> None:
        self.dropped[name] = self.dropped.get(name, 0) + 1

    def applied_step(self) -> None:
        self.applied += 1
        self.consecutive = 0
        self.first_cause = None

    def skipped_step(self, cause: str, *, last_batch_of_first_epoch: bool) -> None:
        """Record a skipped step; raise if skipping has to stop the run."""
        self.skipped += 1
        self.consecutive += 1
        if self.first_cause is None:
            self.first_cause = cause
        if self.max_consecutive is not None and self.consecutive >= self.max_consecutive:
            raise SkippedStepsError(
                f"{self.consecutive} consecutive optimizer steps were skipped "
                f"(training_module.max_consecutive_skips={self.max_consecutive}; "
                f"{self.skipped} skipped and {self.applied} applied in this run). The first "
                f"of them: {self.first_cause}. Last: {cause}. Check the data and labels of "
                f"that {self.task_noun}, or lower the learning rate."
            )
        if last_batch_of_first_epoch and self.applied == 0:
            raise SkippedStepsError(
                f"every optimizer step of the first epoch was skipped ({self.skipped} of "
                f"{self.skipped}): the model has not trained at all. The first cause: "
                f"{self.first_cause}. Check the data and labels of that {self.task_noun}."
            )

    def state_dict(self) -> dict[str, Any]:
        return {
            "skipped": self.skipped,
            "applied": self.applied,
            "consecutive": self.consecutive,
            "first_cause": self.first_cause,
            "dropped": dict(self.dropped),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = state["skipped"]
        self.applied = state["applied"]
        self.consecutive = state["consecutive"]
        self.first_cause = state["first_cause"]
        self.dropped = dict(state["dropped"])
