"""Memory and parameter hygiene of the aggregation modules, side by side with nequip's
plain module: no autograd graph outlives its step, no gradient rows for tasks that are
never back-propagated on their own, and parameters no loss reaches get no gradient."""

import weakref

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from nequip.train import NequIPLightningModule

import nequip_mtl.train as mtl
from tests._harness import datamodule, module_kwargs, trainer

MOMENTUM = {"_target_": "nequip_mtl.aggregators.MomentumConFIG"}

#: nequip's plain module next to ours: every step kind (all tasks, one task, held weights)
SIDE_BY_SIDE = pytest.mark.parametrize(
    "cls, kw",
    [
        (NequIPLightningModule, {}),
        (mtl.ConFIGLightningModule, {}),
        (mtl.MultitaskLightningModule, {"aggregator": MOMENTUM}),
        (mtl.MultitaskLightningModule, {"weights_every": 2}),
    ],
    ids=["nequip-plain", "ConFIG", "MomentumConFIG", "ConFIG-weights_every"],
)


class _Saved:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


class SavedTensorCensus(Callback):
    """Tracks every tensor autograd saves during the training steps (not validation); at
    the start of each step and at the end of training records how many of the earlier
    steps' saved tensors are still alive."""

    def __init__(self):
        self.alive: list[int] = []
        self.packed = 0  # saved tensors in all
        self._refs: list[weakref.ref] = []
        self._ctx = None

    def _pack(self, tensor):
        self.packed += 1
        saved = _Saved(tensor)
        self._refs.append(weakref.ref(saved))
        return saved

    def _count(self):
        self._refs = [r for r in self._refs if r() is not None]
        self.alive.append(len(self._refs))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step > 0:
            self._count()
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda s: s.tensor)
        self._ctx.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._ctx.__exit__(None, None, None)

    def on_train_end(self, trainer, pl_module):
        self._count()


@SIDE_BY_SIDE
def test_no_autograd_graph_outlives_its_step(tmp_path, cls, kw):
    census = SavedTensorCensus()
    torch.manual_seed(0)
    module = cls(**module_kwargs(**kw))
    trainer(tmp_path, max_epochs=2, callbacks=[census]).fit(module, datamodule=datamodule())
    assert len(census.alive) == 4 and census.packed > 4 * 100
    if kw.get("aggregator") == MOMENTUM:
        # the branches of the tasks not back-propagated on a step (the forces' second
        # derivative on an energy step) are never run, so their buffers live until
        # Lightning lets go of the batch the model wrote its outputs into: a few tensors
        assert max(census.alive) <= 0.05 * census.packed / 4
    else:
        assert census.alive == [0, 0, 0, 0]


@pytest.mark.parametrize(
    "kw, coeffs, rows",
    [
        ({}, {"total_energy": 1.0, "forces": 1.0, "stress": 1.0}, 3),
        ({}, {"total_energy": None, "forces": 1.0, "stress": 1.0}, 2),
        ({}, {"total_energy": 1.0, "forces": None, "stress": 1.0}, 2),
        ({"aggregator": MOMENTUM}, {"total_energy": 1.0, "forces": 1.0, "stress": 1.0}, 1),
        (
            {"aggregator": {**MOMENTUM, "tasks_per_step": 2}},
            {"total_energy": 1.0, "forces": 1.0, "stress": 1.0},
            2,
        ),
    ],
)
def test_gradient_rows_only_for_back_propagated_tasks(tmp_path, kw, coeffs, rows):
    loss = {"_target_": "nequip.train.EnergyForceStressLoss", "coeffs": coeffs}
    module = mtl.MultitaskLightningModule(**module_kwargs(loss=loss, **kw))
    trainer(tmp_path).fit(module, datamodule=datamodule())
    n_params = sum(p.numel() for p in module.parameters() if p.requires_grad)
    storage = module.engine.rows
    assert storage.num_rows == rows
    assert sum(g.rows.numel() for g in storage.groups) == rows * n_params


def _with_unused_parameter(cls):
    class WithUnused(cls):
        """A trainable parameter that no loss depends on."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.unused = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))

    return WithUnused


class GradOfUnused(Callback):
    def __init__(self):
        self.grads = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append(pl_module.unused.grad)


@SIDE_BY_SIDE
def test_unreached_parameters_get_no_gradient_and_no_weight_decay(tmp_path, cls, kw):
    adamw = {"_target_": "torch.optim.AdamW", "lr": 0.01, "weight_decay": 0.5}
    module = _with_unused_parameter(cls)(**module_kwargs(optimizer=adamw, **kw))
    seen = GradOfUnused()
    trainer(tmp_path, max_epochs=2, callbacks=[seen]).fit(module, datamodule=datamodule())
    assert seen.grads == [None] * 4
    assert torch.equal(module.unused.detach(), torch.ones(3, dtype=torch.float64))
