"""Tests for the offline EMT alloy data generator (``nequip_mtl.tools``) and the tutorial config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ase.calculators.emt import EMT
from omegaconf import OmegaConf

from nequip_mtl.tools import generate_frames, make_dataset, write_frames

REPO = Path(__file__).resolve().parents[1]
TUTORIAL_CONFIG = REPO / "configs" / "tutorial.yaml"
FAST = dict(num_frames=24)  # small enough for ~0.3 s per generation


@pytest.fixture(scope="module")
def frames():
    return generate_frames(num_frames=40, seed=3)


@pytest.fixture(scope="module")
def xyz_file(tmp_path_factory, frames):
    path = tmp_path_factory.mktemp("emt_alloy") / "alloy.xyz"
    write_frames(frames, path)
    return path


# === determinism ===


def test_same_seed_gives_identical_bytes(tmp_path):
    a, b = tmp_path / "a.xyz", tmp_path / "b.xyz"
    make_dataset(a, seed=7, **FAST)
    make_dataset(b, seed=7, **FAST)
    assert a.read_bytes() == b.read_bytes()


def test_different_seed_gives_different_data(tmp_path):
    a, b = tmp_path / "a.xyz", tmp_path / "b.xyz"
    make_dataset(a, seed=7, **FAST)
    make_dataset(b, seed=8, **FAST)
    assert a.read_bytes() != b.read_bytes()


# === labels ===


def test_labels_match_fresh_emt(xyz_file):
    import ase.io

    read_back = ase.io.read(xyz_file, index=":")
    # one frame of every kind, recomputed from the *written* (rounded) positions
    checked = set()
    for atoms in read_back:
        kind = atoms.info["config_type"]
        if kind in checked:
            continue
        checked.add(kind)
        ref = atoms.copy()
        ref.calc = EMT()
        np.testing.assert_allclose(
            atoms.get_potential_energy(), ref.get_potential_energy(), rtol=0, atol=1e-5
        )
        np.testing.assert_allclose(atoms.get_forces(), ref.get_forces(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(atoms.get_stress(), ref.get_stress(), rtol=0, atol=1e-6)
    assert checked == {"bulk", "vacancy", "slab"}


def test_labels_are_not_trivial(frames):
    energies = np.array([a.get_potential_energy() / len(a) for a in frames])
    stresses = np.array([a.get_stress() for a in frames])
    forces = np.concatenate([a.get_forces() for a in frames])
    assert energies.std() > 0.02  # eV/atom
    assert np.sqrt((forces**2).mean()) > 0.1  # eV/Å
    # every stress component varies across frames (not only the hydrostatic part)
    assert (stresses.std(axis=0) > 1e-3).all()


# === variety ===


def test_composition_strain_and_kind_variety(frames):
    kinds = {a.info["config_type"] for a in frames}
    assert kinds == {"bulk", "vacancy", "slab"}
    assert len({a.info["composition"] for a in frames}) >= 3
    assert len({a.info["rattle"] for a in frames}) >= 3
    assert {s for a in frames for s in a.get_chemical_symbols()} == {"Cu", "Ni", "Pd"}
    vol = np.array([a.info["volumetric_strain"] for a in frames if a.info["config_type"] == "bulk"])
    assert vol.min() < -0.02 and vol.max() > 0.02
    sizes = [len(a) for a in frames]
    assert min(sizes) >= 8 and max(sizes) <= 32
    # all frames periodic in 3D; slabs have a vacuum gap along z wider than the EMT cut-off
    assert all(a.pbc.all() for a in frames)
    for slab in (a for a in frames if a.info["config_type"] == "slab"):
        z = slab.positions[:, 2]
        assert slab.cell[2, 2] - (z.max() - z.min()) > 8.0


def test_elements_argument(tmp_path):
    fr = generate_frames(num_frames=10, seed=0, elements=["Au", "Pt"])
    assert {s for a in fr for s in a.get_chemical_symbols()} <= {"Au", "Pt"}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_frames=0), "num_frames"),
        (dict(elements=["Cu", "Fe"]), "unsupported"),
        (dict(elements=[]), "at least one"),
        (dict(elements=["Cu", "Cu"]), "duplicate"),
        (dict(vacancy_fraction=0.7, slab_fraction=0.5), "sum"),
        (dict(rattle_amplitudes=[]), "rattle"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_frames(**kwargs)


# === nequip reader ===


def test_loads_through_nequip_ase_dataset(xyz_file, frames):
    from nequip.data import AtomicDataDict
    from nequip.data.dataset import ASEDataset

    ds = ASEDataset(file_path=str(xyz_file), ase_args={"format": "extxyz"})
    assert len(ds) == len(frames)
    for idx in (0, len(frames) - 1):
        data = ds[idx]
        n = len(frames[idx])
        assert data[AtomicDataDict.POSITIONS_KEY].shape == (n, 3)
        assert data[AtomicDataDict.FORCE_KEY].shape == (n, 3)
        assert data[AtomicDataDict.TOTAL_ENERGY_KEY].shape == (1, 1)
        assert data[AtomicDataDict.STRESS_KEY].shape == (1, 3, 3)
        # same numbers and sign convention as ASE (nequip's stress == ASE's stress)
        np.testing.assert_allclose(
            data[AtomicDataDict.TOTAL_ENERGY_KEY].item(),
            frames[idx].get_potential_energy(),
            rtol=1e-6,
        )
        np.testing.assert_allclose(
            data[AtomicDataDict.STRESS_KEY][0].double().numpy(),
            frames[idx].get_stress(voigt=False),
            rtol=1e-5,
            atol=1e-7,
        )


# === CLI ===


def _cli(*args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "nequip_mtl.tools.make_data", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


def test_cli_writes_requested_frames(tmp_path):
    import ase.io

    out = tmp_path / "sub" / "alloy.xyz"
    res = _cli(str(out), "--frames", "12", "--seed", "5", "--elements", "Cu,Ag")
    assert res.returncode == 0, res.stderr
    assert "wrote 12 frames" in res.stdout
    fr = ase.io.read(out, index=":")
    assert len(fr) == 12
    assert {s for a in fr for s in a.get_chemical_symbols()} <= {"Cu", "Ag"}
    # the CLI and the library function produce the same file
    lib = tmp_path / "lib.xyz"
    make_dataset(lib, num_frames=12, seed=5, elements=["Cu", "Ag"])
    assert out.read_bytes() == lib.read_bytes()


def test_cli_rejects_zero_frames_in_subprocess(tmp_path):
    out = tmp_path / "x.xyz"
    res = _cli(str(out), "--frames", "0")
    assert res.returncode == 2
    assert "argument --frames: must be >= 1, got 0" in res.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--frames", "-3"], "--frames: must be >= 1"),
        (["--frames", "ten"], "expected an integer"),
        (["--elements", "Cu,Fe"], "unsupported element"),
        (["--elements", "Cu,Cu"], "duplicate elements"),
        (["--slab-fraction", "1.5"], "must be in [0, 1]"),
        (["--slab-fraction", "0.8", "--vacancy-fraction", "0.5"], "must be <= 1"),
    ],
)
def test_cli_rejects_bad_arguments(tmp_path, capsys, args, message):
    from nequip_mtl.tools.make_data import main

    out = tmp_path / "x.xyz"
    with pytest.raises(SystemExit) as exc:
        main([str(out), *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_console_scripts_point_at_the_tools_mains():
    """``pyproject.toml``'s console scripts name the ``main`` of each command's own module
    (read from the file, not from an installed copy's metadata, which may predate it).
    Mutation: pointing a script at a module or name that does not exist fails here."""
    from tests._scripts import console_script, console_scripts

    scripts = console_scripts()
    assert scripts["nequip-mtl-make-data"] == "nequip_mtl.tools.make_data:main"
    assert scripts["nequip-mtl-make-xtb-data"] == "nequip_mtl.tools.make_xtb_data:main"
    for name, target in scripts.items():
        main = console_script(name)
        assert callable(main), name
        assert main.__module__ == target.partition(":")[0], f"{name}: {target} is forwarded"


def test_package_import_stays_light():
    code = "import sys, nequip_mtl; print('nequip' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


# === tutorial config ===


def _compose_tutorial(overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(TUTORIAL_CONFIG.parent), version_base=None):
        return compose(config_name="tutorial", overrides=overrides, return_hydra_config=False)


def test_tutorial_config_composes_and_is_overridable():
    text = TUTORIAL_CONFIG.read_text()
    assert "oc.env" not in text  # no environment-variable dependence
    cfg = _compose_tutorial(
        ["trainer.max_epochs=1", "train_split=8", "val_split=2", "test_split=2"]
    )
    assert list(cfg.run) == ["train", "val", "test"]
    assert cfg.trainer.max_epochs == 1
    assert cfg.data.split_dataset.train == 8
    raw = OmegaConf.to_container(cfg, resolve=False)  # ${hydra:...} needs a real run
    assert raw["data_file"] == "${hydra:runtime.cwd}/data/alloy.xyz"
    assert raw["data"]["split_dataset"]["dataset"]["file_path"] == "${data_file}"
    assert cfg.training_module._target_.endswith("ConFIGLightningModule")
    assert set(cfg.training_module.loss.coeffs) == {"total_energy", "forces", "stress"}
    assert list(cfg.model_type_names) == ["Cu", "Ni", "Pd"]


@pytest.mark.slow
def test_tutorial_config_trains_end_to_end(tmp_path):
    data = tmp_path / "alloy.xyz"
    make_dataset(data, num_frames=12, seed=0)
    run_dir = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    exe = Path(sys.executable).with_name("nequip-train")
    res = subprocess.run(
        [
            str(exe),
            "--config-path",
            str(TUTORIAL_CONFIG.parent),
            "--config-name",
            "tutorial",
            f"data_file={data}",
            "train_split=8",
            "val_split=2",
            "test_split=2",
            "trainer.max_epochs=1",
            f"hydra.run.dir={run_dir}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "test0_epoch/stress_mae" in res.stdout
    assert (run_dir / "best.ckpt").exists() and (run_dir / "last.ckpt").exists()
    metrics = (run_dir / "logs" / "metrics.csv").read_text()
    for key in ("val0_epoch/per_atom_energy_mae", "test0_epoch/forces_mae", "loss_coeff/"):
        assert key in metrics
