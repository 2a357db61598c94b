"""One cell family per EMT data set (``generate_frames(kind=...)``, ``--kind``): bulk, vacancy
and slab files for fine-tuning across a distribution shift at the same level of theory."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from ase.calculators.emt import EMT

from nequip_mtl.tools import generate_frames, make_dataset

N = 10  # frames per family: every size/shape appears, each generation well under a second


@pytest.fixture(scope="module")
def families():
    return {
        kind: generate_frames(num_frames=N, seed=11, kind=kind)
        for kind in ("bulk", "vacancy", "slab")
    }


def _fingerprint(frames) -> str:
    """Kinds, symbols, positions and cells; no labels, so it does not depend on EMT's last digits."""
    h = hashlib.sha256()
    for a in frames:
        h.update(a.info["config_type"].encode())
        h.update(" ".join(a.get_chemical_symbols()).encode())
        h.update(np.round(a.positions, 4).tobytes())
        h.update(np.round(a.cell.array, 4).tobytes())
    return h.hexdigest()


# === the mixed default is the generator as it was ===


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        # recorded by running the generator of commit 106ee6f (before `kind` existed)
        (
            dict(num_frames=40, seed=3),
            "283d62f6ceec1fabfde3d7aad3171283ccada0d76089a95fa75fd8cd4f0ade35",
        ),
        (
            dict(
                num_frames=30,
                seed=5,
                elements=["Cu", "Ag"],
                vacancy_fraction=0.4,
                slab_fraction=0.3,
            ),
            "11caa695b71a772222f546840fdc7def7438a7cd04ce22ad1725bbbecb490174",
        ),
    ],
)
def test_mixed_default_reproduces_the_generator_before_kinds(kwargs, expected):
    assert _fingerprint(generate_frames(**kwargs)) == expected
    assert _fingerprint(generate_frames(kind="mixed", max_vacancies=1, **kwargs)) == expected


# === geometry of each family ===


def test_every_frame_is_of_the_requested_family(families):
    for kind, frames in families.items():
        assert {a.info["config_type"] for a in frames} == {kind}
        assert all(a.pbc.all() for a in frames)


def test_bulk_frames_are_full_fcc_supercells(families):
    # 2x1x1, 2x2x1, 3x2x1, 2x2x2 conventional cells of 4 sites, none removed
    assert {len(a) for a in families["bulk"]} <= {8, 16, 24, 32}


def test_vacancy_frames_lose_one_or_two_atoms(families):
    frames = generate_frames(num_frames=24, seed=2, kind="vacancy")
    removed = []
    for a in frames:
        sites = {16, 24, 32}  # vacancy cells have >= 16 sites; the sizes below are disjoint
        (n_sites,) = [s for s in sites if 0 < s - len(a) <= 2]
        removed.append(n_sites - len(a))
        # no two atoms closer than a rattled nearest-neighbour distance (nothing overlaps)
        d = a.get_all_distances(mic=True)[np.triu_indices(len(a), 1)]
        assert d.min() > 1.5
    assert set(removed) == {1, 2}
    # max_vacancies=1 removes exactly one
    one = generate_frames(num_frames=8, seed=2, kind="vacancy", max_vacancies=1)
    assert all(len(a) in {15, 23, 31} for a in one)


def test_slab_frames_have_vacuum_along_z_only(families):
    for a in families["slab"]:
        assert len(a) in {12, 16, 18}  # (2,2,3), (2,2,4) on (111)/(100), (3,2,3) on (100)
        cell = a.cell.array
        # z is orthogonal to the surface plane and was not strained
        np.testing.assert_allclose(cell[2, :2], 0.0, atol=1e-12)
        np.testing.assert_allclose(cell[:2, 2], 0.0, atol=1e-12)
        z = a.positions[:, 2]
        gap = cell[2, 2] - (z.max() - z.min())
        calc = EMT()
        calc.initialize(a)
        assert gap > calc.rc_list + 1.0  # wider than EMT's neighbour cut-off: images decoupled
        # in-plane the cell is periodic bulk: the slab is thin compared with the box height
        assert z.max() - z.min() < 0.5 * cell[2, 2]


def test_surfaces_and_vacancies_cost_energy_relative_to_bulk():
    """Without rattling or strain, under-coordinated surface and vacancy neighbours have a
    higher EMT energy per atom than bulk atoms at the same compositions: the families are a
    real shift of the energy landscape, not only of geometry."""
    ideal = dict(num_frames=8, seed=11, rattle_amplitudes=[0.0], max_volumetric_strain=0.0)
    per_atom = {
        kind: np.mean(
            [
                a.get_potential_energy() / len(a)
                for a in generate_frames(kind=kind, max_shear_strain=0.0, **ideal)
            ]
        )
        for kind in ("bulk", "vacancy", "slab")
    }
    assert per_atom["slab"] > per_atom["bulk"] + 0.1  # eV/atom
    assert per_atom["vacancy"] > per_atom["bulk"] + 0.02


# === labels: forces and stresses are derivatives of the stored energy ===


def _emt_energy(atoms):
    b = atoms.copy()
    b.calc = EMT()
    return b.get_potential_energy()


@pytest.mark.parametrize("kind", ["vacancy", "slab"])
def test_forces_are_minus_the_energy_gradient(families, kind):
    atoms = families[kind][0]
    forces = atoms.get_forces()
    h = 1e-4
    for i in (0, len(atoms) // 2, len(atoms) - 1):
        for k in range(3):
            plus, minus = atoms.copy(), atoms.copy()
            plus.positions[i, k] += h
            minus.positions[i, k] -= h
            fd = -(_emt_energy(plus) - _emt_energy(minus)) / (2 * h)
            assert abs(fd - forces[i, k]) < 1e-5, (i, k, fd, forces[i, k])
    # the stored energy is EMT's own
    assert abs(atoms.get_potential_energy() - _emt_energy(atoms)) < 1e-8


def test_slab_stress_is_the_strain_derivative_of_the_whole_cell(families):
    """The stress written for slabs is (1/V) dE/d(strain) of the periodic cell, vacuum
    included -- the quantity nequip's stress output computes on the same cell."""
    atoms = families["slab"][1]
    stress = atoms.get_stress(voigt=False)
    volume = atoms.get_volume()
    h = 1e-5
    for i, j in ((0, 0), (1, 1), (2, 2), (0, 1), (1, 2)):
        eps = np.zeros((3, 3))
        eps[i, j] = eps[j, i] = h if i == j else h / 2
        energies = []
        for sign in (1, -1):
            b = atoms.copy()
            b.set_cell(atoms.cell.array @ (np.eye(3) + sign * eps), scale_atoms=True)
            energies.append(_emt_energy(b))
        fd = (energies[0] - energies[1]) / (2 * h) / volume
        assert abs(fd - stress[i, j]) < 1e-6, (i, j, fd, stress[i, j])
    # z is free of any interaction across the vacuum, yet the stress is a non-trivial label
    assert np.abs(stress[:2, :2]).max() > 1e-4


# === determinism and arguments ===


@pytest.mark.parametrize("kind", ["bulk", "vacancy", "slab"])
def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, kind):
    a, b, c = tmp_path / "a.xyz", tmp_path / "b.xyz", tmp_path / "c.xyz"
    make_dataset(a, num_frames=6, seed=4, kind=kind)
    make_dataset(b, num_frames=6, seed=4, kind=kind)
    make_dataset(c, num_frames=6, seed=5, kind=kind)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kind="surface"), r"kind must be one of \['mixed', 'bulk', 'vacancy', 'slab'\]"),
        (dict(kind="bulk", slab_fraction=0.2), "slab_fraction only apply to kind='mixed'"),
        (
            dict(kind="slab", vacancy_fraction=0.1, slab_fraction=0.2),
            "vacancy_fraction and slab_fraction only apply",
        ),
        (dict(kind="vacancy", max_vacancies=9), r"max_vacancies must be in \[1, 8\]"),
        (dict(max_vacancies=0), "max_vacancies"),
    ],
)
def test_bad_kind_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_frames(num_frames=2, **kwargs)


def test_cli_kind_matches_library(tmp_path):
    import ase.io

    from nequip_mtl.tools.make_data import main

    out = tmp_path / "slab.xyz"
    assert main([str(out), "--kind", "slab", "--frames", "5", "--seed", "2", "-q"]) == 0
    assert {a.info["config_type"] for a in ase.io.read(out, index=":")} == {"slab"}
    lib = tmp_path / "lib.xyz"
    make_dataset(lib, num_frames=5, seed=2, kind="slab")
    assert out.read_bytes() == lib.read_bytes()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--kind", "surface"], "argument --kind: invalid choice: 'surface'"),
        (
            ["--kind", "bulk", "--slab-fraction", "0.2"],
            "--slab-fraction only apply to --kind mixed",
        ),
        (["--kind", "vacancy", "--max-vacancies", "9"], "--max-vacancies must be <= 8"),
        (["--slab-fraction", "0.9"], "--vacancy-fraction + --slab-fraction must be <= 1"),
    ],
)
def test_cli_rejects_bad_kind_arguments(tmp_path, capsys, args, message):
    from nequip_mtl.tools.make_data import main

    out = tmp_path / "x.xyz"
    with pytest.raises(SystemExit) as exc:
        main([str(out), *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_slab_file_loads_through_nequip_with_stress(tmp_path, families):
    from nequip.data import AtomicDataDict
    from nequip.data.dataset import ASEDataset

    from nequip_mtl.tools import write_frames

    path = tmp_path / "slab.xyz"
    write_frames(families["slab"][:3], path)
    ds = ASEDataset(file_path=str(path), ase_args={"format": "extxyz"})
    data = ds[2]
    assert data[AtomicDataDict.STRESS_KEY].shape == (1, 3, 3)
    np.testing.assert_allclose(
        data[AtomicDataDict.STRESS_KEY][0].double().numpy(),
        families["slab"][2].get_stress(voigt=False),
        rtol=1e-5,
        atol=1e-7,
    )
