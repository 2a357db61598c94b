"""Tiny *real* training runs for the loss-coefficient tests.

- :func:`nequip_fit`: a real NequIP model (Cu, 1 layer, 4 features, l_max 1) on ~12 EMT
  frames of 8 atoms, trained by a real Lightning ``Trainer`` (about a second per run);
- :class:`TwoTaskModule`: a real LightningModule with a real nequip ``MetricsManager`` on
  a synthetic two-task regression whose second task is known to lag (its gradient is
  100x weaker), for "does the weight move to the lagging task" checks;
- :class:`CoeffRecorder`: a callback recording the coefficients every step's loss was
  computed with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from nequip.train import MeanSquaredError, NequIPLightningModule

from tests import _harness as harness
from tests._harness import datamodule, model_config  # noqa: F401  (re-exported)

LOSS_NAMES = ["per_atom_energy_mse", "forces_mse", "stress_mse"]


def loss_config(
    coeffs: dict | None = None, target: str = "nequip_mtl.train.EnergyForceStressLoss"
) -> dict:
    return harness.loss_config(coeffs, target=target)


def module_kwargs(loss: dict | None = None, lr: float = 0.01, **overrides: Any) -> dict:
    overrides.setdefault("optimizer", {"_target_": "torch.optim.Adam", "lr": lr})
    return harness.module_kwargs(loss=loss or loss_config(), **overrides)


class CoeffRecorder(Callback):
    """Records ``(global_step, {name: coeff})`` for every step, as used by the step's loss."""

    def __init__(self) -> None:
        self.records: list[tuple[int, dict[str, float | None]]] = []

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        coeffs = {k: e.coeff for k, e in pl_module.loss.entries.items()}
        self.records.append((trainer.global_step, coeffs))

    def by_step(self) -> dict[int, dict[str, float | None]]:
        return dict(self.records)

    def distinct(self) -> list[dict[str, float | None]]:
        out: list[dict[str, float | None]] = []
        for _, c in self.records:
            if not out or out[-1] != c:
                out.append(c)
        return out


class MemoryLogger(Logger):
    """A minimal in-memory Lightning logger (a real ``Logger`` subclass)."""

    def __init__(self, name: str = "memory") -> None:
        super().__init__()
        self._name = name
        self.records: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> str:
        return "0"

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append((step, dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def values(self, key: str) -> list[tuple[int | None, float]]:
        return [(step, m[key]) for step, m in self.records if key in m]


def trainer(
    tmp_path, callbacks=(), max_epochs: int = 2, checkpoint: bool = False, **kwargs
) -> lightning.Trainer:
    callbacks = list(callbacks)
    if checkpoint:
        callbacks.append(ModelCheckpoint(dirpath=str(Path(tmp_path) / "ckpt"), save_last=True))
    kwargs.setdefault("enable_checkpointing", checkpoint)
    return harness.trainer(tmp_path, max_epochs=max_epochs, callbacks=callbacks, **kwargs)


def nequip_fit(
    tmp_path,
    callbacks=(),
    max_epochs: int = 2,
    module_cls=NequIPLightningModule,
    batch_size: int = 4,
    ckpt_path: str | None = None,
    checkpoint: bool = False,
    module_kw: dict | None = None,
    **trainer_kw: Any,
):
    """Build a fresh tiny module, fit it; returns ``(module, trainer)``."""
    torch.manual_seed(0)
    module = module_cls(**module_kwargs(**(module_kw or {})))
    tr = trainer(tmp_path, callbacks, max_epochs=max_epochs, checkpoint=checkpoint, **trainer_kw)
    tr.fit(module, datamodule=datamodule(batch_size=batch_size), ckpt_path=ckpt_path)
    return module, tr


def last_ckpt(tmp_path) -> str:
    return str(Path(tmp_path) / "ckpt" / "last.ckpt")


# ---------------------------------------------------------------- synthetic two-task problem


def two_task_metrics(coeffs=(1.0, 1.0)) -> list[dict]:
    return [
        {"name": "task_a", "field": "task_a", "coeff": coeffs[0], "metric": MeanSquaredError()},
        {"name": "task_b", "field": "task_b", "coeff": coeffs[1], "metric": MeanSquaredError()},
    ]


class TwoTaskModule(lightning.LightningModule):
    """Two independent scalar regressions of ``y = 2 x`` with equal initial losses: task
    ``a`` sees the input as is, task ``b`` through a factor ``slow`` (default 0.1), so its
    parameter must grow 1/slow times further with a gradient ``slow`` times smaller. Its
    loss falls much more slowly, in absolute and relative terms and stays larger: ``b`` is
    the lagging task. ``loss`` is a real (nequip or nequip-mtl) MetricsManager."""

    def __init__(self, manager_cls=None, coeffs=(1.0, 1.0), slow: float = 0.1, lr: float = 0.05):
        super().__init__()
        if manager_cls is None:
            from nequip_mtl.train import MultitaskMetricsManager as manager_cls
        self.loss = manager_cls(two_task_metrics(coeffs))
        self.theta = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
        self.slow = slow
        self.lr = lr

    def training_step(self, batch, batch_idx):
        (x,) = batch
        preds = {"task_a": self.theta[0] * x, "task_b": self.theta[1] * self.slow * x}
        target = {"task_a": 2.0 * x, "task_b": 2.0 * x}
        loss_dict = self.loss(preds, target, prefix="train_loss_step/")
        return loss_dict["train_loss_step/weighted_sum"]

    def on_train_epoch_end(self):
        self.loss.compute()
        self.loss.reset()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):  # one full batch per epoch: smooth loss histories
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, dtype=torch.float64, generator=g)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=64)


def two_task_fit(tmp_path, callbacks, max_epochs: int = 10, **module_kw):
    torch.manual_seed(0)
    module = TwoTaskModule(**module_kw)
    tr = trainer(tmp_path, callbacks, max_epochs=max_epochs)
    tr.fit(module)
    return module, tr
