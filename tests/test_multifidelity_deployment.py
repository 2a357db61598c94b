"""Multi-fidelity training with ``configs/multifidelity.yaml`` and deployment at one level of
theory (docs/multifidelity.md), as docs/deployment.md is tested (tests/test_deployment.py).

A real ``nequip-train`` on the DFT and xTB ethanol files (tiny splits and model) is launched in
one directory; from *another* one, ``nequip-package build`` packages the checkpoint,
``nequip-package modify ... --modifier select_fidelity dataset=<name>`` deploys it at each
fidelity, and each deployed package is evaluated through nequip's ASE calculator in a process
where ``nequip_mtl`` cannot be imported. It must predict what the training model predicts for
that dataset's frames: the checkpoint's model through the same calculator, given the frame's
``dataset_index``. The DFT and xTB files are the ones shipped in ``benchmarks/data/``, found
by the config's own defaults (the run is launched from a copy of the repository root).
"""

from __future__ import annotations

import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_deployment import _assert_same_prediction, _evaluate, _run

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
#: the config's default data files, relative to the launch directory
DATA_FILES = ["benchmarks/data/ethanol_reduced_100.xyz", "benchmarks/data/ethanol_xtb_1200.xyz"]
DFT = REPO / DATA_FILES[0]

TINY = [
    "dft_train=6",
    "dft_val=2",
    "dft_test=92",
    "xtb_train=6",
    "xtb_val=2",
    "xtb_test=1192",
    "num_layers=1",
    "num_features=4",
    "training_module.model.model.radial_mlp_width=8",
    "max_epochs=1",
    "run=[train]",
    "hydra.run.dir=outputs/tiny",
]


@pytest.fixture(scope="module", params=[False, True], ids=["shifts", "heads_trunk"])
def heads(request) -> bool:
    """Trained without, or with per-dataset readout heads and type-embedding corrections
    (``readout_heads=true fidelity_embedding=true``)."""
    return request.param


@pytest.fixture(scope="module")
def trained(heads, tmp_path_factory) -> Path:
    # a launch directory holding only the shipped data files, where a fresh clone's root has
    # them: the config's default file paths are the ones used
    launch = tmp_path_factory.mktemp("launch")
    for name in DATA_FILES:
        (launch / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / name, launch / name)
    cmd = [str(BIN / "nequip-train"), "--config-path", str(REPO / "configs")]
    flag = str(heads).lower()
    _run([*cmd, "--config-name", "multifidelity", *TINY, f"readout_heads={flag}",
          f"fidelity_embedding={flag}"], launch)  # fmt: skip
    return launch / "outputs" / "tiny" / "best.ckpt"


@pytest.fixture(scope="module")
def packages(trained, tmp_path_factory) -> dict[str, Path]:
    """From another directory: the multi-fidelity package, then one per fidelity."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    _run([str(BIN / "nequip-package"), "build", str(trained), "multi.nequip.zip"], elsewhere)
    out = {}
    for name in ("dft", "xtb"):
        out[name] = elsewhere / f"{name}.nequip.zip"
        modifier = ["--modifier", "select_fidelity", f"dataset={name}"]
        _run([str(BIN / "nequip-package"), "modify", "multi.nequip.zip", out[name].name,
              *modifier], elsewhere)  # fmt: skip
    return out


def _training_model_prediction(ckpt: Path, xyz: Path, dataset_index: int) -> dict:
    """The checkpoint's (multi-fidelity) model through nequip's ASE calculator, each input
    given ``dataset_index`` (nequip_mtl is imported here: loading a ``.ckpt`` needs it)."""
    from ase.io import read
    from nequip.integrations.ase import NequIPCalculator

    atoms = read(xyz, index=0)
    calc = NequIPCalculator._from_saved_model(
        str(ckpt), device="cpu", chemical_species_to_atom_type_map=True
    )
    to_data = calc.atoms_to_data
    calc.atoms_to_data = lambda a: {**to_data(a), "dataset_index": torch.tensor([dataset_index])}
    atoms.calc = calc
    return {
        "energy": float(atoms.get_potential_energy()),
        "forces": atoms.get_forces().tolist(),
        "stress": atoms.get_stress().tolist(),
    }


def _heads_of(ckpt: Path) -> list[torch.Tensor]:
    """The per-dataset readout heads' weights and type-embedding corrections in the
    checkpoint's model state."""
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    keys = sorted(k for k in state if ".per_atom_energy_readout.heads." in k)
    return [state[k] for k in keys] + [v for k, v in state.items() if k.endswith(".corrections")]


def test_deployed_packages_predict_each_fidelity_without_nequip_mtl(
    heads, trained, packages, tmp_path
):
    """Both deployed packages on a DFT frame, in one process without nequip_mtl, against the
    training model given that frame as a frame of each dataset. With heads, the two heads
    were trained apart (one epoch), so each package must have taken its own."""
    out = _evaluate([packages["dft"], packages["xtb"]], DFT, tmp_path, hide_mtl=True)
    assert not out["nequip_mtl_loaded"]
    expected = [_training_model_prediction(trained, DFT, d) for d in (0, 1)]
    for d, name in enumerate(["dft", "xtb"]):
        _assert_same_prediction(out[packages[name]], expected[d])
        assert np.abs(out[packages[name]]["forces"]).max() > 1e-3
    weights = _heads_of(trained)
    assert len(weights) == (3 if heads else 0)
    if heads:  # the heads differ, the corrections moved, and the two fidelities' forces differ
        assert (weights[0] - weights[1]).abs().max() > 1e-6
        assert weights[2].abs().amax(dim=(1, 2)).min() > 1e-6
        diff = np.subtract(expected[0]["forces"], expected[1]["forces"])
        assert np.abs(diff).max() > 1e-6
    # the two fidelities' energy zeros differ by about the xTB - DFT gap (+89,941 kcal/mol per
    # molecule, fitted here on 6 frames of each)
    gap = out[packages["xtb"]]["energy"] - out[packages["dft"]]["energy"]
    assert 89_800 < gap < 90_100, gap
    # the deployed packages hold no nequip_mtl code; the multi-fidelity one holds its modules
    # (and, through `dataset_index`'s one definition, the import-light data package; no
    # generator, data module or callback)
    for name in ("dft", "xtb"):
        with zipfile.ZipFile(packages[name]) as z:
            assert not [f for f in z.namelist() if "nequip_mtl" in f]
    with zipfile.ZipFile(packages["dft"].parent / "multi.nequip.zip") as z:
        ours = {f.split("nequip_mtl/", 1)[1] for f in z.namelist() if "nequip_mtl/" in f}
    assert {"model/energy_shifts.py", "model/readout_heads.py", "model/type_embedding.py",
            "data/keys.py"} <= ours  # fmt: skip
    assert not {"tools/emt_alloy.py", "data/multi_dataset.py", "train/__init__.py"} & ours


def test_the_multi_fidelity_package_refuses_an_unknown_fidelity(packages, tmp_path):
    from nequip.scripts.package import main

    multi = packages["dft"].parent / "multi.nequip.zip"
    args = ["modify", str(multi), str(tmp_path / "x.nequip.zip")]
    with pytest.raises(ValueError, match=r"'ccsd', which is not one of this model's datasets"):
        main([*args, "--modifier", "select_fidelity", "dataset=ccsd"])
    assert not (tmp_path / "x.nequip.zip").exists()


@pytest.mark.slow
def test_compile_aotinductor_the_deployed_package(heads, trained, packages, tmp_path):
    """``nequip-compile --mode aotinductor --target ase`` of the DFT package, evaluated through
    ``NequIPCalculator.from_compiled_model`` without nequip_mtl."""
    if heads:  # measured once: it passes, in 60 s
        pytest.skip("the folded heads model is nequip's own classes (test_multifidelity_heads)")
    compiled = tmp_path / "dft.nequip.pt2"
    _run(
        [str(BIN / "nequip-compile"), str(packages["dft"]), str(compiled), "--device", "cpu",
         "--mode", "aotinductor", "--target", "ase"],
        tmp_path,
    )  # fmt: skip
    out = _evaluate([compiled], DFT, tmp_path, hide_mtl=True)
    assert not out["nequip_mtl_loaded"]
    _assert_same_prediction(out[compiled], _training_model_prediction(trained, DFT, 0))
