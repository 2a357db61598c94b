"""SoftAdapt weights from two consecutive loss observations (Heydari et al. 2019,
arXiv:1912.12355).

With slopes ``s_k = L_k(t) - L_k(t-1)``, the variants are

- ``l2_normalized`` (nequip's ``SoftAdapt``): ``w = softmax(beta * s / max(||s||_2, eps))``
- ``original`` (the paper's basic form): ``w = softmax(beta * s)``
- ``normalized`` (the paper's normalised slopes): ``w = softmax(beta * s / max(sum_l |s_l|, eps))``
- ``loss_weighted`` (the paper's loss-weighted form):
  ``w_k = f_k exp(beta s_k) / sum_l f_l exp(beta s_l)`` with ``f_k`` the mean of the two
  observed values of ``L_k``

A positive ``beta`` gives more weight to the components whose loss decreases least.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from .common import check_choice, softmax

SOFTADAPT_VARIANTS = ("l2_normalized", "original", "normalized", "loss_weighted")


def softadapt_weights(
    prev: Mapping[str, float],
    new: Mapping[str, float],
    beta: float,
    variant: str = "l2_normalized",
    eps: float = 1e-8,
) -> dict[str, float]:
    """SoftAdapt weights (summing to 1) for the names of ``new``, from ``prev`` to ``new``."""
    check_choice(variant, SOFTADAPT_VARIANTS, "variant")
    names = list(new)
    slopes = {k: float(new[k]) - float(prev[k]) for k in names}
    if variant == "l2_normalized":
        norm = max(math.sqrt(sum(s * s for s in slopes.values())), eps)
        return softmax({k: s / norm for k, s in slopes.items()}, beta)
    if variant == "normalized":
        norm = max(sum(abs(s) for s in slopes.values()), eps)
        return softmax({k: s / norm for k, s in slopes.items()}, beta)
    if variant == "loss_weighted":
        means = {k: max(0.5 * (float(prev[k]) + float(new[k])), 0.0) for k in names}
        return softmax(slopes, beta, prefactors=means)
    return softmax(slopes, beta)
