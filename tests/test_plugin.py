"""The package as a nequip extension: entry point, import order, nequip-train resolution."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )


def _nequip_train(config: str, out: Path, cwd: Path, **env) -> subprocess.CompletedProcess:
    """A real `nequip-train` run of ``tests/configs/<config>.yaml`` into ``out``."""
    return subprocess.run(
        [
            str(BIN / "nequip-train"),
            "-cp",
            str(REPO / "tests" / "configs"),
            "-cn",
            config,
            f"hydra.run.dir={out}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        env=dict(os.environ, OMP_NUM_THREADS="1", **env),
        check=False,
    )


def test_import_nequip_loads_extension_without_circular_import():
    res = _run(
        "import sys, nequip; "
        "assert 'nequip_mtl' in sys.modules, 'entry point did not load nequip_mtl'; "
        "import nequip_mtl.train, nequip_mtl.aggregators; print('ok')"
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_import_extension_first_then_nequip():
    res = _run("import nequip_mtl; import nequip; import nequip_mtl.train; print('ok')")
    assert res.returncode == 0, res.stderr


def test_entry_point_is_registered():
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="nequip.extension") if ep.name == "init_always"]
    assert "nequip_mtl" in [ep.value for ep in eps]


def test_nequip_train_resolves_our_targets(tmp_path):
    """A real `nequip-train` run of our ConFIG module with a cosine LR schedule."""
    out = tmp_path / "run"
    res = _nequip_train("tiny_emt", out, tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ckpt = torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)
    target = ckpt["hyper_parameters"]["info_dict"]["training_module"]["_target_"]
    assert target == "nequip_mtl.train.ConFIGLightningModule"
    assert "nequip_mtl" in ckpt  # our module's own checkpoint state
    with open(out / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get("mtl/cos_update/forces_mse")]
    assert len(logged) == 4  # 2 epochs x 2 steps, log_every_n_steps=1
    assert any(r.get("test0_epoch/forces_mae") for r in rows)


@pytest.mark.parametrize(
    "cmd",
    [
        "import nequip_mtl; print(nequip_mtl.__version__)",
    ],
)
def test_version(cmd):
    from importlib.metadata import version

    res = _run(cmd)
    assert res.stdout.strip() == version("nequip-mtl")


def _nan_forces_xyz(path: Path, frames: int = 16) -> None:
    """EMT Cu frames whose energies and stresses are real and forces all NaN."""
    import numpy as np
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    rng = np.random.default_rng(0)
    atoms_list = []
    for _ in range(frames):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
        atoms.rattle(0.05, rng=rng)
        atoms.calc = EMT()
        energy, stress = atoms.get_potential_energy(), atoms.get_stress()
        forces = np.full((len(atoms), 3), np.nan)
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces, stress=stress)
        atoms_list.append(atoms)
    write(path, atoms_list, format="extxyz")


def test_nequip_train_with_nan_forces_fails_and_names_forces(tmp_path):
    """Forces NaN in every frame: every step would be skipped. The run must exit non-zero,
    name the forces loss, and leave no checkpoint of an untrained model; the label check
    refuses it at fit start, before any step."""
    data = tmp_path / "nan_forces.xyz"
    _nan_forces_xyz(data)
    out = tmp_path / "run"
    res = _nequip_train("tiny_nan_forces", out, tmp_path, NAN_FORCES_XYZ=str(data))
    log = res.stdout + res.stderr
    assert res.returncode != 0, log[-3000:]
    assert "'forces_mse' needs the label `forces`" in log, log[-3000:]
    assert "non-finite (NaN/inf) in all" in log and "per_atom_energy_mse" not in log, log[-3000:]
    assert not list(out.rglob("*.ckpt"))
