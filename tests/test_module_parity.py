"""Our ConFIG modules against nequip's own, run side by side (float64, same seed/data)."""

import nequip.train
import pytest
import torch

import nequip_mtl.train as mtl
from tests._harness import fit, params

PLATEAU = {
    "scheduler": {
        "_target_": "torch.optim.lr_scheduler.ReduceLROnPlateau",
        "factor": 0.5,
        "patience": 0,
    },
    "monitor": "val0_epoch/weighted_sum",
    "interval": "epoch",
    "frequency": 1,
}


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (mtl.ConFIGLightningModule, nequip.train.ConFIGLightningModule),
        (mtl.EMAConFIGLightningModule, nequip.train.EMAConFIGLightningModule),
    ],
)
def test_same_parameters_as_nequip(ours, theirs, tmp_path):
    """Adam + ReduceLROnPlateau, 3 epochs x 2 steps: identical trajectories."""
    kw = dict(
        max_epochs=3,
        optimizer={"_target_": "torch.optim.Adam", "lr": 0.01},
        lr_scheduler=PLATEAU,
    )
    a, _ = fit(ours, tmp_path / "a", **kw)
    b, _ = fit(theirs, tmp_path / "b", **kw)
    pa, pb = params(a), params(b)
    start, _ = fit(ours, tmp_path / "c", max_epochs=0)
    assert (pa - params(start)).abs().max() > 1e-4  # training moved the weights
    torch.testing.assert_close(pa, pb, rtol=0, atol=1e-10)
    if hasattr(a, "ema"):
        for x, y in zip(a.ema.ema_weights, b.ema.ema_weights):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-10)
        assert a.ema.num_updates == b.ema.num_updates
