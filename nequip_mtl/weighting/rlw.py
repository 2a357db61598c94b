"""Random Loss Weighting (Lin et al., "Reasonable Effectiveness of Random Weighting: A
Litmus Test for Multi-Task Learning", TMLR 2022).

Each draw samples ``z`` from a distribution and uses ``w = softmax(z)`` as the task
weights (for ``dirichlet`` the sample itself is the weight vector). RLW is not adaptive:
it is the random baseline that adaptive schemes should beat.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from .common import check_choice, check_finite

RLW_DISTRIBUTIONS = ("normal", "uniform", "dirichlet")


def sample_rlw_weights(
    names: Sequence[str],
    rng: random.Random,
    distribution: str = "normal",
    std: float = 1.0,
    alpha: float = 1.0,
) -> dict[str, float]:
    """One RLW draw: ``{name: weight}`` summing to 1.

    - ``normal``: ``softmax(z)``, ``z_k ~ N(0, std^2)`` (the paper's default)
    - ``uniform``: ``softmax(z)``, ``z_k ~ U(0, 1)``
    - ``dirichlet``: ``w ~ Dirichlet(alpha, ..., alpha)``
    """
    check_choice(distribution, RLW_DISTRIBUTIONS, "distribution")
    if distribution == "dirichlet":
        alpha = check_finite(alpha, "alpha", positive=True)
        g = [rng.gammavariate(alpha, 1.0) for _ in names]
        total = sum(g)
        if not total > 0:
            return {k: 1.0 / len(names) for k in names}
        return {k: x / total for k, x in zip(names, g)}
    if distribution == "normal":
        std = check_finite(std, "std", nonneg=True)
        z = [rng.gauss(0.0, 1.0) * std for _ in names]
    else:
        z = [rng.random() for _ in names]
    shift = max(z)
    e = [math.exp(x - shift) for x in z]
    total = sum(e)
    return {k: x / total for k, x in zip(names, e)}
