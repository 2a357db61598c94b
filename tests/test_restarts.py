"""Exact restarts: interrupted at epoch 2 and resumed from last.ckpt == uninterrupted."""

import os
import subprocess
import sys
from pathlib import Path

import lightning
import pytest
import torch
from hydra.utils import get_class

from tests._harness import datamodule, module_kwargs, params, trainer

MOMENTUM = {"_target_": "nequip_mtl.aggregators.MomentumConFIG"}

MODULES = {
    "ConFIG": ("nequip_mtl.train.ConFIGLightningModule", {}),
    "EMAConFIG": ("nequip_mtl.train.EMAConFIGLightningModule", {"ema_decay": 0.9}),
    "MomentumConFIG": ("nequip_mtl.train.MultitaskLightningModule", {"aggregator": MOMENTUM}),
    # resumed after step 4 of a 3-step period: the held weights and their age restored
    "UPGrad-weights_every": (
        "nequip_mtl.train.MultitaskLightningModule",
        {"aggregator": {"_target_": "nequip_mtl.aggregators.UPGrad"}, "weights_every": 3},
    ),
    "EMAMomentumConFIG": (
        "nequip_mtl.train.EMAMultitaskLightningModule",
        {"aggregator": MOMENTUM, "ema_decay": 0.9},
    ),
}


def _build(name):
    target, extra = MODULES[name]
    torch.manual_seed(0)
    return get_class(target)(
        **module_kwargs(optimizer={"_target_": "torch.optim.Adam", "lr": 0.01}, **extra)
    )


def _fit(module, tmp, epochs, ckpt_path=None):
    ckpt = lightning.pytorch.callbacks.ModelCheckpoint(dirpath=str(tmp), save_last=True)
    tr = trainer(tmp, max_epochs=epochs, enable_checkpointing=True, callbacks=[ckpt])
    tr.fit(module, datamodule=datamodule(), ckpt_path=ckpt_path)
    return tr


@pytest.mark.parametrize("name", list(MODULES))
def test_resume_gives_the_uninterrupted_trajectory(name, tmp_path):
    full = _build(name)
    _fit(full, tmp_path / "full", epochs=4)

    first = _build(name)
    _fit(first, tmp_path / "part", epochs=2)
    resumed = _build(name)
    tr = _fit(
        resumed, tmp_path / "resumed", epochs=4, ckpt_path=str(tmp_path / "part" / "last.ckpt")
    )
    assert tr.global_step == 8

    assert (params(full) - params(first)).abs().max() > 1e-5  # epochs 3-4 did change things
    torch.testing.assert_close(params(resumed), params(full), rtol=0, atol=1e-12)
    assert resumed.aggregator.state_dict().keys() == full.aggregator.state_dict().keys()
    for key, value in full.aggregator.state_dict().items():
        other = resumed.aggregator.state_dict()[key]
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(other, value, rtol=0, atol=1e-12)
        else:
            assert other == value
    if hasattr(full, "ema"):
        for a, b in zip(full.ema.ema_weights, resumed.ema.ema_weights):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_nequip_train_restart_with_ckpt_path(tmp_path):
    """The user's path: `nequip-train ... ++ckpt_path=.../last.ckpt` after an interruption."""
    repo = Path(__file__).resolve().parents[1]
    exe = str(Path(sys.executable).parent / "nequip-train")
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def run(out, *overrides):
        res = subprocess.run(
            [
                exe,
                "-cp",
                str(repo / "tests" / "configs"),
                "-cn",
                "tiny_emt",
                f"hydra.run.dir={out}",
                "run=[train]",
                *overrides,
            ],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=600,
            check=False,
        )
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        return torch.load(Path(out) / "last.ckpt", map_location="cpu", weights_only=False)

    full = run(tmp_path / "full", "trainer.max_epochs=3")
    run(tmp_path / "part", "trainer.max_epochs=1")
    resumed = run(
        tmp_path / "resumed",
        "trainer.max_epochs=3",
        f"++ckpt_path={tmp_path / 'part' / 'last.ckpt'}",
    )
    assert resumed["global_step"] == full["global_step"] == 6
    for key, value in full["state_dict"].items():
        if key.startswith("model."):
            torch.testing.assert_close(
                resumed["state_dict"][key], value, rtol=0, atol=1e-12, msg=key
            )
