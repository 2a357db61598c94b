"""The step engine: one optimizer step's whole life, in pure torch (no Lightning).

- :class:`StepEngine`: begin a window, add task losses, finish into ``.grad``;
- :class:`TaskGradients`: the preallocated per-task gradient rows;
- :class:`WindowTracker`: the first micro-batch of every optimizer step;
- :class:`StepFaults`: skipped steps and dropped tasks, counted and bounded;
- :class:`TaskGradientStatistics` and :class:`TaskGradientObservable`: what observers read;
- :class:`TaskKind` (:class:`ComponentTasks`, :class:`DatasetTasks`) and :class:`TaskPlan`:
  which losses form which task, and which forward graphs each reaches.
"""

from .engine import NONFINITE_POLICIES, StepEngine, StepOutcome
from .faults import SkippedStepsError, StepFaults
from .rows import TaskGradients
from .statistics import TaskGradientObservable, TaskGradientStatistics
from .tasks import (
    EVERY_GRAPH,
    ComponentTasks,
    DatasetTasks,
    TaskKind,
    TaskPlan,
    plan_tasks,
)
from .window import HeldWeights, StepWindow, WindowTracker

__all__ = [
    "NONFINITE_POLICIES",
    "StepEngine",
    "StepOutcome",
    "StepFaults",
    "SkippedStepsError",
    "TaskGradients",
    "TaskGradientObservable",
    "TaskGradientStatistics",
    "HeldWeights",
    "StepWindow",
    "WindowTracker",
    "TaskPlan",
    "TaskKind",
    "ComponentTasks",
    "DatasetTasks",
    "EVERY_GRAPH",
    "plan_tasks",
]
