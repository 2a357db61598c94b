"""Mixed precision: Lightning's MixedPrecision plugin (16-mixed with a CPU GradScaler,
bf16-mixed) with the aggregation modules, against the float32 run on the same batches.

A full NequIP model through ``nequip-train`` cannot run 16-mixed autocast on CPU (e3nn's
tensordot, nequip's plain module too); the tiny harness model with the plugin passed to
the Trainer directly does, so that is what these tests use.
"""

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.plugins.precision import Precision
from nequip.train import NequIPLightningModule

import nequip_mtl.train as mtl
from tests._harness import datamodule, module_kwargs, params, trainer

MOMENTUM = {"_target_": "nequip_mtl.aggregators.MomentumConFIG"}
UPGRAD = {"_target_": "nequip_mtl.aggregators.UPGrad"}


def fp16():
    return MixedPrecision(precision="16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu"))


def bf16():
    return MixedPrecision(precision="bf16-mixed", device="cpu")


class GradNorms(Callback):
    """The module's logged task-gradient norms, every step."""

    def __init__(self):
        self.norms = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        stats = pl_module.task_gradient_statistics
        self.norms.append(stats.gram.diagonal().sqrt().clone() if stats is not None else None)


def run(tmp_path, plugin=None, cls=mtl.MultitaskLightningModule, epochs=2, **kw):
    torch.manual_seed(0)
    kw.setdefault("optimizer", {"_target_": "torch.optim.SGD", "lr": 0.05})
    module = cls(**module_kwargs(dtype="float32", **kw))
    start = params(module)
    norms = GradNorms()
    tr = trainer(
        tmp_path, max_epochs=epochs, plugins=[plugin] if plugin else None, callbacks=[norms]
    )
    tr.fit(module, datamodule=datamodule())
    return module, params(module) - start, norms.norms, tr


@pytest.mark.parametrize(
    "make_plugin, rtol", [(fp16, 2e-2), (bf16, 1e-1)], ids=["16-mixed", "bf16-mixed"]
)
@pytest.mark.parametrize(
    "kw",
    [{"cls": mtl.ConFIGLightningModule}, {"aggregator": MOMENTUM}, {"aggregator": UPGRAD}],
    ids=["ConFIG", "MomentumConFIG", "UPGrad"],
)
def test_mixed_precision_updates_match_float32(tmp_path, make_plugin, rtol, kw):
    _, delta32, norms32, _ = run(tmp_path / "32", **kw)
    module, delta, norms, _ = run(tmp_path / "mixed", make_plugin(), **kw)
    assert module.skipped_steps == 0
    assert delta32.norm() > 1e-4
    # the parameter changes of the mixed run are those of the float32 run, up to precision
    assert (delta - delta32).norm() / delta32.norm() < rtol
    # logged gradient norms are in unscaled units
    for a, b in zip(norms, norms32):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=rtol, atol=0)


class OverflowOnce(Callback):
    """Makes step ``at``'s gradients overflow in float32 (energy labels of 1e37) and records the
    GradScaler's scale after every step."""

    def __init__(self, at=1):
        self.at, self.scales = at, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            batch["total_energy"] = torch.full_like(batch["total_energy"], 1e37)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.scales.append(trainer.precision_plugin.scaler.get_scale())


@pytest.mark.parametrize(
    "cls, kw, at",
    [
        (NequIPLightningModule, {}, 1),
        (mtl.ConFIGLightningModule, {}, 1),
        # round robin: the energy task is back-propagated on steps 0 and 3
        (mtl.MultitaskLightningModule, {"aggregator": MOMENTUM}, 3),
    ],
    ids=["nequip-plain", "ConFIG", "MomentumConFIG"],
)
def test_overflow_is_absorbed_by_the_grad_scaler(tmp_path, cls, kw, at):
    """An overflowing step is skipped by the scaler, which halves its scale, exactly as for
    nequip's plain module; the run goes on."""
    torch.manual_seed(0)
    module = cls(**module_kwargs(dtype="float32", **kw))
    recorder, params_after = OverflowOnce(at=at), []

    class Params(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            params_after.append(params(pl_module))

    tr = trainer(tmp_path, max_epochs=3, plugins=[fp16()], callbacks=[recorder, Params()])
    tr.fit(module, datamodule=datamodule())
    s0 = recorder.scales[0]
    assert recorder.scales == [s0] * at + [s0 / 2] * (6 - at)
    assert torch.equal(params_after[at], params_after[at - 1])  # the overflow changed nothing
    assert not torch.equal(params_after[at + 1], params_after[at])  # and training went on
    if cls is not NequIPLightningModule:
        assert module.skipped_steps == 1 and module.faults.applied == 5


def test_zero_task_with_a_grad_scaler_is_refused(tmp_path):
    module = mtl.ConFIGLightningModule(on_nonfinite="zero_task", **module_kwargs(dtype="float32"))
    with pytest.raises(
        ValueError, match="on_nonfinite`=zero_task cannot be combined with a GradScaler"
    ):
        trainer(tmp_path, plugins=[fp16()]).fit(module, datamodule=datamodule())


def test_unknown_precision_plugin_is_refused(tmp_path):
    class ScalingPrecision(Precision):
        def pre_backward(self, tensor, module):
            return tensor * 4.0

    module = mtl.ConFIGLightningModule(**module_kwargs(dtype="float32"))
    with pytest.raises(ValueError, match="precision plugin ScalingPrecision"):
        trainer(tmp_path, plugins=[ScalingPrecision()]).fit(module, datamodule=datamodule())
