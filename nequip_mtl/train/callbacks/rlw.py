"""Random Loss Weighting."""

from __future__ import annotations

import random
from typing import Any

import lightning
import torch

from ...weighting.common import check_choice, check_finite, scale_weights
from ...weighting.rlw import RLW_DISTRIBUTIONS, sample_rlw_weights
from ..coefficients import update_coeffs
from ._common import (
    IntervalCallback,
    WeightingCallback,
    active_names,
    check_coeff_writer_allowed,
    check_interval,
    check_positive_int,
    current_coeffs,
    loss_manager,
    single_adaptive_callback,
)


class RandomLossWeighting(IntervalCallback, WeightingCallback):
    """Random Loss Weighting (RLW; Lin et al., TMLR 2022): resample the loss coefficients
    at random every ``frequency`` optimizer steps (or epochs).

    With gradient accumulation a draw is made once per optimizer step, at the first
    micro-batch of its accumulation window (``frequency`` counts optimizer steps), so all
    micro-batches of a step share one draw.

    Each draw is ``softmax(z)`` with ``z_k ~ N(0, std^2)`` (``distribution: normal``, the
    paper's default), ``z_k ~ U(0, 1)`` (``uniform``), or a ``Dirichlet(alpha)`` sample
    (``dirichlet``), over the active loss components. With ``scale_by: initial`` (default)
    the draw is multiplied by the user's initial coefficients and renormalised, so equal
    user coefficients give the paper's RLW and unequal ones bias the draws accordingly;
    ``scale_by: none`` ignores them. RLW is deliberately *not* adaptive: it is the
    baseline that adaptive schemes should beat.

    The random stream is seeded by ``seed`` (default: ``torch.initial_seed()``, i.e. the
    run's ``seed``) and saved in checkpoints, so a resumed run draws the same weights as
    an uninterrupted one. In multi-process (DDP) runs every rank must draw the same
    weights: give ``seed``, or seed all ranks identically (nequip's ``seed`` does).

    .. code-block:: yaml

        callbacks:
          - _target_: nequip_mtl.train.callbacks.RandomLossWeighting
            interval: batch
            frequency: 1
            distribution: normal
            std: 1.0
            seed: 123

    Args:
        interval (str): ``batch`` (default) or ``epoch``
        frequency (int): resample every ``frequency`` intervals (default 1)
        distribution (str): ``normal`` (default), ``uniform`` or ``dirichlet``
        std (float): standard deviation for ``normal`` (default 1)
        alpha (float): concentration for ``dirichlet`` (default 1)
        scale_by (str): ``initial`` (default) or ``none``
        seed (int, optional): seed of the random stream
    """

    def __init__(
        self,
        interval: str = "batch",
        frequency: int = 1,
        distribution: str = "normal",
        std: float = 1.0,
        alpha: float = 1.0,
        scale_by: str = "initial",
        seed: int | None = None,
    ):
        cls = "RandomLossWeighting"
        self.interval = check_interval(interval, f"{cls}.interval")
        self.frequency = check_positive_int(frequency, f"{cls}.frequency")
        self.distribution = check_choice(distribution, RLW_DISTRIBUTIONS, f"{cls}.distribution")
        self.std = check_finite(std, f"{cls}.std", positive=True)
        self.alpha = check_finite(alpha, f"{cls}.alpha", positive=True)
        if scale_by == "current":
            raise ValueError(
                f"`{cls}.scale_by` must be 'initial' or 'none'; 'current' would multiply "
                "random draws into each other (a random walk towards a single term)"
            )
        self.scale_by = check_choice(scale_by, ("initial", "none"), f"{cls}.scale_by")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"`{cls}.seed` must be an integer or null, got {seed!r}")
        self.seed = seed
        self.rng: random.Random | None = None if seed is None else random.Random(seed)
        self.initial_coeffs: dict[str, float | None] | None = None

    def setup(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, stage: str
    ) -> None:
        """"""
        if stage != "fit":
            return
        manager = loss_manager(pl_module, "RandomLossWeighting")
        check_coeff_writer_allowed(pl_module, "RandomLossWeighting")
        single_adaptive_callback(trainer, self, WeightingCallback)
        if self.initial_coeffs is None:
            self.initial_coeffs = current_coeffs(manager)
        if self.rng is None:
            self.rng = random.Random(torch.initial_seed())

    def _on_interval(self, pl_module: lightning.LightningModule, at: int) -> None:
        if at % self.frequency != 0:
            return
        manager = pl_module.loss
        names = active_names(manager)
        if not names:
            return
        assert self.rng is not None
        weights = sample_rlw_weights(names, self.rng, self.distribution, self.std, self.alpha)
        weights = scale_weights(
            weights, self.scale_by, self.initial_coeffs, current_coeffs(manager)
        )
        update_coeffs(manager, weights, "RandomLossWeighting")

    def state_dict(self) -> dict[str, Any]:
        """"""
        return {
            "rng_state": None if self.rng is None else self.rng.getstate(),
            "initial_coeffs": None if self.initial_coeffs is None else dict(self.initial_coeffs),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """"""
        if state_dict.get("rng_state") is not None:
            self.rng = random.Random()
            version, internal, gauss_next = state_dict["rng_state"]
            self.rng.setstate((version, tuple(internal), gauss_next))
        initial = state_dict.get("initial_coeffs")
        self.initial_coeffs = None if initial is None else dict(initial)
