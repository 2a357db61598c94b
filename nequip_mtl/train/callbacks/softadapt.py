"""SoftAdapt loss weighting (correct drop-in for nequip's ``SoftAdapt``)."""

from __future__ import annotations

from collections.abc import Mapping

from ...weighting.common import check_choice, check_finite
from ...weighting.softadapt import SOFTADAPT_VARIANTS, softadapt_weights
from ._history import AdaptiveWeightingCallback


class SoftAdapt(AdaptiveWeightingCallback):
    """Adapt loss coefficients with `SoftAdapt <https://arxiv.org/abs/1912.12355>`_.

    Once per ``interval`` the training loss components ``L_k`` are observed (the epoch
    loss at the start of the next epoch, or the step loss after each optimizer step);
    each observation after the first gives candidate weights from the slopes
    ``s_k = L_k(t) - L_k(t-1)`` (see ``variant``), combined with the user's coefficients
    (see ``scale_by``). Every ``frequency`` candidates, their mean becomes the new
    coefficients (normalised to sum to 1). Components whose ``coeff`` is ``null`` are not
    touched.

    With gradient accumulation and ``interval: batch``, one observation is one *optimizer*
    step: the mean of its micro-batch losses, taken after the step; ``frequency`` counts
    optimizer steps and an update applies to every micro-batch of the following steps
    (nequip's callback updates at every micro-batch, from the single previous micro-batch).

    Compared with nequip's ``SoftAdapt``: ``frequency: 1`` updates on every observation
    (nequip's never updates), the mean covers all ``frequency`` candidates of the cycle
    (nequip's uses only the last one of a cycle and the first of the next), and by default
    the candidates are scaled by the user's *initial* coefficients (nequip scales by the
    current ones, so updates compound). With ``scale_by: current`` and the default
    variant, ``frequency: 2`` reproduces nequip's coefficients exactly.

    .. code-block:: yaml

        callbacks:
          - _target_: nequip_mtl.train.callbacks.SoftAdapt
            beta: 1.1
            interval: epoch
            frequency: 5
            # optional:
            variant: l2_normalized   # original | normalized | loss_weighted
            scale_by: initial        # current (nequip's behaviour) | none (the paper)

    Args:
        beta (float): SoftAdapt's ``beta``; > 0 favours the components whose loss
            decreases least
        interval (str): ``epoch`` or ``batch``
        frequency (int): number of observations averaged into one update (>= 1)
        eps (float): guard against division by zero (default ``1e-8``)
        variant (str): ``l2_normalized`` (nequip's: slopes divided by their L2 norm;
            default), ``original`` (raw slopes), ``normalized`` (slopes divided by the sum
            of their absolute values), ``loss_weighted`` (softmax numerators multiplied by
            the mean observed loss of each component)
        scale_by (str): ``initial`` (default), ``current`` or ``none``
    """

    def __init__(
        self,
        beta: float,
        interval: str,
        frequency: int,
        eps: float = 1e-8,
        variant: str = "l2_normalized",
        scale_by: str = "initial",
    ):
        self.beta = check_finite(beta, "SoftAdapt.beta")
        self.eps = check_finite(eps, "SoftAdapt.eps", positive=True)
        self.variant = check_choice(variant, SOFTADAPT_VARIANTS, "SoftAdapt.variant")
        super().__init__(interval, frequency, scale_by)

    def _candidate(self, prev: Mapping[str, float], new: Mapping[str, float]) -> dict[str, float]:
        return softadapt_weights(prev, new, self.beta, self.variant, self.eps)
