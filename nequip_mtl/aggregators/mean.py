"""Mean: the plain average of the task gradients (baseline)."""

from __future__ import annotations

import torch

from ._linalg import check_coeffs, check_gram
from .base import GramAggregator


class Mean(GramAggregator):
    r"""The unweighted average of the task gradients, :math:`u = \frac1m \sum_i g_i`.

    **Coefficients are ignored**: every task gets weight :math:`1/m` whatever its loss
    coefficient. Use :class:`Sum` for the coefficient-weighted sum (nequip's default).

    **Guarantee.** None beyond being the gradient of the mean loss: with conflicting
    task gradients the update can increase some task's loss, and the task with the
    largest gradient norm (forces, for most MLIPs) dominates the direction.

    **Cost.** One gradient per task (``m`` backward passes) and the weighted sum; no
    extra work (the Gram matrix is not needed, though the training module computes it
    for its logs anyway).

    Example:

    .. code-block:: yaml

        training_module:
          _target_: nequip_mtl.train.MultitaskLightningModule
          aggregator:
            _target_: nequip_mtl.aggregators.Mean
    """

    def weights(
        self, gram: torch.Tensor, coeffs: torch.Tensor, source_dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        coeffs = check_coeffs(coeffs.detach().cpu(), type(self).__name__)
        m = coeffs.shape[0]
        check_gram(gram, m, type(self).__name__)
        return torch.full((m,), 1.0 / max(m, 1), dtype=torch.float64, device=gram.device)

    def aggregate(self, grads: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
        return grads.mean(dim=0)
