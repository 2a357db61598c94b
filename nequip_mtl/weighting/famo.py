"""FAMO: Fast Adaptive Multitask Optimization (Liu, Liu, Stone & Liu, NeurIPS 2023,
arXiv:2306.03792), as pure torch.

FAMO keeps one logit ``xi_k`` per task, ``z = softmax(xi)``. The model is trained on the
loss whose gradient is ``sum_k z_k grad log(L_k - m_k)`` up to a positive factor; written
as a weighted sum of the raw losses that is

    ``sum_k w_k L_k``,  ``w_k = (z_k / d_k) / sum_l (z_l / d_l)``,  ``d_k = L_k - m_k + eps``

with the weights ``w`` detached (``m_k``: a lower bound of task ``k``'s loss, 0 by
default). After the step, with the log-loss decrease ``delta_k = log d_k(before) -
log d_k(after)``, the logits follow the gradient ``J_softmax(xi)^T delta = z * (delta -
z . delta)`` with Adam and weight decay ``gamma``. Tasks that improved less gain weight.
Cost: O(number of tasks) scalar work per step, no extra backward pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def _dist(losses: torch.Tensor, min_losses: torch.Tensor | None, eps: float) -> torch.Tensor:
    if min_losses is not None:
        losses = losses - min_losses
    return losses.clamp_min(0.0) + eps


def famo_loss_weights(
    losses: torch.Tensor,
    logits: torch.Tensor,
    min_losses: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """FAMO's weights on the raw losses (summing to 1; detached)."""
    losses = losses.detach().to(torch.float64)
    z = torch.softmax(logits.detach().to(torch.float64), dim=0)
    w = z / _dist(losses, min_losses, eps)
    return w / w.sum()


def famo_logit_gradient(
    logits: torch.Tensor,
    prev_losses: torch.Tensor,
    new_losses: torch.Tensor,
    min_losses: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """``d(z . delta)/d xi = z * (delta - z . delta)`` with ``delta = log d(prev) - log d(new)``."""
    z = torch.softmax(logits.detach().to(torch.float64), dim=0)
    delta = torch.log(_dist(prev_losses.detach().double(), min_losses, eps)) - torch.log(
        _dist(new_losses.detach().double(), min_losses, eps)
    )
    return z * (delta - (z * delta).sum())


class FAMOLogits:
    """FAMO's task logits with their own Adam optimizer (explicit, checkpointable state).

    Adam follows ``torch.optim.Adam`` (L2 ``weight_decay`` added to the gradient).
    A boolean ``mask`` restricts a call to the active tasks: inactive logits and their
    Adam moments are left untouched and get zero weight.

    Args:
        num_tasks: number of tasks (loss components)
        lr: logit learning rate
        weight_decay: FAMO's ``gamma``
        betas, adam_eps: Adam's hyperparameters
        init: initial logits (default zeros, i.e. equal weights)
    """

    def __init__(
        self,
        num_tasks: int,
        lr: float = 0.025,
        weight_decay: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        init: torch.Tensor | None = None,
    ):
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.betas = (float(betas[0]), float(betas[1]))
        self.adam_eps = float(adam_eps)
        self.logits = (
            torch.zeros(num_tasks, dtype=torch.float64)
            if init is None
            else init.detach().to(torch.float64).clone()
        )
        self.exp_avg = torch.zeros(num_tasks, dtype=torch.float64)
        self.exp_avg_sq = torch.zeros(num_tasks, dtype=torch.float64)
        self.steps = torch.zeros(num_tasks, dtype=torch.float64)

    def _mask(self, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:
            return torch.ones_like(self.logits, dtype=torch.bool)
        return mask.to(torch.bool).cpu()

    def weights(
        self,
        losses: torch.Tensor,
        mask: torch.Tensor | None = None,
        min_losses: torch.Tensor | None = None,
        eps: float = 1e-8,
    ) -> torch.Tensor:
        """Weights over all tasks (0 where ``mask`` is False), summing to 1."""
        m = self._mask(mask)
        out = torch.zeros_like(self.logits)
        mins = None if min_losses is None else min_losses.double().cpu()[m]
        out[m] = famo_loss_weights(losses.detach().double().cpu()[m], self.logits[m], mins, eps)
        return out

    def update(
        self,
        prev_losses: torch.Tensor,
        new_losses: torch.Tensor,
        mask: torch.Tensor | None = None,
        min_losses: torch.Tensor | None = None,
        eps: float = 1e-8,
    ) -> None:
        """One Adam step on the active logits from the observed loss change."""
        m = self._mask(mask)
        mins = None if min_losses is None else min_losses.double().cpu()[m]
        grad = famo_logit_gradient(
            self.logits[m],
            prev_losses.detach().double().cpu()[m],
            new_losses.detach().double().cpu()[m],
            mins,
            eps,
        )
        if not bool(torch.isfinite(grad).all()):
            return
        xi = self.logits[m]
        grad = grad + self.weight_decay * xi
        b1, b2 = self.betas
        steps = self.steps[m] + 1
        exp_avg = b1 * self.exp_avg[m] + (1 - b1) * grad
        exp_avg_sq = b2 * self.exp_avg_sq[m] + (1 - b2) * grad * grad
        denom = (exp_avg_sq / (1 - b2**steps)).sqrt() + self.adam_eps
        self.logits[m] = xi - self.lr * (exp_avg / (1 - b1**steps)) / denom
        self.exp_avg[m] = exp_avg
        self.exp_avg_sq[m] = exp_avg_sq
        self.steps[m] = steps

    def state_dict(self) -> dict[str, Any]:
        return {
            "logits": self.logits.clone(),
            "exp_avg": self.exp_avg.clone(),
            "exp_avg_sq": self.exp_avg_sq.clone(),
            "steps": self.steps.clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("logits", "exp_avg", "exp_avg_sq", "steps"):
            value = torch.as_tensor(state[key], dtype=torch.float64).cpu().clone()
            if value.shape != self.logits.shape:
                raise ValueError(
                    f"FAMO state `{key}` has shape {tuple(value.shape)}, expected "
                    f"{tuple(self.logits.shape)} (the number of loss components changed)"
                )
            setattr(self, key, value)
