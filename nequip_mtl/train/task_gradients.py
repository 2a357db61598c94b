"""Per-task gradient storage for gradient-aggregation training modules.

One flat ``(num_tasks, numel)`` buffer per (device, dtype) group of trainable
parameters is allocated once. Each task's backward pass accumulates *directly* into
its row: before the pass every parameter's ``.grad`` is pointed at its slice of that
row, and autograd adds into an existing ``.grad`` in place. There is no per-step
flattening, concatenation, zero-filling of fresh tensors or re-allocation; gradient
accumulation over several micro-batches is the same in-place sum. The applied update
is written to a second preallocated buffer whose slices become the parameters'
``.grad``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class _Group:
    """Parameters of one (device, dtype): their row buffer and update buffer."""

    def __init__(self, params: list[torch.nn.Parameter], num_tasks: int):
        self.params = params
        p0 = params[0]
        numel = sum(p.numel() for p in params)
        self.rows = torch.zeros((num_tasks, numel), dtype=p0.dtype, device=p0.device)
        self.update = torch.empty((numel,), dtype=p0.dtype, device=p0.device)
        self.row_views: list[list[torch.Tensor]] = [
            self._views(self.rows[i]) for i in range(num_tasks)
        ]
        self.update_views = self._views(self.update)

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        views, offset = [], 0
        for p in self.params:
            views.append(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        return views


class TaskGradients:
    """Flat per-task gradient rows for a fixed list of trainable parameters.

    Args:
        params: the trainable parameters (``requires_grad=True``), in a fixed order
        num_tasks: number of rows (one per loss component, active or not)
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], num_tasks: int):
        self.params = list(params)
        self.num_tasks = num_tasks
        groups: dict[tuple[torch.device, torch.dtype], list[torch.nn.Parameter]] = {}
        for p in self.params:
            groups.setdefault((p.device, p.dtype), []).append(p)
        self.groups = [_Group(ps, num_tasks) for ps in groups.values()]
        self.dtype = max((g.rows.dtype for g in self.groups), key=lambda d: torch.finfo(d).bits)

    def matches(self, params: Sequence[torch.nn.Parameter]) -> bool:
        """Whether this storage was built for exactly these parameters."""
        return len(params) == len(self.params) and all(a is b for a, b in zip(params, self.params))

    def zero_(self) -> None:
        for g in self.groups:
            g.rows.zero_()

    def backward(self, task: int, loss: torch.Tensor, retain_graph: bool) -> None:
        """Accumulate the gradient of ``loss`` into row ``task``."""
        for g in self.groups:
            for p, view in zip(g.params, g.row_views[task]):
                p.grad = view
        torch.autograd.backward(loss, retain_graph=retain_graph, inputs=self.params)
        self.release_grads()

    def release_grads(self) -> None:
        """Detach the parameters from the buffers (``.grad = None``)."""
        for p in self.params:
            p.grad = None

    def _select(self, rows: torch.Tensor, tasks: Sequence[int]) -> torch.Tensor:
        # fancy indexing copies: a contiguous run of tasks (all of them, or the single task
        # a momentum method back-propagated) is a view
        idx = list(tasks)
        if idx == list(range(idx[0], idx[-1] + 1)):
            return rows[idx[0] : idx[-1] + 1]
        return rows[idx]

    def gram(self, tasks: Sequence[int]) -> torch.Tensor:
        """The ``(m, m)`` Gram matrix of the given rows, in float64 on the CPU."""
        total = None
        for g in self.groups:
            rows = self._select(g.rows, tasks)
            part = (rows @ rows.T).double()
            total = part if total is None else total + part
        return total.cpu()

    def matrix(self, tasks: Sequence[int]) -> torch.Tensor:
        """The ``(m, numel)`` gradient matrix of the given rows (a copy if several groups)."""
        parts = [self._select(g.rows, tasks).to(self.dtype) for g in self.groups]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def all_reduce_mean_(self, tasks: Sequence[int]) -> None:
        """Average the given rows over the DDP ranks: one collective per parameter group.

        Rows are contiguous in memory, so a contiguous range of tasks (all of them, or
        one) is reduced in place; any other subset goes through one packed copy.
        """
        idx = sorted(tasks)
        world = torch.distributed.get_world_size()
        for g in self.groups:
            if idx == list(range(idx[0], idx[-1] + 1)):
                block = g.rows[idx[0] : idx[-1] + 1]
                torch.distributed.all_reduce(block, op=torch.distributed.ReduceOp.SUM)
                block.div_(world)
            else:
                packed = g.rows[idx]
                torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.SUM)
                g.rows[idx] = packed / world

    def apply_weights(self, tasks: Sequence[int], weights: torch.Tensor) -> None:
        """Set every parameter's ``.grad`` to ``sum_i weights[i] * row[tasks[i]]``."""
        idx = list(tasks)
        for g in self.groups:
            w = weights.to(device=g.rows.device, dtype=g.rows.dtype)
            if len(idx) == 1 and float(weights[0]) == 1.0:
                views = g.row_views[idx[0]]
            else:
                torch.mv(self._select(g.rows, idx).T, w, out=g.update)
                views = g.update_views
            for p, view in zip(g.params, views):
                p.grad = view

    def apply_update(self, update: torch.Tensor) -> None:
        """Set every parameter's ``.grad`` from a flat update vector over all groups."""
        offset = 0
        for g in self.groups:
            n = g.update.numel()
            g.update.copy_(update[offset : offset + n])
            offset += n
            for p, view in zip(g.params, g.update_views):
                p.grad = view
