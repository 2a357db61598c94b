"""Seeded generator of a small multitask (energy / forces / stress) data set.

Labels come from ASE's toy effective-medium-theory calculator
(:class:`ase.calculators.emt.EMT`), so everything runs offline in seconds. The
structures are fcc alloys of a few elements chosen from ``Cu, Ni, Pd, Ag, Au,
Pt, Al`` (the elements EMT supports). There are three families of cells:

``bulk``
    a periodic fcc supercell (8 to 32 atoms) with a random site occupation,
    a random strain (volumetric and shear) and Gaussian "thermal" rattling;
``vacancy``
    the same (16 to 32 sites), with one atom removed (or, with ``max_vacancies=2``, one or
    two);
``slab``
    an fcc(111) or fcc(100) slab with vacuum along ``z`` (periodic in all three
    directions; the vacuum gap is far larger than both the EMT cut-off and a
    typical model cut-off), strained in-plane only.

``kind="mixed"`` (the default) mixes the three in one file (70/15/15 % by default);
``kind="bulk"``, ``"vacancy"`` or ``"slab"`` writes one family only, so that a pair of files
such as ``bulk`` then ``slab`` (or ``vacancy``) is a real distribution shift at the same level
of theory (pretraining on one, fine-tuning on the other). A ``vacancy`` file removes one or
two atoms per cell unless ``max_vacancies`` says otherwise.

Each frame gets a :class:`~ase.calculators.singlepoint.SinglePointCalculator`
with ``energy`` (eV), ``forces`` (eV/Å) and ``stress`` (eV/Å\\ :sup:`3`, ASE's
sign convention, Voigt order) for every family, slabs included -- the names and convention that
:func:`nequip.ase.from_ase` (and therefore
:class:`nequip.data.dataset.ASEDataset`) maps to ``total_energy``, ``forces``
and ``stress``. ASE's ``atoms.get_stress()`` and nequip's ``stress`` output use
the same convention, so no sign flip is needed. A slab's stress is that of its periodic cell
(vacuum included): the derivative of the energy with respect to a homogeneous strain of the
whole cell, divided by the cell volume. nequip's stress output computes the same quantity on
the same cell, so it is a consistent label, but it is small and scales with 1 / (slab +
vacuum) thickness; leave the stress loss out on slab data if that is not what is wanted.

The output is deterministic: the same arguments give a byte-identical file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from ase import Atoms
from ase.build import bulk, fcc100, fcc111
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

__all__ = [
    "SUPPORTED_ELEMENTS",
    "DEFAULT_ELEMENTS",
    "DEFAULT_RATTLE_AMPLITUDES",
    "LATTICE_CONSTANTS",
    "FRAME_KINDS",
    "generate_frames",
    "write_frames",
    "make_dataset",
]

#: Experimental fcc lattice constants (Å) of the elements ASE's EMT supports.
LATTICE_CONSTANTS: dict[str, float] = {
    "Cu": 3.615,
    "Ni": 3.524,
    "Pd": 3.891,
    "Ag": 4.086,
    "Au": 4.078,
    "Pt": 3.924,
    "Al": 4.050,
}

#: Elements :class:`ase.calculators.emt.EMT` has parameters for.
SUPPORTED_ELEMENTS: tuple[str, ...] = tuple(LATTICE_CONSTANTS)

#: Default alloy: three elements with a ~10 % spread in lattice constant.
DEFAULT_ELEMENTS: tuple[str, ...] = ("Cu", "Ni", "Pd")

#: Standard deviations (Å) of the Gaussian displacements -- the "temperatures".
DEFAULT_RATTLE_AMPLITUDES: tuple[float, ...] = (0.02, 0.05, 0.10, 0.15)

# supercell repetitions of the 4-atom conventional cubic fcc cell: 8, 16, 24, 32 atoms
_BULK_REPEATS: tuple[tuple[int, int, int], ...] = ((2, 1, 1), (2, 2, 1), (3, 2, 1), (2, 2, 2))
# (facet, in-plane repeats, layers): 12 to 18 atoms
_SLAB_SHAPES: tuple[tuple[str, tuple[int, int], int], ...] = (
    ("111", (2, 2), 3),
    ("111", (2, 2), 4),
    ("100", (2, 2), 4),
    ("100", (3, 2), 3),
)
_SLAB_VACUUM = 6.0  # Å on each side -> 12 Å gap between periodic images
#: Values of ``generate_frames(kind=...)``: the three families mixed, or one of them.
FRAME_KINDS: tuple[str, ...] = ("mixed", "bulk", "vacancy", "slab")
_DEFAULT_VACANCY_FRACTION = 0.15
_DEFAULT_SLAB_FRACTION = 0.15


def _check_elements(elements: Sequence[str]) -> tuple[str, ...]:
    elements = tuple(elements)
    if len(elements) == 0:
        raise ValueError("at least one element is required")
    unknown = [e for e in elements if e not in LATTICE_CONSTANTS]
    if unknown:
        raise ValueError(
            f"unsupported element(s) {unknown}: ASE's EMT supports {list(SUPPORTED_ELEMENTS)}"
        )
    if len(set(elements)) != len(elements):
        raise ValueError(f"duplicate elements in {list(elements)}")
    return elements


def _symbols_for(n_atoms: int, fractions: np.ndarray, elements, rng) -> list[str]:
    """Exactly ``round(fraction * n)`` atoms of each element, in random site order."""
    counts = np.floor(fractions * n_atoms).astype(int)
    # hand the remaining sites to the largest remainders (deterministic tie-break)
    remainder = fractions * n_atoms - counts
    for idx in np.argsort(-remainder, kind="stable")[: n_atoms - counts.sum()]:
        counts[idx] += 1
    symbols = np.repeat(np.array(elements), counts)
    return list(symbols[rng.permutation(n_atoms)])


def _random_strain(rng, max_volumetric: float, max_shear: float, in_plane_only: bool):
    """Symmetric small-strain tensor: uniform volumetric part + independent normal/shear parts."""
    eps = np.zeros((3, 3))
    eps[np.diag_indices(3)] = rng.uniform(-max_volumetric, max_volumetric)
    eps[np.diag_indices(3)] += rng.uniform(-max_shear, max_shear, size=3)
    for i, j in ((0, 1), (0, 2), (1, 2)):
        eps[i, j] = eps[j, i] = rng.uniform(-max_shear, max_shear)
    if in_plane_only:
        # keep the vacuum direction (z) unstrained and orthogonal to the surface
        eps[2, :] = 0.0
        eps[:, 2] = 0.0
    return eps


def _label(atoms: Atoms) -> Atoms:
    """Attach EMT energy/forces/stress as a single-point calculator."""
    atoms.calc = EMT()
    energy = atoms.get_potential_energy()
    forces = atoms.get_forces()
    stress = atoms.get_stress(voigt=True)
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces, stress=stress)
    return atoms


def _frame_kinds(kind, num_frames, vacancy_fraction, slab_fraction, rng) -> list[str]:
    """The family of every frame, in generation order."""
    if kind != "mixed":
        return [kind] * num_frames
    n_vac = int(round(vacancy_fraction * num_frames))
    n_slab = int(round(slab_fraction * num_frames))
    n_slab = min(n_slab, num_frames - n_vac)
    kinds = ["vacancy"] * n_vac + ["slab"] * n_slab + ["bulk"] * (num_frames - n_vac - n_slab)
    return [kinds[i] for i in rng.permutation(num_frames)]


def _remove_vacancies(atoms: Atoms, max_vacancies: int, rng) -> None:
    if max_vacancies == 1:
        # one draw, exactly as before ``max_vacancies`` existed (same files for the same seed)
        del atoms[int(rng.integers(len(atoms)))]
        return
    count = int(rng.integers(1, max_vacancies + 1))
    del atoms[sorted(int(i) for i in rng.choice(len(atoms), size=count, replace=False))]


def generate_frames(
    num_frames: int = 150,
    seed: int = 0,
    elements: Sequence[str] = DEFAULT_ELEMENTS,
    num_compositions: int = 4,
    rattle_amplitudes: Sequence[float] = DEFAULT_RATTLE_AMPLITUDES,
    max_volumetric_strain: float = 0.03,
    max_shear_strain: float = 0.02,
    vacancy_fraction: float | None = None,
    slab_fraction: float | None = None,
    kind: str = "mixed",
    max_vacancies: int | None = None,
) -> list[Atoms]:
    """Generate labelled EMT alloy frames.

    Args:
        num_frames: number of frames (``>= 1``).
        seed: seed of the :func:`numpy.random.default_rng` stream; the output is a
            deterministic function of all arguments.
        elements: alloy elements, a subset of :data:`SUPPORTED_ELEMENTS`.
        num_compositions: number of distinct random compositions (drawn from a flat
            Dirichlet distribution); every frame uses one of them.
        rattle_amplitudes: standard deviations (Å) of the Gaussian atomic displacements;
            every frame uses one of them.
        max_volumetric_strain: bound of the uniform isotropic strain (bulk and vacancy frames).
        max_shear_strain: bound of the uniform independent normal/shear strain components.
        vacancy_fraction: with ``kind="mixed"``, fraction of frames that are bulk cells with
            vacancies (default 0.15).
        slab_fraction: with ``kind="mixed"``, fraction of frames that are surface slabs
            (default 0.15).
        kind: ``"mixed"`` (the three families in one file, in the proportions above), or
            ``"bulk"``, ``"vacancy"`` or ``"slab"`` (every frame of that family; the two
            fractions must then be left unset).
        max_vacancies: a vacancy frame loses between 1 and ``max_vacancies`` atoms (uniformly
            drawn); default 1 with ``kind="mixed"`` (as the mixed file always had) and 2
            with ``kind="vacancy"``. At most 8, so every vacancy frame keeps >= 8 atoms.

    Returns:
        a list of :class:`ase.Atoms` with a single-point calculator holding ``energy``,
        ``forces`` and ``stress`` and with ``info`` keys ``config_type`` (``bulk``,
        ``vacancy`` or ``slab``), ``composition`` (e.g. ``"Cu0.50Ni0.25Pd0.25"``),
        ``rattle`` (Å) and ``volumetric_strain`` (relative volume change).

    Example: a bulk file to pretrain on and a surface file to fine-tune on (the same
    elements, compositions and "temperatures", different environments)::

        generate_frames(num_frames=200, seed=0, kind="bulk")
        generate_frames(num_frames=200, seed=1, kind="slab")
    """
    num_frames = int(num_frames)
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if kind not in FRAME_KINDS:
        raise ValueError(f"kind must be one of {list(FRAME_KINDS)}, got {kind!r}")
    if kind != "mixed":
        given = [
            n
            for n, v in (("vacancy_fraction", vacancy_fraction), ("slab_fraction", slab_fraction))
            if v is not None
        ]
        if given:
            raise ValueError(
                f"{' and '.join(given)} only apply to kind='mixed'; kind={kind!r} makes every "
                f"frame a {kind} frame"
            )
    vacancy_fraction = _DEFAULT_VACANCY_FRACTION if vacancy_fraction is None else vacancy_fraction
    slab_fraction = _DEFAULT_SLAB_FRACTION if slab_fraction is None else slab_fraction
    if max_vacancies is None:
        max_vacancies = 2 if kind == "vacancy" else 1
    if not 1 <= int(max_vacancies) <= 8:
        raise ValueError(f"max_vacancies must be in [1, 8], got {max_vacancies}")
    max_vacancies = int(max_vacancies)
    elements = _check_elements(elements)
    if int(num_compositions) < 1:
        raise ValueError(f"num_compositions must be >= 1, got {num_compositions}")
    rattle_amplitudes = tuple(float(r) for r in rattle_amplitudes)
    if len(rattle_amplitudes) == 0 or any(r < 0 for r in rattle_amplitudes):
        raise ValueError(f"rattle_amplitudes must be non-empty and >= 0, got {rattle_amplitudes}")
    if not (0 <= vacancy_fraction and 0 <= slab_fraction and vacancy_fraction + slab_fraction <= 1):
        raise ValueError("vacancy_fraction and slab_fraction must be >= 0 and sum to <= 1")
    if max_volumetric_strain < 0 or max_shear_strain < 0:
        raise ValueError("strain bounds must be >= 0")

    rng = np.random.default_rng(seed)
    compositions = rng.dirichlet(np.ones(len(elements)), size=int(num_compositions))
    # the first composition is always the equimolar alloy
    compositions[0] = 1.0 / len(elements)

    kinds = _frame_kinds(kind, num_frames, vacancy_fraction, slab_fraction, rng)

    frames = []
    for frame_kind in kinds:
        comp_idx = int(rng.integers(len(compositions)))
        fractions = compositions[comp_idx]
        rattle = rattle_amplitudes[int(rng.integers(len(rattle_amplitudes)))]
        # Vegard's law lattice constant of this composition
        a = float(sum(f * LATTICE_CONSTANTS[e] for f, e in zip(fractions, elements)))

        if frame_kind == "slab":
            facet, (nx, ny), layers = _SLAB_SHAPES[int(rng.integers(len(_SLAB_SHAPES)))]
            builder = fcc111 if facet == "111" else fcc100
            atoms = builder(
                elements[0], size=(nx, ny, layers), a=a, vacuum=_SLAB_VACUUM, orthogonal=True
            )
            # periodic everywhere (like the bulk frames); the vacuum gap decouples the images
            atoms = Atoms(atoms.get_chemical_symbols(), atoms.positions, cell=atoms.cell, pbc=True)
            eps = _random_strain(rng, 0.0, max_shear_strain, in_plane_only=True)
        else:
            # vacancies only in cells of >= 16 atoms, so every frame keeps >= 8 atoms
            repeats = _BULK_REPEATS[1:] if frame_kind == "vacancy" else _BULK_REPEATS
            rep = repeats[int(rng.integers(len(repeats)))]
            atoms = bulk(elements[0], "fcc", a=a, cubic=True).repeat(rep)
            eps = _random_strain(rng, max_volumetric_strain, max_shear_strain, False)

        atoms.set_chemical_symbols(_symbols_for(len(atoms), fractions, elements, rng))
        if frame_kind == "vacancy":
            _remove_vacancies(atoms, max_vacancies, rng)

        volume0 = atoms.get_volume()
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)
        atoms.positions += rng.normal(0.0, rattle, size=atoms.positions.shape)
        atoms.wrap()

        atoms.info["config_type"] = frame_kind
        atoms.info["composition"] = "".join(f"{e}{f:.2f}" for e, f in zip(elements, fractions))
        atoms.info["rattle"] = rattle
        atoms.info["volumetric_strain"] = round(float(atoms.get_volume() / volume0 - 1.0), 6)
        frames.append(_label(atoms))
    return frames


def write_frames(frames: Sequence[Atoms], path: str | os.PathLike) -> None:
    """Write frames to an extended-XYZ file (parent directories are created)."""
    import ase.io

    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    ase.io.write(path, list(frames), format="extxyz")


def make_dataset(path: str | os.PathLike, **kwargs) -> list[Atoms]:
    """:func:`generate_frames` with ``kwargs`` and write the result to ``path``; returns the frames."""
    frames = generate_frames(**kwargs)
    write_frames(frames, path)
    return frames
