"""Dynamic Weight Average (Liu, Johns & Davison 2019, "End-to-End Multi-Task Learning
with Attention", CVPR).

``w_k = softmax_k(r / T)`` with the loss ratios ``r_k = L_k(t) / L_k(t-1)`` and the
temperature ``T``. The paper's weights are ``K * w_k`` (they sum to the number of tasks
``K``); nequip normalises coefficients to sum to 1, which removes that factor.
A task whose loss falls more slowly (larger ratio) gets more weight.
"""

from __future__ import annotations

from collections.abc import Mapping

from .common import softmax


def dwa_weights(
    prev: Mapping[str, float], new: Mapping[str, float], temperature: float = 2.0, eps: float = 1e-8
) -> dict[str, float]:
    """DWA weights (summing to 1) for the names of ``new``."""
    ratios = {k: float(new[k]) / max(float(prev[k]), eps) for k in new}
    return softmax(ratios, 1.0 / temperature)
