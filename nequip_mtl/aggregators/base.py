"""The aggregator interface: many task gradients in, one update out.

Pure torch: nothing here imports Lightning or nequip.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ._linalg import gram_matrix, raise_if_nonfinite


class Aggregator:
    """Maps a ``(num_tasks, num_params)`` gradient matrix to one ``(num_params,)`` update.

    Calling an aggregator is the whole public contract::

        update = aggregator(grads, coeffs)  # grads: (m, N), coeffs: (m,) or None

    ``coeffs`` are the (normalised, non-negative) loss coefficients of the tasks, in the
    same order as the rows of ``grads``; each aggregator documents how it uses them.
    ``None`` means equal coefficients.

    Most methods in the multitask literature choose the update as a combination
    ``update = w @ grads`` whose weights ``w`` depend on the gradients only through their
    Gram matrix ``grads @ grads.T``. Such aggregators subclass :class:`GramAggregator`
    and implement :meth:`GramAggregator.weights`; the training module then needs one
    ``m x m`` Gram matrix and one ``m``-term combination per step, whatever the method.
    Aggregators that need the matrix itself (e.g. stateful momentum methods) subclass
    :class:`Aggregator` directly and override :meth:`aggregate`.

    Stateful aggregators override :meth:`state_dict` and :meth:`load_state_dict`; the
    training module stores that state in checkpoints.

    Your own aggregator (any importable subclass) is used like the built-in ones:

    .. code-block:: yaml

        training_module:
          _target_: nequip_mtl.train.MultitaskLightningModule
          aggregator:
            _target_: my_package.MyAggregator   # a subclass of nequip_mtl.aggregators.Aggregator
    """

    def __call__(self, grads: torch.Tensor, coeffs: torch.Tensor | None = None) -> torch.Tensor:
        if grads.dim() != 2:
            raise ValueError(
                f"{type(self).__name__} expects a (num_tasks, num_params) gradient matrix, "
                f"got shape {tuple(grads.shape)}"
            )
        if type(self).aggregate is not GramAggregator.aggregate:
            # Gram-based aggregation checks the diagonal of the Gram matrix it computes
            # anyway (see `gram_matrix`); others look at the row norms, a cheap reduction
            raise_if_nonfinite(grads, torch.linalg.vector_norm(grads, dim=1), type(self).__name__)
        return self.aggregate(grads, _coeffs_or_uniform(coeffs, grads))

    def aggregate(self, grads: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
        """Return the ``(num_params,)`` update for ``grads`` (m, N) and ``coeffs`` (m,)."""
        raise NotImplementedError

    def select_tasks(self, num_tasks: int) -> list[int] | None:
        """Which of the ``num_tasks`` active tasks to back-propagate on the next step.

        ``None`` (the default) means all of them. Methods that save backward passes
        (e.g. :class:`~nequip_mtl.aggregators.MomentumConFIG`) return a subset; the
        training module then calls :meth:`aggregate_subset` with only those gradients.
        Called once per optimizer step (per accumulation window).
        """
        return None

    def aggregate_subset(
        self, grads: torch.Tensor, coeffs: torch.Tensor, computed: list[int]
    ) -> torch.Tensor:
        """The update when only the tasks ``computed`` (positions in ``coeffs``) have
        gradients, given as the rows of ``grads`` in that order."""
        if list(computed) != list(range(len(coeffs))):
            raise NotImplementedError(
                f"{type(self).__name__} needs the gradients of every task on every step"
            )
        return self.aggregate(grads, coeffs)

    def reset(self) -> None:
        """Forget any state (called when the set of active tasks changes)."""

    def set_tasks(self, names: Sequence[str], present: Sequence[int] | None = None) -> None:
        """Tell the aggregator which tasks the rows of the next calls are (default: ignored).

        A hook for training modules. ``names`` are the names of all the tasks (the active
        loss components, in the module's order); ``present`` are the positions in
        ``names`` of the tasks whose gradients are the rows of the next calls, in row
        order (``None``: all of them, in order). A module that leaves tasks out of a step
        (a zero or non-finite gradient) calls it before every aggregation, with that
        step's ``present``. Most aggregators treat all tasks alike and ignore it; those
        that refer to tasks by name (:class:`~nequip_mtl.aggregators.PrimaryConstrained`)
        use it.
        """

    def state_dict(self) -> dict[str, Any]:
        """State to carry across checkpoint restarts (empty for stateless methods)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state returned by :meth:`state_dict`."""
        if state:
            raise ValueError(f"{type(self).__name__} is stateless but got state {list(state)}")

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


class GramAggregator(Aggregator):
    """An aggregator whose update is ``weights(gram, coeffs) @ grads``.

    Subclasses implement :meth:`weights`, which receives the ``(m, m)`` Gram matrix
    ``grads @ grads.T`` and the coefficients, both in float64 (on any device, usually the
    CPU), and returns the ``(m,)``
    combination weights in float64. Working in Gram space keeps the per-step cost of any
    such method at one Gram matrix plus one weighted sum of gradient rows, and lets the
    small linear algebra run in float64 even for float32 models.

    A minimal example, the plain mean (``weights = 1/m``), and its use:

    .. code-block:: python

        class MyMean(GramAggregator):
            def weights(self, gram, coeffs, source_dtype=torch.float64):
                return torch.full_like(coeffs, 1.0 / len(coeffs))

    .. code-block:: yaml

        training_module:
          _target_: nequip_mtl.train.MultitaskLightningModule
          aggregator:
            _target_: my_package.MyMean
    """

    def aggregate(self, grads: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
        gram = gram_matrix(grads, type(self).__name__)  # float64; raises on NaN/inf rows
        w = self.weights(gram, coeffs.double(), source_dtype=grads.dtype)
        return w.to(grads.dtype) @ grads

    def weights(
        self, gram: torch.Tensor, coeffs: torch.Tensor, source_dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        """Return the ``(m,)`` float64 weights of the task gradients in the update.

        ``source_dtype`` is the dtype the gradients (and so the Gram entries) were
        computed in; it sets how small an eigenvalue is indistinguishable from zero.
        """
        raise NotImplementedError


def _coeffs_or_uniform(coeffs: torch.Tensor | None, grads: torch.Tensor) -> torch.Tensor:
    m = grads.shape[0]
    if coeffs is None:
        return torch.full((m,), 1.0 / m, dtype=grads.dtype, device=grads.device)
    coeffs = torch.as_tensor(coeffs, device=grads.device)
    if coeffs.shape != (m,):
        raise ValueError(
            f"coeffs must have shape ({m},) to match the gradients, got {tuple(coeffs.shape)}"
        )
    return coeffs
