"""GFN2-xTB molecular dynamics data (``nequip_mtl.tools.xtb_md``, ``nequip-mtl-make-xtb-data``):
the file nequip reads, kcal/mol units checked against tblite's own Hartree output, seeded
trajectories, relabelling and the label comparison."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from ase.build import molecule
from ase.calculators.singlepoint import SinglePointCalculator

from nequip_mtl.tools import make_xtb_data, xtb_md

# independent constants (CODATA 2018), written out on purpose: not ASE's, not the module's
HARTREE_IN_KCAL_MOL = 627.5094740631
HARTREE_IN_EV = 27.211386245988
BOHR_IN_ANGSTROM = 0.529177210903

TINY = dict(num_frames=3, temperatures=[300.0], equilibration_steps=2, stride=1)  # 5 MD steps


def _tblite_reference(atoms):
    """Energy (Hartree) and forces (Hartree/Bohr) from tblite's library interface directly."""
    from tblite.interface import Calculator

    calc = Calculator("GFN2-xTB", atoms.numbers, atoms.positions / BOHR_IN_ANGSTROM)
    calc.set("verbosity", 0)
    result = calc.singlepoint()
    return result["energy"], -result["gradient"]


@pytest.fixture(scope="module")
def tiny():
    pytest.importorskip("tblite")
    return xtb_md.generate_xtb_md_frames(**TINY)


def test_tiny_run_keeps_every_stride_th_step_after_equilibration(tiny):
    assert len(tiny) == 3
    assert [a.info["md_step"] for a in tiny] == [3, 4, 5]
    assert {a.info["method"] for a in tiny} == {"GFN2-xTB"}
    assert {a.info["temperature_K"] for a in tiny} == {300.0}
    assert {a.info["energy_unit"] for a in tiny} == {"kcal/mol"}
    assert all(a.get_chemical_formula() == "C2H6O" and not a.pbc.any() for a in tiny)
    # the geometries move (MD, not copies of the start)
    assert np.abs(tiny[2].positions - tiny[0].positions).max() > 1e-4


@pytest.mark.parametrize(
    "unit, per_hartree", [("kcal/mol", HARTREE_IN_KCAL_MOL), ("eV", HARTREE_IN_EV)]
)
def test_labels_are_tblite_gfn2_in_the_requested_unit(tiny, unit, per_hartree):
    frames = tiny if unit == "kcal/mol" else xtb_md.generate_xtb_md_frames(energy_unit=unit, **TINY)
    atoms = frames[1]
    energy, forces = _tblite_reference(atoms)
    # SCF restarts differ (the MD reused the previous density): agreement to SCF tolerance
    np.testing.assert_allclose(atoms.get_potential_energy(), energy * per_hartree, rtol=1e-8)
    np.testing.assert_allclose(
        atoms.get_forces(), forces * per_hartree / BOHR_IN_ANGSTROM, rtol=0, atol=5e-3
    )


def test_file_loads_through_nequip_ase_dataset(tmp_path, tiny):
    from nequip.data import AtomicDataDict
    from nequip.data.dataset import ASEDataset

    from nequip_mtl.tools import write_frames

    path = tmp_path / "xtb.xyz"
    write_frames(tiny, path)
    ds = ASEDataset(file_path=str(path), ase_args={"format": "extxyz"})
    assert len(ds) == 3
    data = ds[2]
    assert data[AtomicDataDict.FORCE_KEY].shape == (9, 3)
    assert AtomicDataDict.STRESS_KEY not in data  # molecules: no stress label
    np.testing.assert_allclose(
        data[AtomicDataDict.TOTAL_ENERGY_KEY].item(), tiny[2].get_potential_energy(), rtol=1e-6
    )
    np.testing.assert_allclose(
        data[AtomicDataDict.FORCE_KEY].double().numpy(), tiny[2].get_forces(), atol=1e-4
    )


def test_same_seed_same_frames_and_temperatures_are_independent(tmp_path):
    pytest.importorskip("tblite")
    from nequip_mtl.tools import write_frames

    def written(**kwargs):
        path = tmp_path / "f.xyz"
        write_frames(xtb_md.generate_xtb_md_frames(**kwargs), path)
        return path.read_bytes()

    opts = dict(equilibration_steps=2, stride=1)
    assert written(num_frames=2, temperatures=[600], seed=3, **opts) == written(
        num_frames=2, temperatures=[600], seed=3, **opts
    )
    assert written(num_frames=2, temperatures=[600], seed=3, **opts) != written(
        num_frames=2, temperatures=[600], seed=4, **opts
    )
    # 600 K's trajectory is the same whether or not 300 K is sampled before it
    both = xtb_md.generate_xtb_md_frames(num_frames=4, temperatures=[300, 600], seed=3, **opts)
    alone = xtb_md.generate_xtb_md_frames(num_frames=2, temperatures=[600], seed=3, **opts)
    assert [a.info["temperature_K"] for a in both] == [300.0, 300.0, 600.0, 600.0]
    for a, b in zip(both[2:], alone):
        np.testing.assert_array_equal(a.positions, b.positions)
        assert a.get_potential_energy() == b.get_potential_energy()


def test_frames_are_split_evenly_over_temperatures():
    pytest.importorskip("tblite")
    fr = xtb_md.generate_xtb_md_frames(
        num_frames=5, temperatures=[300, 600], equilibration_steps=0, stride=1
    )
    assert [a.info["temperature_K"] for a in fr] == [300.0] * 3 + [600.0] * 2


def test_a_broken_molecule_is_refused():
    pytest.importorskip("tblite")
    with pytest.raises(RuntimeError, match="bonds changed at 15000.0 K"):
        xtb_md.sample_md(molecule("CH3CH2OH"), 15000.0, 3, stride=10, equilibration_steps=0)


def test_relabel_replaces_labels_keeps_geometry_and_info():
    pytest.importorskip("tblite")
    rng = np.random.default_rng(0)
    frames = []
    for k in range(3):
        atoms = molecule("CH3CH2OH")
        atoms.positions += rng.normal(0, 0.05, atoms.positions.shape)
        atoms.info["source"] = f"dft{k}"
        atoms.calc = SinglePointCalculator(atoms, energy=-97000.0, forces=np.zeros((9, 3)))
        frames.append(atoms)
    out = xtb_md.relabel_frames(frames)
    for atoms, new in zip(frames, out):
        np.testing.assert_array_equal(new.positions, atoms.positions)
        assert new.info["source"] == atoms.info["source"] and new.info["method"] == "GFN2-xTB"
        energy, forces = _tblite_reference(atoms)
        np.testing.assert_allclose(
            new.get_potential_energy(), energy * HARTREE_IN_KCAL_MOL, rtol=1e-8
        )
        np.testing.assert_allclose(
            new.get_forces(), forces * HARTREE_IN_KCAL_MOL / BOHR_IN_ANGSTROM, atol=5e-3
        )
    # the inputs are untouched
    assert frames[0].get_potential_energy() == -97000.0


def _with_labels(frames, energies, forces):
    out = []
    for atoms, e, f in zip(frames, energies, forces):
        a = atoms.copy()
        a.calc = SinglePointCalculator(a, energy=e, forces=f)
        out.append(a)
    return out


def test_compare_labels_closed_form():
    rng = np.random.default_rng(1)
    geoms = [molecule("H2O") for _ in range(4)]
    e = rng.normal(size=4)
    f = rng.normal(size=(4, 3, 3))
    ref = _with_labels(geoms, e, f)
    # other = reference + constant offset + per-frame noise d, forces + constant 0.5
    d = np.array([0.1, -0.1, 0.2, -0.2])
    other = _with_labels(geoms, e + 7.0 + d, f + 0.5)
    stats = xtb_md.compare_labels(ref, other)
    assert stats["energy_offset"] == pytest.approx(7.0)
    assert stats["energy_offset_per_atom"] == pytest.approx(7.0 / 3)
    assert stats["energy_rmse_after_offset"] == pytest.approx(np.sqrt((d**2).mean()))
    assert stats["force_rmse"] == pytest.approx(0.5)
    # half the components off by 0.5, half by -1.5: RMS sqrt(1.25), mean absolute value 1
    delta = np.where(np.arange(f.size).reshape(f.shape) % 2 == 0, 0.5, -1.5)
    mixed = xtb_md.compare_labels(ref, _with_labels(geoms, e, f + delta))
    assert mixed["force_rmse"] == pytest.approx(np.sqrt(1.25))
    assert mixed["force_mae"] == pytest.approx(1.0)
    assert stats["reference_force_rms"] == pytest.approx(np.sqrt((f**2).mean()))
    with pytest.raises(ValueError, match="not the same geometries"):
        moved = [g.copy() for g in geoms]
        moved[2].positions[0, 0] += 0.1
        xtb_md.compare_labels(ref, _with_labels(moved, e, f))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperatures=[]), "non-empty and distinct"),
        (dict(temperatures=[300, 300]), "non-empty and distinct"),
        (dict(num_frames=1, temperatures=[300, 600]), "must be >= the number of temperatures"),
        (dict(seed=-1), "seed must be >= 0"),
        (dict(method="GFN0"), r"method must be one of \['GFN2-xTB', 'GFN1-xTB'\]"),
        (dict(energy_unit="hartree"), r"energy_unit must be one of \['kcal/mol', 'eV'\]"),
        (dict(timestep_fs=0.0), "timestep_fs must be > 0"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    pytest.importorskip("tblite")
    opts = dict(num_frames=2, temperatures=[300], equilibration_steps=0, stride=1)
    with pytest.raises(ValueError, match=match):
        xtb_md.generate_xtb_md_frames(**{**opts, **kwargs})


def test_cli_generates_and_relabels(tmp_path, capsys):
    pytest.importorskip("tblite")
    import ase.io

    out = tmp_path / "md.xyz"
    args = ["--frames", "2", "--temperatures", "300", "--equilibration", "2", "--stride", "1"]
    assert make_xtb_data.main([str(out), *args, "--seed", "5"]) == 0
    assert "wrote 2 GFN2-xTB frames of C2H6O (300 K; kcal/mol)" in capsys.readouterr().out
    lib = xtb_md.generate_xtb_md_frames(
        num_frames=2, temperatures=[300], equilibration_steps=2, stride=1, seed=5
    )
    read = ase.io.read(out, index=":")
    np.testing.assert_allclose(read[1].get_forces(), lib[1].get_forces(), atol=1e-7)

    # relabelling its own xTB file reproduces its labels: offset ~0, force difference ~0
    again = tmp_path / "again.xyz"
    assert make_xtb_data.main([str(again), "--relabel", str(out)]) == 0
    text = capsys.readouterr().out
    assert "relabelled 2 frames" in text and "force_rmse" in text
    stats = xtb_md.compare_labels(read, ase.io.read(again, index=":"))
    assert abs(stats["energy_offset"]) < 1e-3 and stats["force_rmse"] < 5e-3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperatures", "300,-5"], "expected distinct temperatures > 0"),
        (["--temperatures", "hot"], "expected comma-separated kelvins"),
        (["--frames", "0"], "--frames: must be >= 1"),
        (["--units", "hartree"], "argument --units: invalid choice"),
    ],
)
def test_cli_rejects_bad_arguments(tmp_path, capsys, args, message):
    out = tmp_path / "x.xyz"
    with pytest.raises(SystemExit) as exc:
        make_xtb_data.main([str(out), *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_without_tblite_the_error_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tblite", None)  # makes `import tblite...` fail
    monkeypatch.setitem(sys.modules, "tblite.ase", None)
    with pytest.raises(ImportError, match=r'pip install "nequip-mtl\[xtb\]"'):
        xtb_md.xtb_calculator()
    with pytest.raises(SystemExit) as exc:
        make_xtb_data.main([str(tmp_path / "x.xyz"), "--frames", "2"])
    assert exc.value.code == 2
    assert 'pip install "nequip-mtl[xtb]"' in capsys.readouterr().err


def test_module_imports_without_tblite_or_torch():
    import subprocess
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    code = (
        "import sys, nequip_mtl.tools as t, nequip_mtl.tools.xtb_md, nequip_mtl.tools.make_xtb_data\n"
        "assert t.relabel_frames is nequip_mtl.tools.xtb_md.relabel_frames\n"
        "print(sorted({'tblite', 'torch', 'nequip'} & set(sys.modules)))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=root,
        env={**__import__("os").environ, "PYTHONPATH": root},
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_committed_benchmark_file_is_what_its_readme_command_makes():
    """benchmarks/data/ethanol_xtb_1200.xyz: 400 frames per temperature, GFN2-xTB labels in
    kcal/mol, and its first frame is the first frame the documented command samples."""
    pytest.importorskip("tblite")
    from pathlib import Path

    import ase.io

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "ethanol_xtb_1200.xyz"
    frames = ase.io.read(path, index=":")
    temps = [a.info["temperature_K"] for a in frames]
    assert [temps.count(t) for t in (300.0, 600.0, 900.0)] == [400, 400, 400]
    for atoms in (frames[0], frames[700], frames[-1]):
        energy, forces = _tblite_reference(atoms)
        np.testing.assert_allclose(
            atoms.get_potential_energy(), energy * HARTREE_IN_KCAL_MOL, rtol=1e-8
        )
        np.testing.assert_allclose(
            atoms.get_forces(), forces * HARTREE_IN_KCAL_MOL / BOHR_IN_ANGSTROM, atol=5e-3
        )
    # the defaults (seed 0, 1000 equilibration steps, stride 20) reproduce the first frame
    (first,) = xtb_md.sample_md(molecule("CH3CH2OH"), 300.0, 1, seed=0)
    assert first.info["md_step"] == frames[0].info["md_step"] == 1020
    np.testing.assert_allclose(first.positions, frames[0].positions, atol=1e-7)
