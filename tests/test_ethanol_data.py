"""The real DFT ethanol data (``benchmarks/data/ethanol_reduced_100.xyz``): it loads
through nequip's ``ASEDataset``, ``configs/ethanol.yaml`` composes on it, and the accuracy
benchmark reports its kcal/mol errors in meV (x 43.364) in every number it prints."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from benchmarks import accuracy
from benchmarks import methods as M
from benchmarks import protocol as C

REPO = Path(__file__).resolve().parents[1]

KCAL_MOL_IN_MEV = 43.364  # written out here on purpose: an independent constant


def _dataset():
    from nequip.data.dataset import ASEDataset
    from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper, NeighborListTransform

    return ASEDataset(
        file_path=str(C.ETHANOL),
        ase_args={"format": "extxyz"},
        transforms=[
            ChemicalSpeciesToAtomTypeMapper(
                model_type_names=["C", "H", "O"],
                chemical_species_to_atom_type_map={"C": "C", "H": "H", "O": "O"},
            ),
            NeighborListTransform(r_max=4.5),
        ],
    )


def test_loads_through_ase_dataset():
    ds = _dataset()
    assert len(ds) == 100
    energies = []
    for i in (0, 1, 50, 99):
        d = ds[i]
        assert {"pos", "atom_types", "total_energy", "forces", "edge_index"} <= set(d)
        assert "stress" not in d
        assert d["pos"].shape == (9, 3) and d["forces"].shape == (9, 3)
        assert sorted(d["atom_types"].tolist()) == [0, 0] + [1] * 6 + [2]  # C2 H6 O
        assert not bool(d["pbc"].any())  # non-periodic
        assert d["edge_index"].shape[1] == 9 * 8  # every pair within 4.5 Å
        energies.append(float(d["total_energy"]))
    assert all(-97_100 < e < -97_050 for e in energies)  # kcal/mol, unshifted
    assert C.KCAL_MOL_TO_MEV == KCAL_MOL_IN_MEV


def test_ethanol_config_composes():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = compose(config_name="ethanol", overrides=["trainer.max_epochs=1"])
    raw = OmegaConf.to_container(cfg, resolve=False)  # ${hydra:...} needs a real run
    assert raw["data_file"] == "${hydra:runtime.cwd}/benchmarks/data/ethanol_reduced_100.xyz"
    assert (REPO / "benchmarks" / "data" / "ethanol_reduced_100.xyz") == C.ETHANOL
    assert raw["data"]["split_dataset"]["dataset"]["file_path"] == "${data_file}"
    assert cfg.training_module._target_ == "nequip_mtl.train.ConFIGLightningModule"
    assert cfg.training_module.loss._target_ == "nequip.train.EnergyForceLoss"
    assert set(cfg.training_module.loss.coeffs) == {"total_energy", "forces"}
    assert list(cfg.model_type_names) == ["C", "H", "O"]


def _independent_mae(state: Path, meta: dict) -> tuple[float, float]:
    """Validation MAEs (kcal/mol/atom, kcal/mol/Å) of a saved final model, recomputed here
    with plain torch (not nequip's metrics)."""
    a = meta["args"]
    model = C.model_config(
        "float32",
        meta["data"],
        num_layers=a["num_layers"],
        num_features=a["num_features"],
        l_max=a["l_max"],
        r_max=a["r_max"],
        radial_width=a["radial_width"],
        model_seed=0,
        type_names=C.ETHANOL_TYPE_NAMES,
    )
    module = C.build_module(M.methods()["ws"], model, 2, lr=a["lr"])
    module.load_state_dict(torch.load(state))
    dm = C.datamodule(
        C.ETHANOL,
        a["n_train"],
        a["frames"] - a["n_train"],
        a["batch_size"],
        a["r_max"],
        seed=1,
        type_names=C.ETHANOL_TYPE_NAMES,
    )
    dm.setup("fit")
    e_err, f_err = [], []
    loaders = dm.val_dataloader()
    for batch in loaders[0] if isinstance(loaders, list | tuple) else loaders:
        out = module(dict(batch))  # the model, with grad on (forces)
        n = torch.bincount(batch["batch"]).to(out["total_energy"].dtype)
        e_err.append(((out["total_energy"].view(-1) - batch["total_energy"].view(-1)) / n).abs())
        f_err.append((out["forces"] - batch["forces"]).abs().reshape(-1))
    return float(torch.cat(e_err).mean()), float(torch.cat(f_err).mean())


def test_benchmark_reports_meV(tmp_path, capsys):
    out = tmp_path / "eth"
    # a tiny budget: the run stops after its one epoch (16 steps), so the equal-time,
    # the equal-epochs and the final validation are all of the same final model
    accuracy.main(
        ["--dataset", "ethanol", "--methods", "ws", "--seeds", "0", "--budget-s", "0.001",
         "--epochs", "1", "--num-features", "8", "--radial-width", "8", "--num-layers", "1",
         "--out", str(out), "--save-states", str(tmp_path)]
    )  # fmt: skip
    printed = capsys.readouterr().out
    data = json.loads(out.with_suffix(".json").read_text())
    (run,) = data["runs"]
    assert run["steps"] == 16 and run["budget"]["step"] == 16 and run["epochs"]["step"] == 16
    e_kcal, f_kcal = _independent_mae(tmp_path / "ws_seed0.pt", data["meta"])
    # the json keeps kcal/mol; nequip's metrics agree with the recomputation
    assert run["budget"]["per_atom_energy_mae"] == pytest.approx(e_kcal, rel=1e-4)
    assert run["budget"]["forces_mae"] == pytest.approx(f_kcal, rel=1e-4)
    e_mev, f_mev = e_kcal * KCAL_MOL_IN_MEV, f_kcal * KCAL_MOL_IN_MEV
    md = out.with_suffix(".md").read_text()
    assert "meV/atom" in md and "1 kcal/mol = 43.364 meV" in md
    rows = re.findall(r"^\| \*\*weighted sum 1:1\*\* \| ([\d.]+) ± [\d.]+ \| ([\d.]+) ±", md, re.M)
    assert len(rows) == 2  # equal time, equal epochs
    for e_cell, f_cell in rows:
        assert float(e_cell) == pytest.approx(e_mev, abs=0.051)
        assert float(f_cell) == pytest.approx(f_mev, abs=0.051)
    (line,) = [x for x in printed.splitlines() if x.startswith("[1/1")]
    f_print, e_print = re.search(
        r"force MAE ([\d.]+) meV/Å, energy ([\d.]+) meV/atom", line
    ).groups()
    assert float(f_print) == pytest.approx(f_mev, abs=0.051)
    assert float(e_print) == pytest.approx(e_mev, abs=0.0051)
    # a conversion left out (kcal/mol shown as meV) or eV's 1e3 would be far off
    assert abs(f_mev - f_kcal) > 1 and abs(f_mev - 1e3 * f_kcal) > 1
