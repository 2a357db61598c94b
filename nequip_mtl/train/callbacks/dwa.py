"""Dynamic Weight Average loss weighting."""

from __future__ import annotations

from collections.abc import Mapping

from ...weighting.common import check_finite
from ...weighting.dwa import dwa_weights
from ._history import AdaptiveWeightingCallback


class DynamicWeightAverage(AdaptiveWeightingCallback):
    """Adapt loss coefficients with Dynamic Weight Average (Liu, Johns & Davison 2019).

    Once per ``interval`` the training loss components are observed; each observation
    after the first gives candidate weights ``softmax(r / temperature)`` of the loss
    ratios ``r_k = L_k(t) / L_k(t-1)`` (a component whose loss falls more slowly gets more
    weight), combined with the user's coefficients per ``scale_by``; every ``frequency``
    candidates their mean becomes the new coefficients (normalised to sum to 1). The paper
    updates once per epoch with ``temperature: 2``.

    With gradient accumulation and ``interval: batch``, one observation is one *optimizer*
    step (the mean of its micro-batch losses, taken after the step) and ``frequency``
    counts optimizer steps, as for :class:`SoftAdapt`.

    .. code-block:: yaml

        callbacks:
          - _target_: nequip_mtl.train.callbacks.DynamicWeightAverage
            temperature: 2.0
            interval: epoch
            frequency: 1
            scale_by: initial   # current | none (the paper)

    Args:
        temperature (float): softmax temperature ``T`` (> 0; default 2)
        interval (str): ``epoch`` (default) or ``batch``
        frequency (int): number of observations averaged into one update (default 1)
        eps (float): guard against division by zero (default ``1e-8``)
        scale_by (str): ``initial`` (default), ``current`` or ``none``
    """

    def __init__(
        self,
        temperature: float = 2.0,
        interval: str = "epoch",
        frequency: int = 1,
        eps: float = 1e-8,
        scale_by: str = "initial",
    ):
        self.temperature = check_finite(
            temperature, "DynamicWeightAverage.temperature", positive=True
        )
        self.eps = check_finite(eps, "DynamicWeightAverage.eps", positive=True)
        super().__init__(interval, frequency, scale_by)

    def _candidate(self, prev: Mapping[str, float], new: Mapping[str, float]) -> dict[str, float]:
        return dwa_weights(prev, new, self.temperature, self.eps)
