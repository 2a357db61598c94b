"""Deployment of a model trained with nequip_mtl's modules (docs/deployment.md).

A tiny model is trained with the tutorial config by a real ``nequip-train`` launched in
one directory; everything after that runs from *another* directory: ``nequip-package
build`` on the checkpoint (it re-instantiates the training data to get example frames,
so the data path stored in the checkpoint must not depend on the launch directory), and
an evaluation of the package through nequip's ASE calculator in a process where
``nequip_mtl`` is not importable, compared with the checkpoint model's own prediction.
``nequip-compile --mode aotinductor`` is the same path with a compile step of a minute
or more on 2 CPU cores, so that test is marked ``slow``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

# a tiny model and data set; every other setting is the tutorial's
TINY = [
    "train_split=8",
    "val_split=2",
    "test_split=2",
    "batch_size=4",
    "num_layers=1",
    "num_features=4",
    "training_module.model.radial_mlp_width=8",
    "trainer.max_epochs=1",
    "run=[train]",
]


def _run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    res = subprocess.run(
        cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert res.returncode == 0, f"{cmd}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """``best.ckpt`` of a tutorial-style run launched from its own directory, with the
    tutorial's default (launch-directory) data location."""
    launch = tmp_path_factory.mktemp("launch")
    _run([str(BIN / "nequip-mtl-make-data"), "data/alloy.xyz", "--frames", "12", "-q"], launch)
    run_dir = launch / "outputs" / "tiny"
    _run(
        [
            str(BIN / "nequip-train"),
            "--config-path",
            str(REPO / "configs"),
            "--config-name",
            "tutorial",
            *TINY,
            "hydra.run.dir=outputs/tiny",
        ],
        launch,
    )
    return run_dir / "best.ckpt"


@pytest.fixture()
def elsewhere(tmp_path) -> Path:
    """Another working directory, with no ``data/`` in it."""
    d = tmp_path / "elsewhere"
    d.mkdir()
    return d


# Evaluates saved models through nequip's ASE calculator on the first frame of a file and
# prints, per model, energy, forces and stress (or the error) as one JSON line. With
# ``hide_mtl``, nequip_mtl is made unimportable first, and its `nequip.extension` entry
# point invisible: the process sees an environment without nequip_mtl installed.
EVALUATE = textwrap.dedent(
    """
    import json, sys
    xyz, hide_mtl, paths = sys.argv[1], sys.argv[2] == "1", sys.argv[3:]
    if hide_mtl:
        import importlib.metadata as md
        _entry_points = md.entry_points
        def entry_points(**kw):
            eps = _entry_points(**kw)
            if kw.get("group") == "nequip.extension":
                eps = md.EntryPoints(e for e in eps if not e.value.startswith("nequip_mtl"))
            return eps
        md.entry_points = entry_points
        sys.modules["nequip_mtl"] = None  # `import nequip_mtl` raises ImportError
    from ase.io import read
    from nequip.integrations.ase import NequIPCalculator
    out = {"nequip_mtl_loaded": isinstance(sys.modules.get("nequip_mtl"), type(sys))}
    for path in paths:
        atoms = read(xyz, index=0)
        try:
            if path.endswith(".pt2"):
                atoms.calc = NequIPCalculator.from_compiled_model(
                    path, device="cpu", chemical_species_to_atom_type_map=True
                )
            else:
                atoms.calc = NequIPCalculator._from_saved_model(
                    path, device="cpu", chemical_species_to_atom_type_map=True
                )
            out[path] = {
                "energy": float(atoms.get_potential_energy()),
                "forces": atoms.get_forces().tolist(),
                "stress": atoms.get_stress().tolist(),
            }
        except Exception as err:
            out[path] = {"error": f"{type(err).__name__}: {err}"}
    print(json.dumps(out))
    """
)


def _evaluate(paths: list[Path], xyz: Path, cwd: Path, hide_mtl: bool) -> dict:
    cmd = [sys.executable, "-c", EVALUATE, str(xyz), str(int(hide_mtl)), *map(str, paths)]
    out = json.loads(_run(cmd, cwd).stdout.strip().splitlines()[-1])
    return {Path(k) if k in map(str, paths) else k: v for k, v in out.items()}


def _assert_same_prediction(got: dict, ref: dict) -> None:
    assert "error" not in got, got["error"]
    assert np.isfinite(got["energy"]) and np.isfinite(got["forces"]).all()
    np.testing.assert_allclose(got["energy"], ref["energy"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["forces"], ref["forces"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["stress"], ref["stress"], rtol=1e-4, atol=1e-6)


def _reference(ckpt: Path, xyz: Path) -> dict:
    """The checkpoint model's own prediction, through the same calculator, in this
    process (loading a ``.ckpt`` needs nequip_mtl, imported here)."""
    from ase.io import read
    from nequip.integrations.ase import NequIPCalculator

    atoms = read(xyz, index=0)
    atoms.calc = NequIPCalculator._from_saved_model(
        str(ckpt), device="cpu", chemical_species_to_atom_type_map=True
    )
    return {
        "energy": float(atoms.get_potential_energy()),
        "forces": atoms.get_forces().tolist(),
        "stress": atoms.get_stress().tolist(),
    }


def test_checkpoint_stores_an_absolute_data_path(trained):
    ckpt = torch.load(trained, map_location="cpu", weights_only=False)
    info = ckpt["hyper_parameters"]["info_dict"]
    assert info["training_module"]["_target_"] == "nequip_mtl.train.ConFIGLightningModule"
    file_path = info["data"]["split_dataset"]["dataset"]["file_path"]
    assert Path(file_path).is_absolute(), file_path
    assert Path(file_path) == trained.parents[2] / "data" / "alloy.xyz"


def test_package_from_another_directory_evaluates_without_nequip_mtl(trained, elsewhere):
    """``nequip-package build`` from another directory; the package, loaded where
    nequip_mtl is not installed, predicts what the checkpoint model predicts. The
    checkpoint itself does not load there."""
    xyz = trained.parents[2] / "data" / "alloy.xyz"
    package = elsewhere / "model.nequip.zip"
    _run([str(BIN / "nequip-package"), "build", str(trained), package.name], elsewhere)
    assert package.is_file()
    out = _evaluate([package, trained], xyz, elsewhere, hide_mtl=True)
    assert not out["nequip_mtl_loaded"]
    ref = _reference(trained, xyz)
    _assert_same_prediction(out[package], ref)
    # the prediction is the model's, not a constant: a rattled frame has nonzero forces
    assert np.abs(out[package]["forces"]).max() > 1e-3
    assert "nequip_mtl" in out[trained]["error"]


@pytest.mark.slow
def test_compile_aotinductor_from_another_directory(trained, elsewhere):
    """``nequip-compile --mode aotinductor --target ase`` (about 1-2.5 min of compiling
    on 2 CPU cores even for a tiny model, hence ``slow``), evaluated through
    ``NequIPCalculator.from_compiled_model`` without nequip_mtl."""
    xyz = trained.parents[2] / "data" / "alloy.xyz"
    compiled = elsewhere / "model.nequip.pt2"
    _run(
        [
            str(BIN / "nequip-compile"),
            str(trained),
            compiled.name,
            "--device",
            "cpu",
            "--mode",
            "aotinductor",
            "--target",
            "ase",
        ],
        elsewhere,
    )
    out = _evaluate([compiled], xyz, elsewhere, hide_mtl=True)
    assert not out["nequip_mtl_loaded"]
    _assert_same_prediction(out[compiled], _reference(trained, xyz))
