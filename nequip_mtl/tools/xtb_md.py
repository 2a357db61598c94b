"""Seeded, offline GFN2-xTB molecular dynamics data: the low fidelity for multi-fidelity runs.

Frames are sampled by Langevin molecular dynamics (ASE) on the GFN2-xTB potential energy
surface of `tblite <https://tblite.readthedocs.io>`_ (``pip install "nequip-mtl[xtb]"``),
one separate, seeded trajectory per temperature: Maxwell-Boltzmann velocities, an
equilibration, then every ``stride``-th step is kept. Each kept frame carries the xTB
energy and forces of that very MD step (no extra call).

**Units.** Energies and forces are written in ``kcal/mol`` and ``kcal/mol/Å`` by default,
the units of the DFT ethanol file (``benchmarks/data/ethanol_reduced_100.xyz`` of the
repository, revised MD17 style, PBE), so that both sets can be mixed in one run; ``energy_unit="eV"`` writes
ASE's eV and eV/Å instead. The absolute energies of the two levels of theory differ by a
large constant (about -7.1e3 kcal/mol for GFN2-xTB against -9.7e4 kcal/mol for PBE
ethanol): give each dataset its own energy reference.

The frames are written as extended XYZ through ASE's single-point calculator (``energy``
and ``forces``), which nequip's :class:`nequip.data.dataset.ASEDataset` maps to
``total_energy`` and ``forces``. ``info`` holds ``method``, ``temperature_K``, ``md_step``,
``seed``, ``energy_unit`` and ``config_type`` (e.g. ``xtb_md_600K``). The molecules are not
periodic and have no stress.

:func:`relabel_frames` labels any frames (e.g. the DFT geometries) with xTB (periodic cells
get a stress as well; :func:`label_frame` labels one), and :func:`compare_labels` measures how
far two labellings of the same geometries are apart.

Command line (``nequip-mtl-make-xtb-data --help``, :mod:`nequip_mtl.tools.make_xtb_data`)::

    nequip-mtl-make-xtb-data benchmarks/data/ethanol_xtb_1200.xyz --frames 1200 \\
        --temperatures 300,600,900 --seed 0
    nequip-mtl-make-xtb-data dft_geometries_xtb.xyz \\
        --relabel benchmarks/data/ethanol_reduced_100.xyz

tblite is imported only when a calculation is made, so this module imports without it.
"""

from __future__ import annotations

from collections.abc import Sequence

import ase.units
import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

__all__ = [
    "DEFAULT_MOLECULE",
    "DEFAULT_TEMPERATURES",
    "ENERGY_UNITS",
    "XTB_METHODS",
    "compare_labels",
    "generate_xtb_md_frames",
    "label_frame",
    "relabel_frames",
    "sample_md",
    "xtb_calculator",
]

#: Multiplier from eV (ASE's unit) to each supported energy unit (forces: the same per Å).
ENERGY_UNITS: dict[str, float] = {
    "kcal/mol": 1.0 / (ase.units.kcal / ase.units.mol),
    "eV": 1.0,
}

#: Methods of tblite's ASE calculator this module accepts.
XTB_METHODS: tuple[str, ...] = ("GFN2-xTB", "GFN1-xTB")

#: Starting geometry (an :func:`ase.build.molecule` name) when none is given.
DEFAULT_MOLECULE = "CH3CH2OH"

#: Temperatures (K) of the separate trajectories.
DEFAULT_TEMPERATURES: tuple[float, ...] = (300.0, 600.0, 900.0)

_INSTALL_HINT = 'tblite is needed for xTB labels: pip install "nequip-mtl[xtb]" (or tblite>=0.3)'


def _check_choice(name: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def xtb_calculator(method: str = "GFN2-xTB", **parameters):
    """A quiet :class:`tblite.ase.TBLite` calculator (``verbosity=0``) for ``method``.

    ``parameters`` go to TBLite as they are (e.g. ``accuracy``, ``electronic_temperature``).
    """
    _check_choice("method", method, XTB_METHODS)
    try:
        from tblite.ase import TBLite
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err
    return TBLite(method=method, verbosity=0, **parameters)


def _labelled(
    atoms: Atoms, energy_ev: float, forces_ev: np.ndarray, unit: str, info, stress_ev=None
) -> Atoms:
    """A bare copy (numbers, positions, cell, pbc; no velocities) with converted labels
    (``stress_ev``, eV/Å^3 in Voigt order, only when given)."""
    factor = ENERGY_UNITS[unit]
    out = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    out.info.update(info)
    labels = dict(energy=float(energy_ev) * factor, forces=np.asarray(forces_ev) * factor)
    if stress_ev is not None:
        labels["stress"] = np.asarray(stress_ev) * factor
    out.calc = SinglePointCalculator(out, **labels)
    return out


def label_frame(
    atoms: Atoms,
    method: str = "GFN2-xTB",
    energy_unit: str = "kcal/mol",
    calc=None,
    **parameters,
) -> Atoms:
    """A bare copy of ``atoms`` (geometry and ``info``) labelled with xTB in ``energy_unit``.

    The labels are the energy, the forces and, for a frame periodic in all three directions,
    the cell's stress (tblite's, at the Γ point; ``energy_unit`` per Å^3, ASE's sign
    convention and Voigt order). ``info`` gets ``method`` and ``energy_unit``. ``calc`` (an
    :func:`xtb_calculator` of ``method``) serves when given, so its SCF starts from its last
    density when the atoms are the same; otherwise a fresh calculator with ``parameters``
    (e.g. ``guess="eeqbc"``). An SCF that does not converge raises ASE's
    ``CalculationFailed``.
    """
    _check_choice("energy_unit", energy_unit, ENERGY_UNITS)
    work = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    work.calc = calc if calc is not None else xtb_calculator(method, **parameters)
    info = dict(atoms.info, method=method, energy_unit=energy_unit)
    stress = work.get_stress(voigt=True) if work.pbc.all() else None
    return _labelled(
        work, work.get_potential_energy(), work.get_forces(), energy_unit, info, stress
    )


def relabel_frames(
    frames: Sequence[Atoms], method: str = "GFN2-xTB", energy_unit: str = "kcal/mol"
) -> list[Atoms]:
    """Label copies of ``frames`` with xTB (:func:`label_frame`) in ``energy_unit``.

    The geometries (and ``info``) are kept; any previous labels are replaced; periodic frames
    get a stress too. One calculator serves all frames, so tblite starts each SCF from the
    previous frame's density (converged to tblite's default accuracy) when the atoms are the
    same, and starts afresh when they change.
    """
    _check_choice("energy_unit", energy_unit, ENERGY_UNITS)
    calc = xtb_calculator(method)
    return [label_frame(atoms, method, energy_unit, calc=calc) for atoms in frames]


def _bonds(atoms: Atoms) -> frozenset[tuple[int, int]]:
    """Bonds: pairs closer than 1.5 x the sum of covalent radii (ASE's natural cut-offs).

    Loose on purpose: a C-H bond stretched to 1.4 A at 900 K is still a bond (1.6 A here);
    a hydrogen that moved to another atom, or two fragments, change the graph.
    """
    from ase.neighborlist import natural_cutoffs, neighbor_list

    i, j = neighbor_list("ij", atoms, natural_cutoffs(atoms, mult=1.5))
    return frozenset((int(a), int(b)) for a, b in zip(i, j) if a < b)


def _trajectory_rng(seed: int, temperature: float) -> np.random.Generator:
    # keyed by (seed, temperature): a temperature's trajectory does not depend on the others
    return np.random.default_rng(np.random.SeedSequence([int(seed), round(temperature * 1000)]))


def sample_md(
    start: Atoms,
    temperature_K: float,
    num_frames: int,
    seed: int = 0,
    stride: int = 20,
    equilibration_steps: int = 1000,
    timestep_fs: float = 0.5,
    friction_per_fs: float = 0.01,
    method: str = "GFN2-xTB",
    energy_unit: str = "kcal/mol",
) -> list[Atoms]:
    """One seeded Langevin trajectory at ``temperature_K``; every ``stride``-th step is kept.

    The run is ``equilibration_steps + num_frames * stride`` steps of ``timestep_fs``, from
    ``start`` with Maxwell-Boltzmann velocities (no net momentum or rotation). A fresh
    calculator serves each trajectory, so it is reproducible on its own. Raises
    :class:`RuntimeError` if the bond graph of a kept frame differs from ``start``'s (the
    molecule broke or rearranged: lower the temperature).
    """
    from ase.constraints import FixCom
    from ase.md import velocitydistribution as vd
    from ase.md.langevin import Langevin

    _check_choice("energy_unit", energy_unit, ENERGY_UNITS)
    if temperature_K <= 0 or timestep_fs <= 0 or friction_per_fs < 0:
        raise ValueError(
            "temperature_K and timestep_fs must be > 0 and friction_per_fs >= 0, got "
            f"{temperature_K}, {timestep_fs}, {friction_per_fs}"
        )
    if num_frames < 1 or stride < 1 or equilibration_steps < 0:
        raise ValueError(
            "num_frames and stride must be >= 1 and equilibration_steps >= 0, got "
            f"{num_frames}, {stride}, {equilibration_steps}"
        )
    rng = _trajectory_rng(seed, temperature_K)
    atoms = Atoms(start.numbers, start.positions, cell=start.cell, pbc=start.pbc)
    atoms.calc = xtb_calculator(method)
    bonds = _bonds(atoms)
    if hasattr(vd, "thermalize_momenta"):  # ASE >= 3.29
        vd.thermalize_momenta(atoms, temperature_K, rng=rng)
    else:
        vd.MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)
    vd.Stationary(atoms)
    vd.ZeroRotation(atoms)
    # the centre of mass is held by a constraint, as ASE recommends for small systems
    atoms.set_constraint(FixCom())
    dyn = Langevin(
        atoms,
        timestep=timestep_fs * ase.units.fs,
        temperature_K=temperature_K,
        friction=friction_per_fs / ase.units.fs,
        fixcm=False,
        rng=rng,
    )
    if equilibration_steps:
        dyn.run(equilibration_steps)
    frames = []
    for _ in range(num_frames):
        dyn.run(stride)
        step = dyn.nsteps
        if _bonds(atoms) != bonds:
            raise RuntimeError(
                f"the molecule's bonds changed at {temperature_K} K, MD step {step}: the "
                "frame would not be the same molecule; lower the temperature or the step"
            )
        info = dict(
            method=method,
            temperature_K=float(temperature_K),
            md_step=int(step),
            seed=int(seed),
            energy_unit=energy_unit,
            config_type=f"xtb_md_{temperature_K:g}K",
        )
        # the calculator's results are those of this very step's positions (no new call);
        # the labels are xTB's own forces, not those projected by the FixCom constraint
        energy = atoms.get_potential_energy()
        forces = atoms.get_forces(apply_constraint=False)
        frames.append(_labelled(atoms, energy, forces, energy_unit, info))
    return frames


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


def generate_xtb_md_frames(
    num_frames: int = 1200,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
    seed: int = 0,
    start: Atoms | None = None,
    **md_options,
) -> list[Atoms]:
    """xTB MD frames at several temperatures, ``num_frames`` in all, split evenly.

    Args:
        num_frames: total number of frames; the first ``num_frames % len(temperatures)``
            temperatures get one more.
        temperatures: one separate trajectory each (K, ``> 0``, no duplicates).
        seed: seed of every trajectory (with its temperature); ``>= 0``.
        start: starting geometry; default :func:`ase.build.molecule` of
            :data:`DEFAULT_MOLECULE` (ethanol).
        md_options: :func:`sample_md`'s ``stride``, ``equilibration_steps``,
            ``timestep_fs``, ``friction_per_fs``, ``method``, ``energy_unit``.

    Returns:
        the frames, temperature by temperature, in the order of ``temperatures``.
    """
    temperatures = tuple(float(t) for t in temperatures)
    if not temperatures or len(set(temperatures)) != len(temperatures):
        raise ValueError(f"temperatures must be non-empty and distinct, got {temperatures}")
    if int(num_frames) < len(temperatures):
        raise ValueError(
            f"num_frames ({num_frames}) must be >= the number of temperatures ({len(temperatures)})"
        )
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if start is None:
        from ase.build import molecule

        start = molecule(DEFAULT_MOLECULE)
    frames = []
    for temperature, count in zip(temperatures, _split(int(num_frames), len(temperatures))):
        frames.extend(sample_md(start, temperature, count, seed=seed, **md_options))
    return frames


def compare_labels(reference: Sequence[Atoms], other: Sequence[Atoms]) -> dict[str, float]:
    """How far two labellings of the same geometries are apart, in their (common) units.

    Returns ``energy_offset`` (mean of other - reference per frame), ``energy_offset_per_atom``,
    ``energy_rmse_after_offset`` (RMS of the per-frame difference once the mean offset is
    removed), ``force_rmse`` and ``force_mae`` (RMS and mean absolute value of the
    component-wise difference), ``reference_force_rms``,
    ``other_force_rms``, ``energy_std_reference``, ``energy_std_other``, ``energy_correlation``
    and ``num_frames``.
    """
    if len(reference) != len(other) or not reference:
        raise ValueError(
            f"need the same, non-zero number of frames: {len(reference)}, {len(other)}"
        )
    for k, (a, b) in enumerate(zip(reference, other)):
        if list(a.numbers) != list(b.numbers) or not np.allclose(a.positions, b.positions):
            raise ValueError(f"frame {k} differs in atoms or positions: not the same geometries")
    e_ref = np.array([a.get_potential_energy() for a in reference])
    e_oth = np.array([b.get_potential_energy() for b in other])
    f_ref = np.concatenate([a.get_forces() for a in reference])
    f_oth = np.concatenate([b.get_forces() for b in other])
    diff = e_oth - e_ref
    return {
        "num_frames": len(reference),
        "energy_offset": float(diff.mean()),
        "energy_offset_per_atom": float((diff / [len(a) for a in reference]).mean()),
        "energy_rmse_after_offset": float(np.sqrt(((diff - diff.mean()) ** 2).mean())),
        "energy_std_reference": float(e_ref.std()),
        "energy_std_other": float(e_oth.std()),
        "energy_correlation": float(np.corrcoef(e_ref, e_oth)[0, 1]) if len(e_ref) > 1 else 1.0,
        "force_rmse": float(np.sqrt(((f_oth - f_ref) ** 2).mean())),
        "force_mae": float(np.abs(f_oth - f_ref).mean()),
        "reference_force_rms": float(np.sqrt((f_ref**2).mean())),
        "other_force_rms": float(np.sqrt((f_oth**2).mean())),
    }
