"""PrimaryConstrained: descend on the primary tasks, the other tasks only constrain (GEM)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._common import QPAggregator, SolverAggregator
from ._linalg import ScaledGram, nnls_gram


class PrimaryConstrained(QPAggregator, SolverAggregator):
    r"""The primary tasks' gradient, changed as little as needed not to conflict with the others.

    Made for fine-tuning with replay: the new data is the *primary* task, the replayed
    data (or any other task) only *constrains* the update. With the primary gradient
    :math:`g_p = \sum_{i \in P} c_i g_i` (the coefficient-weighted sum of the primary
    tasks' gradients) and the gradients :math:`g_c` of the other tasks, the update is

    .. math::  u = \operatorname*{arg\,min}_{u}\ \lVert u - g_p \rVert^2
        \quad\text{s.t.}\quad u \cdot g_c \ge 0 \ \text{ for every constraint } c,

    the projection of :math:`g_p` onto the dual cone of the constraint gradients. This is
    the quadratic program of GEM (`Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory
    for Continual Learning" <https://arxiv.org/abs/1706.08840>`_), whose constraints are
    the gradients of past tasks; with one constraint it is the A-GEM rule (`Chaudhry et
    al. 2019 <https://arxiv.org/abs/1812.00420>`_): if :math:`g_p \cdot g_r < 0`,
    :math:`u = g_p - \frac{g_p \cdot g_r}{\lVert g_r \rVert^2}\, g_r`, else :math:`u = g_p`.
    It is solved in Gram space, :math:`u = g_p + \sum_c \lambda_c g_c` with
    :math:`\lambda \ge 0` from the dual (a non-negative least-squares problem on the
    constraints' cosine matrix, solved exactly by the shared active-set solver), so
    gradient norm ratios of :math:`10^4` cost no accuracy.

    **Guarantee.** For every constraint task, :math:`u \cdot g_c \ge 0`: to first order
    the step does not increase any constraint's loss. :math:`u = g_p` exactly (weights
    ``c_i`` on the primaries, ``0`` on the constraints) when :math:`g_p` conflicts with
    no constraint, and otherwise :math:`u` is the closest such vector to :math:`g_p`
    (the minimal change). The update never conflicts with the primary gradient either,
    :math:`u \cdot g_p = \lVert u \rVert^2 \ge 0`, and is no longer than it. With
    several primaries only their sum is protected, not each one. Positively homogeneous
    (scaling all gradients by :math:`t > 0` scales :math:`u` by :math:`t`, at any scale:
    every tolerance is relative); rescaling a constraint's gradient changes nothing (a
    constraint is a direction); the update does not depend on the order of the tasks. :math:`u = 0` when :math:`g_p` is zero or
    points straight against the constraints (e.g. antiparallel to one of them). Task
    gradients of (numerically) zero norm impose no constraint and get weight 0.

    **Coefficients.** Those of the primaries weight their gradients in :math:`g_p`, as
    given (the training module passes the loss coefficients normalised to sum 1 over all
    tasks, so a constraint's ``coeff`` still sets the primary's share through the
    normalisation). A constraint's own coefficient does not enter: ``coeff: 0`` keeps it
    as a constraint; to remove a task, set its ``coeff`` to ``null``.

    **Naming the primary tasks.** ``primary`` is a task name, a position, or a list of
    them. Names need the training module to name the tasks through
    :meth:`~nequip_mtl.aggregators.Aggregator.set_tasks`; positions count the tasks in
    the order the aggregator receives them (the loss components with a ``coeff``, in the
    loss's order), and with ``set_tasks`` in the order of its ``names``, whichever tasks
    a step leaves out (without it, a task left out of a step for a zero gradient shifts
    the positions after it; a position beyond the rows is an error). A step on which no primary task has a gradient (e.g. a batch
    without frames of the new dataset) gives :math:`u = 0`.

    **Cost.** One gradient per task (``m`` backward passes), plus one QP with one variable
    per constraint (none when nothing conflicts).

    Example (fine-tuning on ``new`` with ``pretrain`` replayed, one task per dataset; the
    per-component form works alike, e.g. ``primary: [new/forces_mse, new/total_energy_mse]``):

    .. code-block:: yaml

        training_module:
          _target_: nequip_mtl.train.MultitaskLightningModule
          aggregator:
            _target_: nequip_mtl.aggregators.PrimaryConstrained
            primary: new

    or, by position (the first task, here the forces, primary; energy and stress constrain):

    .. code-block:: yaml

        training_module:
          _target_: nequip_mtl.train.MultitaskLightningModule
          loss:
            _target_: nequip.train.EnergyForceStressLoss
            coeffs: {forces: 1.0, total_energy: 1.0, stress: 1.0}
          aggregator:
            _target_: nequip_mtl.aggregators.PrimaryConstrained
            primary: 0

    Args:
        primary (str, int or list): the primary task(s), by name or by position (default
            ``0``, the first task)
        rtol (float, optional): a constraint gradient whose squared sine with the span of
            the constraints already in the QP solution is below ``rtol`` counts as
            linearly dependent on them (it is left out rather than given huge weights);
            default: ``eps`` of the gradients' dtype (``1.2e-7`` for float32), at least
            ``1e-13``
    """

    def __init__(self, primary: str | int | Sequence[str | int] = 0, rtol: float | None = None):
        super().__init__(rtol)
        self.primary = _check_primary(primary)
        self._names: list[str] | None = None
        self._positions: set[int] = set()  # the primaries' positions in `_names`
        self._present: list[int] | None = None

    def set_tasks(self, names: Sequence[str], present: Sequence[int] | None = None) -> None:
        """Name the tasks (see :meth:`Aggregator.set_tasks`) and resolve ``primary``.

        Raises ``ValueError`` for a ``primary`` name that is not a task, a position beyond
        the tasks, or a ``primary`` that leaves no task to constrain the update.
        """
        names = _check_names(names)
        positions = set()
        for p in self.primary:
            if isinstance(p, str):
                if p not in names:
                    raise ValueError(
                        f"PrimaryConstrained: `aggregator.primary` names the task {p!r}, which "
                        f"is not one of the tasks {names}; name one of them or give a position"
                    )
                positions.add(names.index(p))
            else:
                positions.add(_check_position(p, len(names), "of the tasks"))
        if len(positions) == len(names) and len(names) > 1:
            raise ValueError(
                f"PrimaryConstrained: `aggregator.primary`={self.primary!r} makes every task "
                f"({names}) primary, so nothing constrains the update (that is "
                "nequip_mtl.aggregators.Sum); leave the constraint tasks out of `primary`"
            )
        if present is None:
            present = list(range(len(names)))
        else:
            present = [_check_position(t, len(names), "in `names`") for t in present]
            if len(set(present)) != len(present):
                raise ValueError(f"PrimaryConstrained.set_tasks: repeated positions {present}")
        self._names, self._positions, self._present = names, positions, present

    def _primary_rows(self, m: int) -> list[int]:
        if self._present is None:  # no names: positions count the rows
            named = [p for p in self.primary if isinstance(p, str)]
            if named:
                raise ValueError(
                    f"PrimaryConstrained: `aggregator.primary` names tasks ({named}) but the "
                    "training module did not name the tasks (Aggregator.set_tasks); give their "
                    "positions instead, e.g. `primary: 0` for the first task"
                )
            return sorted({_check_position(p, m, "of the tasks") for p in self.primary})
        if len(self._present) != m:
            raise ValueError(
                f"PrimaryConstrained: set_tasks announced {len(self._present)} gradient rows "
                f"({[self._names[t] for t in self._present]}), but {m} were given; call "
                "set_tasks before every aggregation whose tasks change"
            )
        return [row for row, t in enumerate(self._present) if t in self._positions]

    def _solve(self, gram: torch.Tensor, coeffs: torch.Tensor, rtol: float) -> torch.Tensor:
        m = gram.shape[0]
        is_primary = torch.zeros(m, dtype=torch.bool)
        is_primary[self._primary_rows(m)] = True
        # the primaries keep their coefficients exactly: u = g_p when nothing conflicts
        w = torch.where(is_primary, coeffs, torch.zeros_like(coeffs))
        sg = ScaledGram(gram)
        primary_active = is_primary[sg.active]
        cons = (~primary_active).nonzero().flatten()
        # y: weights of the unit rows, g_p = sum_i y_i a_i over the active primaries
        y_p = torch.where(primary_active, coeffs[sg.active] * sg.n, torch.zeros_like(sg.n))
        if cons.numel() == 0 or not bool((y_p != 0).any()):
            return w
        # dual of min |A_p^T y_p + A_c^T z|^2 over z >= 0: NNLS on the constraints' cosines
        k_c = sg.cos[cons]
        z = nnls_gram(k_c[:, cons], -(k_c @ y_p), rtol)
        w[sg.active[cons]] = z / sg.n[cons]
        return w


def _check_primary(primary) -> list[str | int]:
    items = (
        list(primary)
        if isinstance(primary, Sequence) and not isinstance(primary, str)
        else [primary]
    )
    if not items:
        raise ValueError("PrimaryConstrained: `aggregator.primary` is empty; name a task")
    for p in items:
        ok_int = isinstance(p, int) and not isinstance(p, bool) and p >= 0
        if not (ok_int or (isinstance(p, str) and p)):
            raise TypeError(
                "PrimaryConstrained: `aggregator.primary` must be a task name, a position "
                f"(an int >= 0) or a list of them, got {primary!r}"
            )
    if len(set(items)) != len(items):
        raise ValueError(f"PrimaryConstrained: `aggregator.primary` repeats a task: {items!r}")
    return items


def _check_names(names) -> list[str]:
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"PrimaryConstrained.set_tasks: `names` must be a list, got {names!r}")
    names = list(names)
    if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise ValueError(
            f"PrimaryConstrained.set_tasks: task names must be distinct strings, got {names}"
        )
    return names


def _check_position(p, num: int, where: str) -> int:
    if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < num:
        raise ValueError(
            f"PrimaryConstrained: position {p!r} is not one {where} (0 to {num - 1}); "
            "check `aggregator.primary`"
        )
    return p
