"""Fixed loss coefficients from time-averaged task-gradient statistics (pure torch).

A :class:`GradientCalibration` is fed the Gram matrix ``G @ G.T`` of the task gradients
of a number of optimizer steps and returns, once, the loss coefficients a ``rule``
chooses from them. Every ``G`` row is the gradient of an *unweighted* loss component
``L_i`` (nequip's ``train_loss_step/<name>``, before its coefficient), so ``w`` are loss
coefficients of the raw components: ``sum_i w_i grad L_i = grad sum_i w_i L_i``.

Rules (``c0`` are the coefficients in force during calibration, normalised to sum to 1
as nequip does; ``n_i`` is the mean over the counted steps of ``|grad L_i|``):

- ``gradnorm``: ``c_i ∝ c0_i / n_i``. The time-averaged gradient norms of the
  *weighted* components, ``c_i n_i``, are then proportional to ``c0_i``: the configured
  coefficients become the target ratio of the components' gradient norms. With equal
  configured coefficients (the usual case) this equalises them: ``c_i ∝ 1 / n_i``.
  (``n_i`` is of the raw component; measured on the weighted ones, ``c0_i n_i``, the same
  rule reads ``c_i ∝ c0_i^2 / mean|grad (c0_i L_i)|``.)
- ``aggregator``: ``c_i ∝ mean_t w_i(t)`` with ``w(t) = aggregator.weights(gram_t, c0)``,
  the Gram-space weights the aggregator would have used on step ``t`` (the update it
  would apply is ``w(t) @ G_t``). Components with a zero gradient on a step are left out
  of that step's weights (weight 0), as the gradient-aggregation modules do.

The coefficients are normalised to sum to 1 (nequip's ``MetricsManager`` normalises
them anyway). Normalising rescales the update by ``1 / sum_i mean_t w_i(t)``, i.e. it is
equivalent to a learning-rate factor; :attr:`GradientCalibration.weight_sum` reports it.

Steps whose Gram matrix is not finite are not counted (:meth:`GradientCalibration.add`
returns ``False``). No Lightning, no nequip: testable on its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..aggregators._linalg import symmetrized

__all__ = ["GradientCalibration", "RULES"]

#: the calibration rules
RULES = ("gradnorm", "aggregator")


class GradientCalibration:
    """Accumulate task-gradient statistics over steps; choose coefficients by ``rule``.

    Args:
        names: the loss components (rows of every Gram matrix), in order
        initial_coeffs: their coefficients during calibration (``c0``, > 0)
        rule: ``gradnorm`` or ``aggregator``
        aggregator: a Gram-space aggregator (with ``weights(gram, coeffs, source_dtype)``),
            required for ``rule="aggregator"`` and not allowed otherwise
        source_dtype: the dtype the gradients were computed in (passed to the aggregator)
    """

    def __init__(
        self,
        names: Sequence[str],
        initial_coeffs: Sequence[float],
        rule: str,
        aggregator: Any = None,
        source_dtype: torch.dtype = torch.float64,
    ):
        self.names = [str(n) for n in names]
        if len(set(self.names)) != len(self.names) or not self.names:
            raise ValueError(f"names must be unique and non-empty, got {self.names}")
        c0 = torch.as_tensor(list(initial_coeffs), dtype=torch.float64)
        if c0.shape != (len(self.names),):
            raise ValueError(f"got {c0.numel()} initial coefficients for {len(self.names)} names")
        if not bool(torch.isfinite(c0).all()) or not bool((c0 > 0).all()):
            raise ValueError(
                f"initial coefficients must be finite and > 0, got {dict(zip(self.names, c0.tolist()))}"
            )
        if rule not in RULES:
            raise ValueError(f"rule must be one of {list(RULES)}, got {rule!r}")
        if (rule == "aggregator") != (aggregator is not None):
            raise ValueError("an aggregator is required for, and only for, rule='aggregator'")
        self.initial_coeffs = c0
        self.rule = rule
        self.aggregator = aggregator
        self.source_dtype = source_dtype
        m = len(self.names)
        self.num_steps = 0
        self.sum_norms = torch.zeros(m, dtype=torch.float64)
        self.sum_weights = torch.zeros(m, dtype=torch.float64)

    # ------------------------------------------------------------------ accumulation

    def add(self, gram: torch.Tensor) -> bool:
        """Count one step with task-gradient Gram matrix ``gram`` (``(m, m)``, rows in
        :attr:`names` order; a zero row is a component with zero gradient on that step).
        Returns ``False`` (and counts nothing) if ``gram`` or the weights are not finite."""
        gram = torch.as_tensor(gram).detach().to("cpu", torch.float64)
        m = len(self.names)
        if gram.shape != (m, m):
            raise ValueError(f"expected a ({m}, {m}) Gram matrix, got {tuple(gram.shape)}")
        if not bool(torch.isfinite(gram).all()):
            return False
        gram = symmetrized(gram)
        sq = gram.diagonal().clamp_min(0.0)
        weights = torch.zeros(m, dtype=torch.float64)
        if self.rule == "aggregator":
            keep = (sq > 0).nonzero().flatten()
            if keep.numel() == 1:
                weights[keep] = 1.0  # one component: its plain gradient, as the modules do
            elif keep.numel() > 1:
                sub = gram[keep][:, keep]
                w = self.aggregator.weights(
                    sub, self.initial_coeffs[keep], source_dtype=self.source_dtype
                )
                w = torch.as_tensor(w).detach().to("cpu", torch.float64).reshape(-1)
                if not bool(torch.isfinite(w).all()):
                    return False
                weights[keep] = w
        self.num_steps += 1
        self.sum_norms += sq.sqrt()
        self.sum_weights += weights
        return True

    @property
    def mean_norms(self) -> torch.Tensor:
        """``(m,)`` mean over the counted steps of each task-gradient norm."""
        return self.sum_norms / max(self.num_steps, 1)

    @property
    def mean_weights(self) -> torch.Tensor:
        """``(m,)`` mean over the counted steps of the aggregator's weights."""
        return self.sum_weights / max(self.num_steps, 1)

    @property
    def weight_sum(self) -> float:
        """Sum of the mean aggregator weights (``rule="aggregator"``): the normalised
        coefficients give an update ``1 / weight_sum`` times the mean aggregated one."""
        return float(self.mean_weights.sum())

    # ------------------------------------------------------------------ the choice

    def coefficients(self, where: str = "calibration") -> dict[str, float]:
        """The chosen coefficients ``{name: c_i}``, normalised to sum to 1.

        Raises ``ValueError`` (naming ``where``) if no step was counted, if a component's
        mean gradient norm is zero (``gradnorm``), or if a mean aggregator weight is
        negative or all are zero (``aggregator``).
        """
        if self.num_steps == 0:
            raise ValueError(
                f"{where}: no calibration step gave a usable (finite) measurement of the task "
                "gradients; calibrate over more steps"
            )
        if self.rule == "gradnorm":
            norms = self.mean_norms
            zero = [n for n, v in zip(self.names, norms.tolist()) if not v > 0]
            if zero:
                raise ValueError(
                    f"{where}: loss component(s) {zero} had a zero gradient on every "
                    "calibration step, so rule 'gradnorm' cannot equalise them; calibrate over "
                    "more steps or give them `coeff: null`"
                )
            raw = self.initial_coeffs / norms
        else:
            raw = self.mean_weights
            negative = {n: v for n, v in zip(self.names, raw.tolist()) if v < 0}
            if negative:
                raise ValueError(
                    f"{where}: the aggregator's mean weights of {negative} are negative; a loss "
                    "coefficient must be >= 0 (choose another aggregator, e.g. UPGrad)"
                )
        total = float(raw.sum())
        if not (total > 0 and math.isfinite(total)):
            raise ValueError(f"{where}: the rule gave no positive coefficient ({raw.tolist()})")
        return {n: float(v) / total for n, v in zip(self.names, raw.tolist())}

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "initial_coeffs": self.initial_coeffs.tolist(),
            "rule": self.rule,
            "num_steps": self.num_steps,
            "sum_norms": self.sum_norms.clone(),
            "sum_weights": self.sum_weights.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["names"] != self.names or state["rule"] != self.rule:
            raise ValueError(
                f"calibration state is for rule {state['rule']!r} on {state['names']}, "
                f"not rule {self.rule!r} on {self.names}"
            )
        self.initial_coeffs = torch.as_tensor(state["initial_coeffs"], dtype=torch.float64)
        self.num_steps = int(state["num_steps"])
        self.sum_norms = torch.as_tensor(state["sum_norms"], dtype=torch.float64).clone()
        self.sum_weights = torch.as_tensor(state["sum_weights"], dtype=torch.float64).clone()


#: how calibrated coefficients treat the loss's datasets (``CalibrateLossCoefficients.datasets``)
DATASET_SHARES = ("within", "across")


def keep_group_shares(
    chosen: dict[str, float], initial: dict[str, float], group_of: dict[str, object]
) -> dict[str, float]:
    """Rescale ``chosen`` within each group so that every group keeps its ``initial`` share.

    ``group_of`` maps each name to its group (e.g. its dataset); the result's values in
    group ``g`` are ``chosen`` times ``sum_initial(g) / sum_chosen(g)``: the calibration
    decides the ratios inside a group, the configuration the weights between groups. A
    group whose chosen coefficients are all zero keeps them.
    """
    out = dict(chosen)
    groups: dict[object, list[str]] = {}
    for name in chosen:
        groups.setdefault(group_of.get(name), []).append(name)
    for names in groups.values():
        total = sum(chosen[n] for n in names)
        if total > 0:
            share = sum(initial[n] for n in names)
            for n in names:
                out[n] = chosen[n] * share / total
    return out
