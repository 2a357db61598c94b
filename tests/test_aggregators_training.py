"""Every aggregator trains a real NequIP model when selected by its `_target_` string."""

import inspect

import lightning
import pytest
import torch

import nequip_mtl.aggregators as aggregators
import nequip_mtl.train as mtl
from tests._harness import fit, params

TARGETS = sorted(
    f"nequip_mtl.aggregators.{name}"
    for name in aggregators.__all__
    if inspect.isclass(getattr(aggregators, name))
    and issubclass(getattr(aggregators, name), aggregators.Aggregator)
    and name not in ("Aggregator", "GramAggregator")
)


class Losses(lightning.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.rsplit(".", 1)[1])
def test_aggregator_in_a_real_training_run(target, tmp_path):
    rec = Losses()
    start, _ = fit(mtl.MultitaskLightningModule, tmp_path / "start", max_epochs=0)
    module, trainer = fit(
        mtl.MultitaskLightningModule,
        tmp_path / "run",
        max_epochs=3,
        aggregator={"_target_": target},
        optimizer={"_target_": "torch.optim.SGD", "lr": 0.002},
        trainer_kwargs=dict(callbacks=[rec]),
    )
    assert type(module.aggregator).__name__ == target.rsplit(".", 1)[1]
    assert trainer.global_step == 6 and module.skipped_steps == 0
    after = params(module)
    assert torch.isfinite(after).all()
    # (AlignedMTL rescales every direction to the smallest singular value: tiny steps)
    assert (after - params(start)).abs().max() > 1e-9
    assert sum(rec.losses[-2:]) < sum(rec.losses[:2])  # the weighted-sum loss went down
