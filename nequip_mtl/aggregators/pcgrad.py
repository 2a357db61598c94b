"""PCGrad: projecting conflicting gradients (Yu et al., NeurIPS 2020)."""

from __future__ import annotations

from typing import Any

import torch

from ._common import SolverAggregator
from ._linalg import ZERO_NORM_RTOL, symmetrized


class PCGrad(SolverAggregator):
    r"""Gradient surgery (`PCGrad <https://arxiv.org/abs/2001.06782>`_, Yu et al. 2020).

    For every task :math:`i`, start from :math:`g_i^{PC} = g_i` and visit the other
    tasks :math:`j \ne i` in a fresh random order; whenever
    :math:`g_i^{PC} \cdot g_j < 0`, remove the conflicting component,
    :math:`g_i^{PC} \leftarrow g_i^{PC} - \frac{g_i^{PC} \cdot g_j}{\|g_j\|^2} g_j`
    (always against the *original* :math:`g_j`, as in Algorithm 1 of the paper). The
    update is :math:`u = \sum_i c_i\, g_i^{PC}`.

    **Coefficients** weight the projected gradients, so with equal coefficients
    :math:`1/m` the update is the mean of the projected gradients and, when no pair of
    tasks conflicts, PCGrad equals :class:`Sum` (the plain weighted sum). Because the
    projection is linear in :math:`g_i` and the conflict test only looks at signs,
    this is the same as running PCGrad on the scaled gradients :math:`c_i g_i`. A task
    with coefficient 0 adds nothing to the update but is still projected against.

    **Guarantee.** For two conflicting tasks each projected gradient is orthogonal to
    the other task's gradient, so :math:`u \cdot g_i = c_i \|g_i\|^2 \sin^2\theta \ge 0`:
    the update does not conflict with either task. For three or more tasks there is
    no such guarantee (use :class:`UPGrad` or :class:`DualProj` for one), and the
    update is not invariant to the order of the tasks.
    The visiting order makes the update random for :math:`m \ge 3`; it is reproducible
    from ``seed``, and the generator state is saved in checkpoints
    (:meth:`state_dict`), so a resumed run draws the same orders.

    **Cost.** One gradient per task (``m`` backward passes). Everything is done in Gram
    space: each projected gradient is a combination :math:`G^\top v_i` whose
    coefficients are updated from the Gram matrix, so beyond the ``m x m`` Gram matrix
    and the final weighted sum there is no work on ``N``-sized vectors (``O(m^3)``
    scalar operations, negligible).

    Example:

    .. code-block:: yaml

        training_module:
          _target_: nequip_mtl.train.MultitaskLightningModule
          aggregator:
            _target_: nequip_mtl.aggregators.PCGrad
            seed: 0

    Args:
        seed (int): seed of the generator of the random task orders (default ``0``)
    """

    def __init__(self, seed: int = 0):
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"PCGrad: `seed` must be an int, got {seed!r}")
        if seed < 0:
            raise ValueError(f"PCGrad: `seed` must be >= 0, got {seed!r}")
        self.seed = seed
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(seed)

    def _solve(self, gram: torch.Tensor, coeffs: torch.Tensor, rtol: float) -> torch.Tensor:
        m = gram.shape[0]
        # one random order per task, drawn on every call whatever the gradients, so the
        # generator advances identically on every rank and after any restart
        orders = [torch.randperm(m, generator=self._generator).tolist() for _ in range(m)]
        h = symmetrized(gram).tolist()
        sq = [max(h[j][j], 0.0) for j in range(m)]
        largest = max(sq)
        usable = [s > 0.0 and s > largest * ZERO_NORM_RTOL**2 for s in sq]
        c = coeffs.tolist()
        weights = [0.0] * m
        for i in range(m):
            v = [0.0] * m
            v[i] = 1.0
            hv = [h[k][i] for k in range(m)]  # H @ v, kept up to date
            for j in orders[i]:
                if j == i or not usable[j]:
                    continue
                dot = hv[j]  # g_i^PC . g_j
                if dot < 0.0:
                    step = dot / h[j][j]
                    v[j] -= step
                    for k in range(m):
                        hv[k] -= step * h[k][j]
            for k in range(m):
                weights[k] += c[i] * v[k]
        return torch.tensor(weights, dtype=torch.float64)

    def state_dict(self) -> dict[str, Any]:
        """The generator state (a ``uint8`` tensor), so restarts draw the same orders."""
        return {"rng_state": self._generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"rng_state"}:
            raise ValueError(
                f"PCGrad.load_state_dict expects exactly the key 'rng_state', got {sorted(state)}"
            )
        rng_state = state["rng_state"]
        if not isinstance(rng_state, torch.Tensor) or rng_state.dtype != torch.uint8:
            raise TypeError(
                f"PCGrad.load_state_dict: 'rng_state' must be a uint8 tensor, got {rng_state!r}"
            )
        self._generator.set_state(rng_state.cpu())
