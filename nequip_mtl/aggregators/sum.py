"""Sum: the coefficient-weighted sum of the task gradients (nequip's default update)."""

from __future__ import annotations

import torch

from ._linalg import check_coeffs, check_gram
from .base import GramAggregator


class Sum(GramAggregator):
    r"""The coefficient-weighted sum of the task gradients, :math:`u = \sum_i c_i g_i`.

    This is the gradient of nequip's ``weighted_sum`` loss: with the normalised loss
    coefficients (as :class:`nequip.train.NequIPLightningModule` and the training module
    pass them, summing to 1 over the loss components that have a ``coeff``), it is
    exactly the update plain nequip training applies. It is the baseline against which
    every other aggregator should be compared.

    **Coefficients** are the weights themselves: ``weights = coeffs``, used as given
    (no renormalisation: if the training module leaves a component out of a step, the
    remaining coefficients are not rescaled).

    **Guarantee.** None beyond being the gradient of the weighted loss: conflicting
    task gradients can make the update increase some task's loss, and the components
    with the largest ``coeff * |gradient|`` dominate its direction.

    **Cost.** One gradient per task (``m`` backward passes) and the weighted sum; no
    extra work.

    Example:

    .. code-block:: yaml

        training_module:
          _target_: nequip_mtl.train.MultitaskLightningModule
          aggregator:
            _target_: nequip_mtl.aggregators.Sum
    """

    def weights(
        self, gram: torch.Tensor, coeffs: torch.Tensor, source_dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        coeffs = check_coeffs(coeffs.detach().cpu(), type(self).__name__)
        check_gram(gram, coeffs.shape[0], type(self).__name__)
        return coeffs.to(gram.device)

    def aggregate(self, grads: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
        check_coeffs(coeffs.detach().cpu(), type(self).__name__)
        return coeffs.to(grads.dtype) @ grads
