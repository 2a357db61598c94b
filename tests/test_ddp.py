"""DDP correctness: 2 gloo ranks with per-rank batch b == 1 process with batch 2b.

Aggregation is nonlinear, so it must see the per-task gradients of the global batch:
averaging per-rank aggregated updates would be wrong. Each global batch here is the whole
training split, so both runs see exactly the same frames in every step.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

from tests._ddp import launch

pytestmark = pytest.mark.ddp

MOMENTUM = {"_target_": "nequip_mtl.aggregators.MomentumConFIG"}
#: rows all-reduced per optimizer step (one collective of the stacked rows per step)
REDUCED_ROWS = {
    "momentum_config": [1, 1, 1],
    "momentum_config_2": [2, 2, 2],
    "config_null_first": [2, 2, 2],
    "config_null_middle": [2, 2, 2],
    "upgrad_weights_every": [3, 1, 3],
}

RUNS = [
    {"name": "config", "module": "nequip_mtl.train.ConFIGLightningModule"},
    {
        "name": "config_null_first",
        "module": "nequip_mtl.train.ConFIGLightningModule",
        "module_kwargs": {
            "loss": {
                "_target_": "nequip.train.EnergyForceStressLoss",
                "coeffs": {"total_energy": None, "forces": 1.0, "stress": 2.0},
            }
        },
    },
    {
        "name": "momentum_config",
        "module": "nequip_mtl.train.MultitaskLightningModule",
        "module_kwargs": {"aggregator": MOMENTUM},
    },
    *[
        {
            "name": name.lower(),
            "module": "nequip_mtl.train.MultitaskLightningModule",
            "module_kwargs": {"aggregator": {"_target_": f"nequip_mtl.aggregators.{name}"}},
        }
        for name in ("PCGrad", "UPGrad")
    ],
    # active rows that are not contiguous in the loss (a null component between them)
    {
        "name": "config_null_middle",
        "module": "nequip_mtl.train.ConFIGLightningModule",
        "module_kwargs": {
            "loss": {
                "_target_": "nequip.train.EnergyForceStressLoss",
                "coeffs": {"total_energy": 1.0, "forces": None, "stress": 2.0},
            }
        },
    },
    # two tasks per step: {0,1}, {2,0}, {1,2}: every task is back-propagated
    {
        "name": "momentum_config_2",
        "module": "nequip_mtl.train.MultitaskLightningModule",
        "module_kwargs": {"aggregator": {**MOMENTUM, "tasks_per_step": 2}},
    },
    # refresh, held weights, refresh: the held step reduces one row
    {
        "name": "upgrad_weights_every",
        "module": "nequip_mtl.train.MultitaskLightningModule",
        "module_kwargs": {
            "aggregator": {"_target_": "nequip_mtl.aggregators.UPGrad"},
            "weights_every": 2,
        },
    },
    # two micro-batches per optimizer step, each half of the training split
    {
        "name": "config_accumulate",
        "module": "nequip_mtl.train.ConFIGLightningModule",
        "accumulate": 2,
    },
    {"name": "weighted_sum", "module": "nequip.train.NequIPLightningModule"},
    # adaptive weighting: every rank must hold the same coefficients
    {
        "name": "softadapt",
        "module": "nequip.train.NequIPLightningModule",
        "callbacks": [
            {
                "_target_": "nequip_mtl.train.callbacks.SoftAdapt",
                "beta": 1.1,
                "interval": "epoch",
                "frequency": 1,
            }
        ],
    },
    {
        "name": "rlw",
        "module": "nequip.train.NequIPLightningModule",
        "callbacks": [{"_target_": "nequip_mtl.train.callbacks.RandomLossWeighting", "seed": 3}],
    },
    {"name": "famo", "module": "nequip_mtl.train.FAMOLightningModule"},
]


def _launch(spec: dict, out: Path, world: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    spec_path = out / "spec.json"
    spec_path.write_text(json.dumps(spec))
    launch([sys.executable, "-m", "tests.ddp_worker", str(spec_path), str(out)], world)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    _launch({"frames": 8, "epochs": 3, "runs": RUNS, "strategy": None}, out, world=1)
    return out


@pytest.mark.parametrize(
    "strategy",
    [
        {"_target_": "nequip.train.SimpleDDPStrategy"},
        {"_target_": "lightning.pytorch.strategies.DDPStrategy"},
    ],
    ids=["SimpleDDPStrategy", "DDPStrategy"],
)
def test_two_ranks_match_one_process(strategy, reference, tmp_path):
    _launch({"frames": 8, "epochs": 3, "runs": RUNS, "strategy": strategy}, tmp_path, world=2)
    for run in RUNS:
        one = torch.load(reference / f"{run['name']}.pt")
        two = torch.load(tmp_path / f"{run['name']}.pt")
        assert (one["world_size"], two["world_size"]) == (1, 2)
        assert one["steps"] == two["steps"] == 3  # one global batch per epoch
        if run["module"].startswith("nequip_mtl.train.") and "FAMO" not in run["module"]:
            # one all-reduce of the stacked task-gradient rows per step (not one per task):
            # the active rows, the rows MomentumConFIG back-propagated, one between refreshes
            rows = REDUCED_ROWS.get(run["name"], [3, 3, 3])
            assert [r for r, _ in two["task_matrix_reduces"]] == rows
        moved = (one["params"] - torch.load(reference / "weighted_sum.pt")["params"]).abs().max()
        if run["name"] != "weighted_sum":
            assert moved > 1e-6  # ConFIG's trajectory differs from the weighted sum's
        torch.testing.assert_close(
            two["params"], one["params"], rtol=0, atol=1e-12, msg=run["name"]
        )
        coeffs = torch.load(tmp_path / f"{run['name']}.coeffs_all_ranks.pt")
        assert torch.equal(coeffs[0], coeffs[1])
        assert two["coeffs"].keys() == one["coeffs"].keys()
        for key, value in one["coeffs"].items():
            assert (
                (two["coeffs"][key] is None)
                if value is None
                else two["coeffs"][key] == pytest.approx(value, rel=1e-12)
            )
    for name in ("softadapt", "rlw"):
        initial = {"per_atom_energy_mse": 1 / 3, "forces_mse": 1 / 3, "stress_mse": 1 / 3}
        assert torch.load(tmp_path / f"{name}.pt")["coeffs"] != pytest.approx(initial)
