"""One optimizer step of a gradient-aggregation module, from task losses to ``.grad``.

Pure torch, no Lightning: the training module (``nequip_mtl.train.multitask``) is hook
glue that calls, per optimizer step (one accumulation window of micro-batches)::

    engine.begin(coeffs, params, scale=..., loss_scaled=..., accumulate=...)
    for each micro-batch:
        engine.add({task: loss, ...})   # once per forward graph: a whole batch, or one
                                        # sub-batch per task (several calls per micro-batch)
    outcome = engine.finish(step, reduce=...)   # inside the optimizer closure
    engine.end()                                # after the optimizer step

``finish`` reduces the rows across ranks (``reduce``), decides which tasks enter the
update (zero gradients dropped, non-finite ones by ``on_nonfinite``), aggregates, writes
every trainable parameter's ``.grad`` (or releases it, for a skipped step) and returns a
:class:`StepOutcome` for the glue to log and count. What lives how long:

- the window (:class:`StepWindow`): from ``begin`` to ``end``;
- the task-gradient rows (:class:`TaskGradients`): allocated once, zeroed by ``begin``;
- held weights (``weights_every``) and the active set: across steps, in checkpoints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..aggregators import Aggregator, GramAggregator
from .rows import TaskGradients
from .statistics import TaskGradientStatistics
from .tasks import NO_ACTIVE_COMPONENT
from .window import HeldWeights, StepWindow

NONFINITE_POLICIES = ("skip", "zero_task", "raise")


@dataclasses.dataclass
class StepOutcome:
    """What one optimizer step did.

    Attributes:
        applied: whether an update was written to ``.grad`` (``False``: the step is
            skipped; ``.grad`` is ``None``, or NaN for a ``GradScaler`` to skip)
        cause: why the step was skipped (``None`` if applied)
        weights: ``{task: weight}`` of the applied update ``sum_i w_i g_i`` (empty when
            skipped, or when the aggregator's update is not such a combination)
        statistics: the task gradients of a step that computed them (``None`` on a step
            between refreshes or a skipped step)
        dropped: ``(task, cause)`` of the tasks left out of this step: ``cause`` is
            ``None`` for an exactly zero gradient (e.g. no labels in the batch), else what
            was non-finite (``on_nonfinite: zero_task``)
        held: whether the step trained on held weights (between refreshes)
        all_nonfinite: whether every task gradient of the step was non-finite (a fault
            of the model rather than of one task's labels)
    """

    applied: bool
    cause: str | None = None
    weights: dict[str, float] = dataclasses.field(default_factory=dict)
    statistics: TaskGradientStatistics | None = None
    dropped: list[tuple[str, str | None]] = dataclasses.field(default_factory=list)
    held: bool = False
    all_nonfinite: bool = False


class StepEngine:
    """Per-task gradients -> (reduce) -> aggregate -> ``.grad``, one optimizer step at a time.

    Args:
        aggregator: the :class:`~nequip_mtl.aggregators.Aggregator`
        weights_every: refresh the weights every this many steps and train on
            ``sum_i w_i L_i`` with the held weights in between (Gram aggregators only)
        on_nonfinite: ``skip``, ``zero_task`` or ``raise`` (see the training module)
    """

    def __init__(self, aggregator: Aggregator, weights_every: int = 1, on_nonfinite="skip"):
        self.aggregator = aggregator
        self.weights_every = weights_every
        self.on_nonfinite = on_nonfinite
        #: the current window, from :meth:`begin` to :meth:`end`
        self.window: StepWindow | None = None
        #: the weights held between refreshes (``weights_every > 1``)
        self.held: HeldWeights | None = None
        #: the task-gradient rows (allocated once, reused by every window)
        self.rows: TaskGradients | None = None
        self.last_active: list[str] | None = None
        #: what a task is called in the causes of skips and drops (the task kind's ``noun``)
        self.task_noun = "loss component"

    # ------------------------------------------------------------------ window

    def begin(
        self,
        coeffs: Mapping[str, float | None],
        params: Sequence[torch.nn.Parameter],
        *,
        scale: float = 1.0,
        loss_scaled: bool = False,
        accumulate: int = 1,
    ) -> StepWindow:
        """Open the window of an optimizer step.

        Args:
            coeffs: ``{task: coeff}`` of every task in loss order (``None``: inactive)
            params: the trainable parameters
            scale: the ``GradScaler``'s loss scale (``1.0`` without one)
            loss_scaled: whether a ``GradScaler`` scales the losses
            accumulate: micro-batches per optimizer step (``accumulate_grad_batches``)
        """
        active = {name: float(c) for name, c in coeffs.items() if c is not None}
        if not active:
            raise RuntimeError(NO_ACTIVE_COMPONENT)
        names = list(active)
        if self.last_active is not None and self.last_active != names:
            self.aggregator.reset()  # the set of active tasks changed
        self.last_active = names
        factor = scale / accumulate
        held = self.held
        if len(names) > 1 and held is not None and held.valid_for(active, self.weights_every):
            window = StepWindow(names, active, [], dict(held.weights), scale, loss_scaled, factor)
        else:
            selected = self.aggregator.select_tasks(len(names)) if len(names) > 1 else None
            tasks = names if selected is None else [names[j] for j in selected]
            window = StepWindow(names, active, tasks, None, scale, loss_scaled, factor)
        self.window = window
        self._allocate(list(params), max(window.num_rows, 1)).zero_()
        return window

    def _allocate(self, params: list[torch.nn.Parameter], num_rows: int) -> TaskGradients:
        rows = self.rows
        if rows is not None and rows.matches(params):
            # a window between refreshes (one row) uses the first row of the refresh's rows
            if rows.num_rows == num_rows or (num_rows == 1 and self.held):
                return rows
        if rows is not None:
            rows.close()
        self.rows = TaskGradients(params, num_rows)
        return self.rows

    def add(self, losses: Mapping[str, torch.Tensor]) -> None:
        """Back-propagate task losses that share one graph into the window's rows.

        ``losses`` maps active tasks to their (unscaled, unaccumulated) losses; a task
        absent from ``losses`` (e.g. a dataset without frames in this micro-batch)
        contributes nothing. Call once per forward graph: for tasks whose losses come from
        their own forward pass on a sub-batch, once per sub-batch. The graph is freed by
        the last backward pass of the call.
        """
        window, rows = self.window, self.rows
        if window.held:
            held = window.weights
            total = sum(w * losses[t] for t, w in held.items() if w != 0.0 and t in losses)
            if isinstance(total, torch.Tensor) and total.requires_grad:
                rows.backward(0, total * window.factor, retain_graph=False)
                window.backward_passes += 1
            return
        # a task loss that does not depend on the parameters on this batch (e.g. a metric
        # with `ignore_nan` and no labels in it) has a zero gradient: nothing to do
        todo = [
            (j, t) for j, t in enumerate(window.tasks) if t in losses and losses[t].requires_grad
        ]
        for k, (row, task) in enumerate(todo):
            rows.backward(row, losses[task] * window.factor, retain_graph=k < len(todo) - 1)
            window.backward_passes += 1

    def end(self) -> None:
        """Close the window (after its optimizer step): its state is dropped."""
        self.window = None

    # ------------------------------------------------------------------ the step

    def finish(
        self, step: int, reduce: Callable[[TaskGradients, int], None] | None = None
    ) -> StepOutcome:
        """Aggregate the window's rows into ``.grad``; return what happened.

        Args:
            step: the optimizer-step counter (for messages and statistics)
            reduce: averages the first ``n`` rows over data-parallel ranks, in place
                (e.g. :meth:`TaskGradients.all_reduce_mean_`); ``None`` on one process
        """
        window, rows = self.window, self.rows
        if reduce is not None:
            reduce(rows, window.num_rows)
        # unscaled units from here on (the rows stay scaled: the GradScaler unscales .grad)
        gram = rows.gram(window.num_rows) / window.scale**2
        if window.held:
            return self._finish_held(window, gram, step)
        outcome = StepOutcome(applied=False)
        tasks, cause = self._usable_tasks(window, gram, step, outcome)
        if cause is not None:
            return self._skip(outcome, cause)
        index = [window.tasks.index(t) for t in tasks]
        if len(index) < len(window.tasks):
            gram = gram[index][:, index]
        coeffs = torch.tensor([window.coeffs[t] for t in tasks], dtype=torch.float64)
        name = type(self.aggregator).__name__
        if len(window.active) == 1:
            weights = torch.ones(1, dtype=torch.float64)  # its plain gradient, as in nequip
            rows.apply_weights(weights)
        elif isinstance(self.aggregator, GramAggregator):
            self.aggregator.set_tasks(window.active, [window.active.index(t) for t in tasks])
            weights = self.aggregator.weights(gram, coeffs, source_dtype=rows.dtype)
            if not bool(torch.isfinite(weights).all()):
                return self._skip(outcome, f"{name} returned non-finite weights")
            rows.apply_weights(weights, index)
            if self.weights_every > 1:
                self.held = HeldWeights(
                    {t: float(w) for t, w in zip(tasks, weights)}, dict(window.coeffs)
                )
        else:
            matrix = rows.matrix(window.num_rows)
            matrix = matrix[index] if len(index) < window.num_rows else matrix
            if window.scale != 1.0:
                matrix = matrix / window.scale
            active_coeffs = torch.tensor(
                [window.coeffs[t] for t in window.active], dtype=matrix.dtype
            ).to(matrix.device)
            computed = [window.active.index(t) for t in tasks]
            update = self.aggregator.aggregate_subset(matrix, active_coeffs, computed)
            if not bool(torch.isfinite(update).all()):
                return self._skip(outcome, f"{name} returned a non-finite update")
            rows.apply_update(update * window.scale if window.scale != 1.0 else update)
            weights = None
        outcome.applied = True
        outcome.statistics = TaskGradientStatistics(list(tasks), gram, weights, step)
        if weights is not None:
            outcome.weights = {t: float(w) for t, w in zip(tasks, weights)}
        return outcome

    def _finish_held(self, window: StepWindow, gram: torch.Tensor, step: int) -> StepOutcome:
        """A step between refreshes: row 0 holds the gradient of ``sum_i w_i L_i``."""
        held = self.held
        sq = float(gram[0, 0])
        outcome = StepOutcome(applied=False, held=True)
        if sq != sq or sq == float("inf"):
            if self.on_nonfinite == "raise" and not window.loss_scaled:
                raise FloatingPointError(
                    f"the weighted loss of {sorted(held.weights)} has a non-finite gradient at "
                    f"global step {step} (between weight refreshes, "
                    "training_module.weights_every; training_module.on_nonfinite=raise)"
                )
            self.held = None  # refresh on the next step: per-task gradients name it
            return self._skip(
                outcome,
                f"the weighted loss of {sorted(held.weights)} has a "
                f"{'NaN' if sq != sq else 'non-finite'} gradient (a step between weight "
                f"refreshes; the next step refreshes and names the {self.task_noun})",
            )
        self.rows.apply_weights(torch.ones(1, dtype=torch.float64))
        held.age += 1
        outcome.applied = True
        outcome.weights = dict(window.weights)
        return outcome

    def _usable_tasks(
        self, window: StepWindow, gram: torch.Tensor, step: int, outcome: StepOutcome
    ) -> tuple[list[str], str | None]:
        """The tasks that enter the update (zero gradients and, with ``zero_task``,
        non-finite ones dropped), and the cause of a skip (``None`` if the step goes ahead)."""
        sq_norms = gram.diagonal()
        keep: list[str] = []
        for row, task in enumerate(window.tasks):
            sq = float(sq_norms[row])
            if sq != sq or sq == float("inf"):
                what = "a NaN" if sq != sq else self._inf_kind(row)
                cause = f"{self.task_noun} {task!r} has {what} gradient at global step {step}"
                if self.on_nonfinite == "raise":
                    raise FloatingPointError(cause + " (training_module.on_nonfinite=raise)")
                if self.on_nonfinite == "skip" or window.loss_scaled:
                    outcome.all_nonfinite = self._all_nonfinite(sq_norms)
                    return [], cause
                outcome.dropped.append((task, cause))
                continue
            if sq == 0.0:
                outcome.dropped.append((task, None))
                continue
            keep.append(task)
        if not keep:
            outcome.all_nonfinite = self._all_nonfinite(sq_norms)
            return [], f"no {self.task_noun} has a non-zero gradient on this step"
        return keep, None

    @staticmethod
    def _all_nonfinite(sq_norms: torch.Tensor) -> bool:
        return not bool(torch.isfinite(sq_norms).any())

    def _inf_kind(self, row: int) -> str:
        if self.rows.row_is_finite(row):
            return f"a finite gradient whose squared norm overflows {self.rows.dtype}; an inf"
        return "an inf"

    def _skip(self, outcome: StepOutcome, cause: str) -> StepOutcome:
        if self.window.loss_scaled:
            # the GradScaler skips a step with non-finite gradients and lowers its scale
            self.rows.apply_nonfinite()
        else:
            self.rows.release_grads()  # `.grad = None`: optimizers leave every parameter alone
        outcome.applied = False
        outcome.cause = cause
        outcome.weights = {}
        return outcome

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {
            "aggregator": self.aggregator.state_dict(),
            "held_weights": None if self.held is None else self.held.state_dict(),
            "last_active": self.last_active,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.aggregator.load_state_dict(state["aggregator"])
        held = state.get("held_weights")
        self.held = None if held is None else HeldWeights.from_state(held)
        self.last_active = state.get("last_active")
