"""The step engine refactor (issue 17) changed no trajectory.

``tests/data/engine_parity_reference.pt`` holds the parameters after a few optimizer steps
of the runs below, recorded with the module *before* the step engine existed (commit
55288c1, ``python -m tests.test_engine_parity record``). This is a regression reference,
not a correctness oracle: correctness is what the rest of the suite checks against nequip
and closed forms. Every run here must still give the same parameters, bit for bit (the
operations are the same ones, in the same order).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests._ddp import launch
from tests._harness import datamodule, fit, params

REFERENCE = Path(__file__).with_name("data") / "engine_parity_reference.pt"
ADAM = {"_target_": "torch.optim.Adam", "lr": 0.01}

RUNS = {
    "config_float64": dict(module="nequip_mtl.train.ConFIGLightningModule", optimizer=ADAM),
    "config_float32": dict(module="nequip_mtl.train.ConFIGLightningModule", dtype="float32"),
    "upgrad_every4_accumulate2": dict(
        module="nequip_mtl.train.MultitaskLightningModule",
        aggregator={"_target_": "nequip_mtl.aggregators.UPGrad"},
        weights_every=4,
        optimizer=ADAM,
        accumulate=2,
        batch_size=2,
    ),
    "momentum_config": dict(
        module="nequip_mtl.train.MultitaskLightningModule",
        aggregator={"_target_": "nequip_mtl.aggregators.MomentumConFIG"},
        optimizer=ADAM,
    ),
    "config_scheduled": dict(
        module="nequip_mtl.train.ConFIGLightningModule",
        callbacks=[
            {
                "_target_": "nequip.train.callbacks.LossCoefficientScheduler",
                "schedule": {
                    1: {"per_atom_energy_mse": 1.0, "forces_mse": 4.0, "stress_mse": 1.0},
                    2: {"per_atom_energy_mse": 1.0, "forces_mse": 4.0},
                },
            }
        ],
    ),
    "famo": dict(module="nequip_mtl.train.FAMOLightningModule", optimizer=ADAM),
}
DDP_RUNS = [
    {"name": "ddp_config", "module": "nequip_mtl.train.ConFIGLightningModule"},
    {
        "name": "ddp_upgrad_every2",
        "module": "nequip_mtl.train.MultitaskLightningModule",
        "module_kwargs": {
            "aggregator": {"_target_": "nequip_mtl.aggregators.UPGrad"},
            "weights_every": 2,
        },
    },
]


def run(name: str, tmp_path: Path) -> torch.Tensor:
    from hydra.utils import get_class, instantiate

    spec = dict(RUNS[name])
    module = spec.pop("module")
    callbacks = [instantiate(c) for c in spec.pop("callbacks", [])]
    accumulate = spec.pop("accumulate", 1)
    batch_size = spec.pop("batch_size", 4)
    module, _ = fit(
        get_class(module),
        tmp_path,
        max_epochs=3,
        data=datamodule(batch_size=batch_size),
        trainer_kwargs={"callbacks": callbacks, "accumulate_grad_batches": accumulate},
        **spec,
    )
    return params(module)


def run_ddp(out: Path) -> dict[str, torch.Tensor]:
    out.mkdir(parents=True, exist_ok=True)
    spec = {
        "frames": 8,
        "epochs": 3,
        "runs": DDP_RUNS,
        "strategy": {"_target_": "nequip.train.SimpleDDPStrategy"},
    }
    (out / "spec.json").write_text(json.dumps(spec))
    launch([sys.executable, "-m", "tests.ddp_worker", str(out / "spec.json"), str(out)], 2)
    return {r["name"]: torch.load(out / f"{r['name']}.pt")["params"].double() for r in DDP_RUNS}


@pytest.mark.parametrize("name", list(RUNS))
def test_trajectory_unchanged(name, tmp_path):
    reference = torch.load(REFERENCE)[name]
    assert torch.equal(run(name, tmp_path), reference), name


@pytest.mark.ddp
def test_ddp_trajectory_unchanged(tmp_path):
    reference = torch.load(REFERENCE)
    for name, got in run_ddp(tmp_path).items():
        assert torch.equal(got, reference[name]), name


if __name__ == "__main__" and sys.argv[1:] == ["record"]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        recorded = {name: run(name, Path(tmp) / name) for name in RUNS}
        recorded.update(run_ddp(Path(tmp) / "ddp"))
    REFERENCE.parent.mkdir(exist_ok=True)
    torch.save(recorded, REFERENCE)
    print({k: tuple(v.shape) for k, v in recorded.items()})
