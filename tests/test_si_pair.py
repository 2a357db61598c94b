"""The periodic silicon multi-fidelity pair (``nequip_mtl.tools.si_pair``,
``nequip-mtl-make-si-pair``): the three files of a quick run, their kinds and counts, labels
in eV checked against tblite's own Hartree output and the stress against a finite difference
of the energy, seeded draws, refused labels, and the files nequip reads."""

from __future__ import annotations

import dataclasses
import sys
from collections import Counter

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from nequip_mtl.tools import make_si_pair, si_pair

# independent constants (CODATA 2018), written out on purpose: not ASE's, not the module's
HARTREE_IN_EV = 27.211386245988
BOHR_IN_ANGSTROM = 0.529177210903


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The files of ``nequip-mtl-make-si-pair DIR --quick`` (8-atom cells, about 15 s)."""
    pytest.importorskip("tblite")
    import ase.io

    directory = tmp_path_factory.mktemp("si")
    assert make_si_pair.main([str(directory), "--quick", "-q"]) == 0
    return {name: ase.io.read(directory / f"{name}.xyz", index=":") for name in si_pair.FILE_NAMES}


def _tblite(atoms, method, cell=None):
    """Energy (Hartree) and forces (Hartree/Bohr) from tblite's library interface directly."""
    from tblite.interface import Calculator

    cell = atoms.cell.array if cell is None else cell
    positions = atoms.get_scaled_positions() @ cell
    calc = Calculator(
        method,
        atoms.numbers,
        positions / BOHR_IN_ANGSTROM,
        lattice=cell / BOHR_IN_ANGSTROM,
        periodic=np.array([True, True, True]),
    )
    calc.set("verbosity", 0)
    result = calc.singlepoint()
    return result["energy"], -result["gradient"]


def test_quick_run_writes_the_three_sets_with_their_kinds_and_levels(quick):
    bulk, cheap, test = (quick[name] for name in si_pair.FILE_NAMES)
    q = si_pair.QUICK
    kinds = lambda frames: Counter(a.info["config_type"] for a in frames)  # noqa: E731
    assert kinds(bulk) == {"bulk": q["num_bulk"]}
    assert kinds(cheap) == {"bulk": q["num_bulk"], **dict.fromkeys(si_pair.NEW_KINDS, 1)}
    assert kinds(test) == dict.fromkeys(si_pair.NEW_KINDS, 1)  # 6 test frames: one per kind
    for name, frames in quick.items():
        assert {a.info["method"] for a in frames} == {si_pair.FILE_NAMES[name]}
        assert {a.info["energy_unit"] for a in frames} == {"eV"}
        assert all(a.pbc.all() for a in frames)
        # every frame is labelled, finite, and has no two atoms closer than 1.9 Å
        si_pair.check_frames(frames, name)
    sizes = {a.info["config_type"]: len(a) for a in cheap}
    assert sizes == dict(
        bulk=8, strain_large=8, shear=8, hot_rattle=8, vacancy=7, divacancy=6, interstitial=9
    )


def test_the_expensive_set_is_bulk_only_and_shares_its_geometries_with_the_cheap_set(quick):
    bulk, cheap = quick["si_gfn2_bulk"], quick["si_gfn1_all"]
    assert {a.info["config_type"] for a in bulk} == {"bulk"}
    for high, low in zip(bulk, cheap):
        assert high.info["structure_id"] == low.info["structure_id"]
        np.testing.assert_array_equal(high.positions, low.positions)
        np.testing.assert_array_equal(high.cell.array, low.cell.array)
        # two levels of theory: the energies differ by a large offset (eV per atom)
        assert abs(high.get_potential_energy() - low.get_potential_energy()) / len(high) > 1.0


def test_test_frames_are_new_kinds_only_and_not_the_cheap_frames(quick):
    cheap, test = quick["si_gfn1_all"], quick["si_gfn2_defects_test"]
    assert {a.info["config_type"] for a in test} <= set(si_pair.NEW_KINDS)
    assert all(a.info["structure_id"].startswith("test-") for a in test)
    for t in test:
        for c in cheap:
            assert not (len(t) == len(c) and np.allclose(t.positions, c.positions, atol=1e-3))


@pytest.mark.parametrize(
    "name, index", [("si_gfn2_defects_test", 2), ("si_gfn1_all", 3), ("si_gfn2_bulk", 0)]
)
def test_labels_are_tblite_in_ev(quick, name, index):
    atoms = quick[name][index]
    energy, forces = _tblite(atoms, si_pair.FILE_NAMES[name])
    np.testing.assert_allclose(atoms.get_potential_energy(), energy * HARTREE_IN_EV, rtol=1e-8)
    np.testing.assert_allclose(
        atoms.get_forces(), forces * HARTREE_IN_EV / BOHR_IN_ANGSTROM, rtol=0, atol=1e-3
    )


@pytest.mark.parametrize("index, component", [(2, (0, 0)), (3, (1, 2))])
def test_stress_is_the_strain_derivative_of_the_energy_per_volume(quick, index, component):
    """ASE's convention, sigma_ij = dE/d(eps_ij) / V (Voigt order xx yy zz yz xz xy), on a
    large-strain frame (xx) and a shear frame (yz), by a central difference of tblite's
    energy under a homogeneous strain of cell and atoms."""
    atoms = quick["si_gfn1_all"][index]
    assert atoms.info["config_type"] == ("strain_large", "shear")[index - 2]
    h = 1e-3
    i, j = component
    energies = []
    for sign in (1, -1):
        eps = np.zeros((3, 3))
        # symmetric: a change s of eps_yz and of eps_zy changes E by 2 V sigma_yz s
        eps[i, j] = eps[j, i] = sign * h / (2 if i != j else 1)
        energies.append(_tblite(atoms, "GFN1-xTB", atoms.cell.array @ (np.eye(3) + eps))[0])
    expected = (energies[0] - energies[1]) * HARTREE_IN_EV / (2 * h) / atoms.get_volume()
    voigt = {(0, 0): 0, (1, 2): 3}[component]
    stress = atoms.get_stress(voigt=True)[voigt]
    assert abs(expected) > 2e-3  # large enough to tell a sign or a factor of 2
    np.testing.assert_allclose(stress, expected, rtol=1e-2)


def test_files_load_through_nequip_ase_dataset_with_stress(quick, tmp_path):
    from nequip.data import AtomicDataDict
    from nequip.data.dataset import ASEDataset

    from nequip_mtl.tools import write_frames

    frames = quick["si_gfn2_defects_test"]
    path = tmp_path / "t.xyz"
    write_frames(frames, path)
    ds = ASEDataset(file_path=str(path), ase_args={"format": "extxyz"})
    assert len(ds) == len(frames)
    for k in (0, 4):
        data = ds[k]
        assert data[AtomicDataDict.FORCE_KEY].shape == (len(frames[k]), 3)
        np.testing.assert_allclose(
            data[AtomicDataDict.STRESS_KEY].double().numpy().reshape(3, 3),
            frames[k].get_stress(voigt=False),
            atol=1e-6,
        )


def test_accepted_frames_are_the_numbered_draws_and_refusals_are_real(quick):
    """Each frame is draw ``info["draw"]`` of its (seed, stream, kind) stream; a skipped draw
    is one that the level could not label (so the files follow from the seed)."""
    templates = si_pair.defect_templates(si_pair.QUICK["repeat"], relax_steps=0)
    for name, stream in (("si_gfn1_all", "train"), ("si_gfn2_defects_test", "test")):
        method = si_pair.FILE_NAMES[name]
        for kind in si_pair.NEW_KINDS:
            frames = [a for a in quick[name] if a.info["config_type"] == kind]
            used = [a.info["draw"] for a in frames]
            draws = si_pair.sample_structures(kind, max(used) + 1, 0, templates, stream)
            for atoms in frames:
                np.testing.assert_allclose(
                    atoms.positions, draws[atoms.info["draw"]].positions, atol=1e-7
                )
            for skipped in sorted(set(range(max(used))) - set(used)):
                assert si_pair.robust_label(draws[skipped], method) is None


def test_same_seed_same_draws_and_streams_differ():
    templates = si_pair.defect_templates((1, 1, 1), relax_steps=0)  # no xTB call
    a = si_pair.sample_structures("vacancy", 3, 7, templates)
    b = si_pair.sample_structures("vacancy", 3, 7, templates)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.positions, y.positions)
        np.testing.assert_array_equal(x.cell.array, y.cell.array)
    for other in (
        si_pair.sample_structures("vacancy", 3, 8, templates),
        si_pair.sample_structures("vacancy", 3, 7, templates, stream="test"),
    ):
        assert not np.allclose(a[0].positions, other[0].positions)


def test_strains_and_rattles_follow_the_recipes():
    templates = si_pair.defect_templates((1, 1, 1), relax_steps=0)
    for kind, recipe in si_pair.RECIPES.items():
        for atoms in si_pair.sample_structures(kind, 20, 0, templates):
            eps = np.array(atoms.info["strain"])
            normal, shear = eps[:3], eps[3:]
            iso_low, iso_high = recipe.iso
            n_low, n_high = recipe.normal
            # each normal component is iso + normal part, both drawn in their ranges
            assert np.all(np.abs(normal) <= iso_high + n_high + 1e-6)
            assert np.all(np.abs(normal) >= iso_low - n_high - 1e-6)
            assert np.all(np.abs(shear) >= recipe.shear[0] - 1e-6)
            assert np.all(np.abs(shear) <= recipe.shear[1] + 1e-6)
            assert recipe.rattle[0] <= atoms.info["rattle"] <= recipe.rattle[1]
            # the cell is the template's, strained
            template = templates[atoms.info.get("defect_site", recipe.templates[0])]
            full = np.array(
                [[eps[0], eps[5], eps[4]], [eps[5], eps[1], eps[3]], [eps[4], eps[3], eps[2]]]
            )
            np.testing.assert_allclose(
                atoms.cell.array, template.cell.array @ (np.eye(3) + full), atol=1e-4
            )
    bulk = si_pair.sample_structures("bulk", 50, 0, templates)
    assert max(np.abs(np.array(a.info["strain"])).max() for a in bulk) <= 0.02 + 1e-6


def test_a_rattle_that_brings_atoms_too_close_is_redrawn(monkeypatch):
    hot = dataclasses.replace(si_pair.RECIPES["hot_rattle"], rattle=(0.25, 0.25))
    monkeypatch.setitem(si_pair.RECIPES, "hot_rattle", hot)
    templates = si_pair.defect_templates((1, 1, 1), relax_steps=0)
    frames = si_pair.sample_structures("hot_rattle", 10, 0, templates)
    si_pair.check_frames(
        [_with_labels(a, np.zeros((len(a), 3)), np.zeros(6)) for a in frames], "hot"
    )
    # a template whose atoms always collide is refused with a clear error
    monkeypatch.undo()
    broken = templates["perfect"].copy()
    broken.positions[1] = broken.positions[0] + 0.3  # 0.52 Å apart; rattles of 0.10-0.14 Å
    with pytest.raises(RuntimeError, match="hot_rattle: 100 rattles .* closer than 1.9 Å"):
        si_pair.sample_structures("hot_rattle", 1, 0, {"perfect": broken})


def _with_labels(atoms, forces, stress, energy=0.0):
    out = atoms.copy()
    out.calc = SinglePointCalculator(out, energy=energy, forces=forces, stress=stress)
    return out


def test_check_frames_names_the_broken_frame():
    good = Atoms("Si2", positions=[[0, 0, 0], [1.2, 1.2, 1.2]], cell=[5, 5, 5], pbc=True)
    close = Atoms("Si2", positions=[[0, 0, 0], [1.0, 1.0, 0.5]], cell=[5, 5, 5], pbc=True)
    zeros = np.zeros((2, 3))
    si_pair.check_frames([_with_labels(good, zeros, np.zeros(6))])
    nan_forces = zeros.copy()
    nan_forces[1, 2] = np.nan
    no_stress = good.copy()
    no_stress.calc = SinglePointCalculator(no_stress, energy=0.0, forces=zeros)
    cases = [
        (_with_labels(close, zeros, np.zeros(6)), "two atoms closer than 1.9 Å"),
        (_with_labels(good, nan_forces, np.zeros(6)), "non-finite forces"),
        (_with_labels(good, zeros, np.full(6, np.inf)), "non-finite stress"),
        (no_stress, "no stress label"),
    ]
    for frame, message in cases:
        frame.info["structure_id"] = "x-0003"
        with pytest.raises(ValueError, match=rf"set\[1\] \(x-0003\): {message}"):
            si_pair.check_frames([_with_labels(good, zeros, np.zeros(6)), frame], "set")


def test_a_label_that_depends_on_the_initial_guess_is_refused(monkeypatch):
    pytest.importorskip("tblite")
    real = si_pair.label_frame
    atoms = si_pair.defect_templates((1, 1, 1), relax_steps=0)["perfect"]

    def shifted(atoms, method, unit, guess):
        out = real(atoms, method, unit, guess=guess)
        if guess != "sad":
            out.calc.results["energy"] += 2 * si_pair.ENERGY_TOLERANCE
        return out

    stats = si_pair.LabelStats()
    assert si_pair.robust_label(atoms, "GFN1-xTB", stats) is not None
    monkeypatch.setattr(si_pair, "label_frame", shifted)
    assert si_pair.robust_label(atoms, "GFN1-xTB", stats) is None
    assert (stats.labelled, stats.guesses_disagree, stats.calls) == (1, 1, 4)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--repeat", "2,1"], "expected three integers >= 1"),
        (["--seed", "-1"], "must be >= 0"),
        (["--bulk", "0"], "--bulk: must be >= 1"),
        (["--test", "3"], "--test: must be >= 6"),
    ],
)
def test_cli_rejects_bad_arguments(tmp_path, capsys, args, message):
    pytest.importorskip("tblite")
    with pytest.raises(SystemExit) as exc:
        make_si_pair.main([str(tmp_path / "out"), *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_without_tblite_the_error_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tblite", None)
    monkeypatch.setitem(sys.modules, "tblite.ase", None)
    with pytest.raises(SystemExit) as exc:
        make_si_pair.main([str(tmp_path / "out"), "--quick"])
    assert exc.value.code == 2
    assert 'pip install "nequip-mtl[xtb]"' in capsys.readouterr().err


def test_committed_files_are_what_the_readme_command_makes():
    """benchmarks/data/si_*.xyz (``nequip-mtl-make-si-pair benchmarks/data --seed 0``): the
    documented kinds and counts, bulk-only expensive pool sharing its geometries with the cheap
    set, test frames of the new kinds, every frame checked; the perfect-cell frames are the
    seed's draws, and the labels are tblite's in eV."""
    from pathlib import Path

    import ase.io

    data = Path(__file__).resolve().parents[1] / "benchmarks" / "data"
    files = {n: ase.io.read(data / f"{n}.xyz", index=":") for n in si_pair.FILE_NAMES}
    kinds = {n: Counter(a.info["config_type"] for a in f) for n, f in files.items()}
    assert kinds["si_gfn2_bulk"] == {"bulk": 100}
    assert kinds["si_gfn1_all"] == {"bulk": 100, **dict.fromkeys(si_pair.NEW_KINDS, 70)}
    assert kinds["si_gfn2_defects_test"] == dict(zip(si_pair.NEW_KINDS, [17] * 4 + [16] * 2))
    for name, frames in files.items():
        si_pair.check_frames(frames, name)
        assert {a.info["method"] for a in frames} == {si_pair.FILE_NAMES[name]}
    bulk, cheap = files["si_gfn2_bulk"], files["si_gfn1_all"]
    for high, low in zip(bulk, cheap):
        assert high.info["structure_id"] == low.info["structure_id"]
        np.testing.assert_array_equal(high.positions, low.positions)
    # frames built on the perfect cell need no relaxed template: redraw them from the seed
    templates = si_pair.defect_templates((2, 1, 1), relax_steps=0)
    for name, kind, stream in (
        ("si_gfn2_bulk", "bulk", "train"),
        ("si_gfn1_all", "shear", "train"),
        ("si_gfn2_defects_test", "hot_rattle", "test"),
    ):
        frame = next(a for a in files[name] if a.info["config_type"] == kind)
        drawn = si_pair.sample_structures(kind, frame.info["draw"] + 1, 0, templates, stream)
        np.testing.assert_allclose(frame.positions, drawn[-1].positions, atol=1e-7)
        np.testing.assert_allclose(frame.cell.array, drawn[-1].cell.array, atol=1e-7)
    pytest.importorskip("tblite")
    for name in ("si_gfn2_defects_test", "si_gfn1_all"):
        atoms = files[name][-1]
        energy, forces = _tblite(atoms, si_pair.FILE_NAMES[name])
        np.testing.assert_allclose(atoms.get_potential_energy(), energy * HARTREE_IN_EV, rtol=1e-8)
        np.testing.assert_allclose(
            atoms.get_forces(), forces * HARTREE_IN_EV / BOHR_IN_ANGSTROM, rtol=0, atol=1e-3
        )


def test_modules_import_without_tblite_or_torch():
    import os
    import subprocess
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    code = (
        "import sys, nequip_mtl.tools.si_pair, nequip_mtl.tools.make_si_pair\n"
        "print(sorted({'tblite', 'torch', 'nequip'} & set(sys.modules)))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": root},
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
