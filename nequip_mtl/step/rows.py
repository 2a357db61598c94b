"""Per-task gradient rows of the step engine (pure torch).

One flat ``(num_rows, numel)`` buffer per (device, dtype) group of trainable
parameters is allocated once, with one row per task gradient that is back-propagated
on its own (the active tasks of an all-task aggregator, the ``tasks_per_step`` of a
momentum method; never a ``coeff: null`` component). Each backward pass accumulates
*directly* into its row: before the pass every parameter's ``.grad`` is pointed at its
slice of that row, and autograd adds into an existing ``.grad`` in place. There is no
per-step flattening, concatenation, zero-filling of fresh tensors or re-allocation;
gradient accumulation over several micro-batches is the same in-place sum. The
applied update is written to a second preallocated buffer whose slices become the
parameters' ``.grad``.

A parameter that no backward pass of the window reached gets ``.grad = None``, as
with a plain ``loss.backward()`` (so optimizers with weight decay leave it alone);
reachability is recorded by a post-accumulate-grad hook per parameter.

An observer that must leave the training's ``.grad`` alone (the gradient-conflict probe)
fills the same rows with :meth:`TaskGradients.add_gradient` (``torch.autograd.grad``,
added into the row) and reads them with :meth:`~TaskGradients.gram` and
:meth:`~TaskGradients.dots`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..distributed import world_size


class _Group:
    """Parameters of one (device, dtype): their row buffer and update buffer."""

    def __init__(self, params: list[torch.nn.Parameter], index: list[int], num_rows: int):
        self.params = params
        self.index = index  # positions of these parameters in the storage's list
        p0 = params[0]
        numel = sum(p.numel() for p in params)
        self.rows = torch.zeros((num_rows, numel), dtype=p0.dtype, device=p0.device)
        self.update = torch.empty((numel,), dtype=p0.dtype, device=p0.device)
        self.row_views: list[list[torch.Tensor]] = [
            self._views(self.rows[i]) for i in range(num_rows)
        ]
        self.update_views = self._views(self.update)

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        views, offset = [], 0
        for p in self.params:
            views.append(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        return views


class TaskGradients:
    """Flat task-gradient rows for a fixed list of trainable parameters.

    Rows are used from the first one on: a window that back-propagates ``n`` tasks uses
    rows ``0 .. n-1`` (contiguous, so Gram matrices, DDP reductions and weighted sums
    work on views, never on gathered copies).

    Args:
        params: the trainable parameters (``requires_grad=True``), in a fixed order
        num_rows: number of rows (task gradients back-propagated separately per window)
        track_reach: record which parameters a :meth:`backward` pass reached (a hook per
            parameter); ``False`` for rows filled only by :meth:`add_gradient`, which
            then registers nothing on the parameters
    """

    def __init__(
        self, params: Sequence[torch.nn.Parameter], num_rows: int, track_reach: bool = True
    ):
        self.params = list(params)
        self.num_rows = num_rows
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(self.params):
            groups.setdefault((p.device, p.dtype), []).append(i)
        self.groups = [
            _Group([self.params[i] for i in idx], idx, num_rows) for idx in groups.values()
        ]
        self.dtype = max((g.rows.dtype for g in self.groups), key=lambda d: torch.finfo(d).bits)
        self._reached = [False] * len(self.params)
        self._hooks = (
            [
                p.register_post_accumulate_grad_hook(self._reach_hook(i))
                for i, p in enumerate(self.params)
            ]
            if track_reach
            else []
        )

    def _reach_hook(self, i: int):
        def hook(_: torch.Tensor) -> None:
            self._reached[i] = True

        return hook

    def close(self) -> None:
        """Remove the parameter hooks (the storage is being replaced)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def matches(self, params: Sequence[torch.nn.Parameter]) -> bool:
        """Whether this storage was built for exactly these parameters."""
        return len(params) == len(self.params) and all(a is b for a, b in zip(params, self.params))

    def zero_(self) -> None:
        """Start a new window: zero rows, nothing reached yet."""
        for g in self.groups:
            g.rows.zero_()
        self._reached = [False] * len(self.params)

    def backward(self, row: int, loss: torch.Tensor, retain_graph: bool) -> None:
        """Accumulate the gradient of ``loss`` into row ``row``."""
        for g in self.groups:
            for p, view in zip(g.params, g.row_views[row]):
                p.grad = view
        # a pass that keeps the graph runs only what leads to the parameters; the last one
        # (`retain_graph=False`) runs every branch like a plain `loss.backward()`, also the
        # ones that only lead to positions and cell, so that it frees every buffer it can
        # (non-parameter leaves get a batch-local `.grad`, as in nequip)
        inputs = self.params if retain_graph else None
        torch.autograd.backward(loss, retain_graph=retain_graph, inputs=inputs)
        self.release_grads()

    def add_gradient(self, row: int, loss: torch.Tensor, retain_graph: bool) -> None:
        """Add the gradient of ``loss`` into row ``row`` with ``torch.autograd.grad``:
        unlike :meth:`backward`, no ``.grad`` (of a parameter or any other leaf) is read
        or written and no parameter hook runs, so the training's own gradients and
        reachability are untouched. Parameters ``loss`` does not reach add nothing."""
        grads = torch.autograd.grad(loss, self.params, retain_graph=retain_graph, allow_unused=True)
        for g in self.groups:
            for i, view in zip(g.index, g.row_views[row]):
                if grads[i] is not None:
                    view.add_(grads[i])

    def add_gradients(
        self, losses: Sequence[torch.Tensor | None], scale: float = 1.0, first: int = 0
    ) -> None:
        """Add the gradient of ``scale * losses[j]`` into row ``first + j`` for every ``j``
        (with :meth:`add_gradient`, so no ``.grad`` is touched). A loss that is ``None`` or
        has no graph (e.g. ``ignore_nan`` and no labels in this batch) adds nothing; the
        shared graph is kept until the last loss that has one, whose pass frees it."""
        live = [j for j, loss in enumerate(losses) if loss is not None and loss.requires_grad]
        for k, j in enumerate(live):
            self.add_gradient(first + j, losses[j] * scale, retain_graph=k < len(live) - 1)

    def release_grads(self) -> None:
        """Detach the parameters from the buffers (``.grad = None``)."""
        for p in self.params:
            p.grad = None

    def gram(self, num: int) -> torch.Tensor:
        """The ``(num, num)`` Gram matrix of rows ``0 .. num-1``, in float64 on the CPU."""
        total = None
        for g in self.groups:
            rows = g.rows[:num]
            part = (rows @ rows.T).double()
            total = part if total is None else total + part
        return total.cpu()

    def parameter_grams(self, num: int) -> torch.Tensor:
        """``(len(params), num, num)``: the Gram matrix of rows ``0 .. num-1`` restricted to
        each parameter in turn (``params`` order), in float64 on the CPU; their sum over the
        parameters is :meth:`gram`. A zero diagonal entry: that row does not reach that
        parameter (e.g. another dataset's readout head)."""
        out = torch.zeros((len(self.params), num, num), dtype=torch.float64)
        for g in self.groups:
            for k, i in enumerate(g.index):
                block = torch.stack([g.row_views[r][k].reshape(-1) for r in range(num)])
                out[i] = (block @ block.T).double().cpu()
        return out

    def dots(self, num: int, vector: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """``(num,)`` dot products of rows ``0 .. num-1`` with a vector given per parameter
        (``vector[i]`` for ``params[i]``, ``None``: zero; e.g. the parameters' ``.grad``),
        in float64 on the CPU (computed in the rows' dtype, as :meth:`gram`)."""
        total = torch.zeros(num, dtype=torch.float64)
        for g in self.groups:
            flat = torch.cat(
                [
                    (vector[i] if vector[i] is not None else torch.zeros_like(p)).reshape(-1)
                    for i, p in zip(g.index, g.params)
                ]
            ).to(g.rows.dtype)
            total += (g.rows[:num] @ flat).double().cpu()
        return total

    def row_is_finite(self, row: int) -> bool:
        """Whether every entry of a row is finite (a slow check for error messages)."""
        return all(bool(torch.isfinite(g.rows[row]).all()) for g in self.groups)

    def matrix(self, num: int) -> torch.Tensor:
        """The ``(num, numel)`` matrix of rows ``0 .. num-1`` (a copy if several groups)."""
        parts = [g.rows[:num].to(self.dtype) for g in self.groups]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def all_reduce_mean_(self, num: int) -> None:
        """Average rows ``0 .. num-1`` over the DDP ranks, in place (one collective per
        parameter group), and take the union of the parameters reached on any rank."""
        self._all_reduce(num, mean=True)

    def all_reduce_sum_(self, num: int) -> None:
        """Sum rows ``0 .. num-1`` over the DDP ranks, in place: the gradient of a loss
        that is already a global mean, of which each rank back-propagated its own part."""
        self._all_reduce(num, mean=False)

    def _all_reduce(self, num: int, mean: bool) -> None:
        world = world_size()
        for g in self.groups:
            block = g.rows[:num]
            torch.distributed.all_reduce(block, op=torch.distributed.ReduceOp.SUM)
            if mean:
                block.div_(world)
        # reachability is decided per rank; the update must be identical on all of them
        device = self.groups[0].rows.device
        flags = torch.tensor(self._reached, dtype=torch.uint8, device=device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        self._reached = [bool(f) for f in flags.tolist()]

    def _point_grads(self, g: _Group, views: list[torch.Tensor]) -> None:
        for i, p, view in zip(g.index, g.params, views):
            p.grad = view if self._reached[i] else None

    def apply_weights(self, weights: torch.Tensor, rows: Sequence[int] | None = None) -> None:
        """Set every parameter's ``.grad`` to ``sum_j weights[j] * row[rows[j]]`` (``rows``
        default: ``0 .. len(weights)-1``; any other selection is gathered, a copy)."""
        n = len(weights)
        prefix = rows is None or list(rows) == list(range(n))
        for g in self.groups:
            if prefix and n == 1 and float(weights[0]) == 1.0:
                views = g.row_views[0]
            else:
                w = weights.to(device=g.rows.device, dtype=g.rows.dtype)
                selected = g.rows[:n] if prefix else g.rows[list(rows)]
                torch.mv(selected.T, w, out=g.update)
                views = g.update_views
            self._point_grads(g, views)

    def apply_update(self, update: torch.Tensor) -> None:
        """Set every parameter's ``.grad`` from a flat update vector over all groups."""
        offset = 0
        for g in self.groups:
            n = g.update.numel()
            g.update.copy_(update[offset : offset + n])
            offset += n
            self._point_grads(g, g.update_views)

    def apply_nonfinite(self) -> None:
        """Set every reached parameter's ``.grad`` to NaN: how a skipped step is handed to
        a ``GradScaler``, which then skips the optimizer step and lowers its scale."""
        for g in self.groups:
            g.update.fill_(float("nan"))
            self._point_grads(g, g.update_views)
        if not any(p.grad is not None for p in self.params):
            # the scaler needs at least one gradient to record its inf check on
            g = self.groups[0]
            g.params[0].grad = g.update_views[0]
