"""A seeded, offline periodic multi-fidelity pair: crystalline silicon at two xTB levels, where
the expensive labels cover bulk only and the cheap labels cover bulk and defects.

Three sets of periodic diamond-silicon cells (a 2x1x1 conventional cell, 16 sites, by
default), labelled with `tblite <https://tblite.readthedocs.io>`_ at the Γ point
(``pip install "nequip-mtl[xtb]"``):

``si_gfn2_bulk``
    the expensive training pool: GFN2-xTB labels on ``bulk`` frames only (small strains,
    thermal rattles);
``si_gfn1_all``
    the cheap set: GFN1-xTB labels on the *same* ``bulk`` geometries (``structure_id``
    pairs them) and on the new kinds of :data:`NEW_KINDS` (large strains, shear,
    vacancies, divacancies, interstitials, hot rattles);
``si_gfn2_defects_test``
    the test set: GFN2-xTB labels on fresh frames of the new kinds only (other random
    streams than the cheap set's frames of the same kinds).

Every frame carries ``energy`` (eV), ``forces`` (eV/Å) and ``stress`` (eV/Å\\ :sup:`3`,
ASE's sign and Voigt order: the periodic cell's stress that tblite returns) through ASE's
single-point calculator, which nequip's :class:`nequip.data.dataset.ASEDataset` maps to
``total_energy``, ``forces`` and ``stress``. ``info`` holds ``config_type`` (the kind),
``structure_id``, ``draw`` (the draw's number in its random stream), ``seed``, ``rattle`` (Å, the standard deviation of the Gaussian
displacements), ``strain`` (the small-strain tensor applied to the cell, Voigt order
xx, yy, zz, yz, xz, xy), ``volumetric_strain``, ``method``, ``energy_unit`` and, for
interstitials, ``defect_site`` (``tetrahedral`` or ``hexagonal``).

How the frames are made (:data:`RECIPES`): a perfect cell at the experimental lattice
constant (:data:`SI_LATTICE_CONSTANT`; GFN2-xTB's own Γ-point minimum for the 16-atom cell is
5.439 Å, GFN1-xTB's 5.635 Å) or a defect template, relaxed a little at fixed cell with the
cheap level (:func:`defect_templates`), is strained by a random symmetric tensor and rattled
by Gaussian displacements; a rattle that brings two atoms closer than :data:`MIN_DISTANCE` is
redrawn. Each (set, kind) has its own random stream keyed by ``(seed, set, kind)``, so the
test frames are not the cheap set's frames, and a kind's frames do not depend on how many
frames the other kinds get. A draw that a level cannot label reliably (:func:`robust_label`:
the SCF does not converge from every initial guess of :data:`SCF_GUESSES` to the same
solution, as often happens with GFN2-xTB on small-gap cells) is dropped and the next draw
taken, so the expensive test frames of the hardest kinds are the draws on which GFN2-xTB is
well behaved.

Command line (``nequip-mtl-make-si-pair --help``, :mod:`nequip_mtl.tools.make_si_pair`)::

    nequip-mtl-make-si-pair benchmarks/data --seed 0

From Python::

    from nequip_mtl.tools.si_pair import make_si_pair

    make_si_pair("data/si", seed=0, num_bulk=4, cheap_per_kind=2, num_test=6)

tblite is imported only when a calculation is made, so this module imports without it.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from ase import Atoms

from .emt_alloy import write_frames
from .xtb_md import _split, label_frame, xtb_calculator

__all__ = [
    "CHEAP_METHOD",
    "ENERGY_TOLERANCE",
    "EXPENSIVE_METHOD",
    "FILE_NAMES",
    "FORCE_TOLERANCE",
    "KINDS",
    "MIN_DISTANCE",
    "NEW_KINDS",
    "QUICK",
    "RECIPES",
    "SCF_GUESSES",
    "SI_LATTICE_CONSTANT",
    "LabelStats",
    "Recipe",
    "SiPair",
    "check_frames",
    "defect_templates",
    "generate_si_pair",
    "make_si_pair",
    "robust_label",
    "sample_structures",
]

#: Diamond silicon's experimental lattice constant (Å) at room temperature.
SI_LATTICE_CONSTANT = 5.431

#: No two atoms of a frame are closer than this (Å); the Si-Si bond is 2.35 Å.
MIN_DISTANCE = 1.9

#: The expensive and the cheap level of theory.
EXPENSIVE_METHOD, CHEAP_METHOD = "GFN2-xTB", "GFN1-xTB"

#: Kinds of structure only the cheap set and the test set hold.
NEW_KINDS: tuple[str, ...] = (
    "strain_large",
    "shear",
    "vacancy",
    "divacancy",
    "interstitial",
    "hot_rattle",
)

#: Every kind: ``bulk`` (the expensive pool and the cheap set hold it), then :data:`NEW_KINDS`.
KINDS: tuple[str, ...] = ("bulk", *NEW_KINDS)

#: File stem of each set (``<stem>.xyz``) and its level of theory.
FILE_NAMES: dict[str, str] = {
    "si_gfn2_bulk": EXPENSIVE_METHOD,
    "si_gfn1_all": CHEAP_METHOD,
    "si_gfn2_defects_test": EXPENSIVE_METHOD,
}

#: A small run for tests: 8-atom cells, no template relaxation, one frame per kind.
QUICK: dict = dict(num_bulk=2, cheap_per_kind=1, num_test=6, repeat=(1, 1, 1), relax_steps=0)

#: Initial guesses of the SCF (tblite's): a label is kept only when every one converges to it.
SCF_GUESSES: tuple[str, ...] = ("sad", "eeqbc")

#: How far the solutions from :data:`SCF_GUESSES` may be apart: energy (eV per frame) and
#: largest force component (eV/Å). tblite converges the SCF to about 1e-6 Eh (3e-5 eV).
ENERGY_TOLERANCE, FORCE_TOLERANCE = 1e-4, 5e-3

# random streams: (seed, set, kind); the bulk pool is drawn once and shared by both files
_STREAMS = {"train": 0, "test": 1}
_VOIGT = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))


@dataclass(frozen=True)
class Recipe:
    """How one kind's frames are drawn: a template, a strain and a rattle.

    Each strain component is a magnitude drawn uniformly from its ``(low, high)`` range (a
    fraction) with a random sign: ``iso`` once for the three normal components together,
    ``normal`` for each normal component on top, ``shear`` for each of the three shear
    components of the symmetric tensor. ``rattle`` is the range of the Gaussian displacement's
    standard deviation (Å), one value per frame. ``templates``: the cell(s) it starts from,
    one drawn per frame (keys of :func:`defect_templates`).
    """

    templates: tuple[str, ...]
    iso: tuple[float, float] = (0.0, 0.015)
    normal: tuple[float, float] = (0.0, 0.005)
    shear: tuple[float, float] = (0.0, 0.005)
    rattle: tuple[float, float] = (0.03, 0.08)


#: The recipe of every kind. Bulk: up to +-1.5 % isotropic plus +-0.5 % anisotropic and shear
#: strains (at most 2 % along an axis) and 0.03-0.08 Å rattles (about 150-900 K of thermal
#: displacement in silicon); the defects start from their templates with the bulk's strains
#: and rattles; large strains are 4-6 % isotropic, shears 3-6 % in each shear component, hot
#: rattles 0.10-0.14 Å.
RECIPES: dict[str, Recipe] = {
    "bulk": Recipe(("perfect",)),
    "strain_large": Recipe(("perfect",), iso=(0.04, 0.06)),
    "shear": Recipe(("perfect",), iso=(0.0, 0.01), shear=(0.03, 0.06)),
    "vacancy": Recipe(("vacancy",)),
    "divacancy": Recipe(("divacancy",)),
    "interstitial": Recipe(("tetrahedral", "hexagonal")),
    "hot_rattle": Recipe(("perfect",), rattle=(0.10, 0.14)),
}

# interstitial sites, fractions of the conventional cube: tetrahedral (4 neighbours at
# 2.35 Å) and hexagonal (6 at 2.25 Å, the centre of a six-membered ring)
_INTERSTITIAL_SITES = {"tetrahedral": (0.5, 0.5, 0.5), "hexagonal": (0.625, 0.625, 0.625)}


def _perfect(repeat: Sequence[int]) -> Atoms:
    from ase.build import bulk

    return bulk("Si", "diamond", a=SI_LATTICE_CONSTANT, cubic=True).repeat(tuple(repeat))


def _nearest_neighbour(atoms: Atoms, index: int) -> int:
    from ase.neighborlist import neighbor_list

    i, j, d = neighbor_list("ijd", atoms, 2.6)
    mine = i == index
    return int(j[mine][np.argmin(d[mine])])


def _unrelaxed_templates(repeat: Sequence[int]) -> dict[str, Atoms]:
    perfect = _perfect(repeat)
    vacancy = perfect.copy()
    del vacancy[0]
    divacancy = perfect.copy()
    del divacancy[sorted((0, _nearest_neighbour(perfect, 0)))]
    out = {"perfect": perfect, "vacancy": vacancy, "divacancy": divacancy}
    for name, site in _INTERSTITIAL_SITES.items():
        atoms = perfect.copy()
        atoms.append("Si")
        atoms.positions[-1] = np.asarray(site) * SI_LATTICE_CONSTANT
        out[name] = atoms
    return out


def defect_templates(
    repeat: Sequence[int] = (2, 1, 1),
    relax_steps: int = 20,
    relax_method: str = CHEAP_METHOD,
    fmax: float = 0.05,
) -> dict[str, Atoms]:
    """The cells the frames start from, keyed ``perfect``, ``vacancy``, ``divacancy``,
    ``tetrahedral`` and ``hexagonal`` (interstitial sites).

    The perfect cell is ``repeat`` conventional diamond cubes at :data:`SI_LATTICE_CONSTANT`;
    a vacancy removes atom 0, a divacancy atom 0 and its nearest neighbour, an interstitial adds
    an atom at that site of the first cube. Each defect is relaxed a little at fixed cell: at
    most ``relax_steps`` BFGS steps (ASE) on ``relax_method``'s surface, to forces below
    ``fmax`` eV/Å; ``relax_steps=0`` leaves them as built (no xTB call). The relaxation is
    deterministic, so the templates do not depend on the seed. ``info["relax_steps"]`` and
    ``info["relax_fmax"]`` (the largest force left, eV/Å; absent without relaxation) record it.
    """
    if int(relax_steps) < 0:
        raise ValueError(f"relax_steps must be >= 0, got {relax_steps}")
    templates = _unrelaxed_templates(repeat)
    if int(relax_steps) == 0:
        return templates
    from ase.optimize import BFGS

    for name, atoms in templates.items():
        if name == "perfect":  # a minimum by symmetry: every force vanishes
            continue
        atoms.calc = xtb_calculator(relax_method)
        opt = BFGS(atoms, logfile=None)
        opt.run(fmax=fmax, steps=int(relax_steps))
        atoms.info["relax_steps"] = int(opt.nsteps)
        atoms.info["relax_fmax"] = float(np.linalg.norm(atoms.get_forces(), axis=1).max())
        atoms.calc = None
    return templates


def _signed(rng: np.random.Generator, bounds: tuple[float, float], size=None):
    low, high = bounds
    return rng.uniform(low, high, size) * rng.choice((-1.0, 1.0), size)


def _strain(rng: np.random.Generator, recipe: Recipe) -> np.ndarray:
    eps = np.eye(3) * _signed(rng, recipe.iso)
    eps[np.diag_indices(3)] += _signed(rng, recipe.normal, 3)
    for (i, j), value in zip(((1, 2), (0, 2), (0, 1)), _signed(rng, recipe.shear, 3)):
        eps[i, j] = eps[j, i] = value
    return eps


def _too_close(atoms: Atoms, distance: float = MIN_DISTANCE) -> bool:
    from ase.neighborlist import neighbor_list

    return len(neighbor_list("i", atoms, distance)) > 0


def _draws(
    kind: str, seed: int, templates: Mapping[str, Atoms], stream: str, max_tries: int = 100
) -> Iterator[Atoms]:
    """The endless sequence of ``kind``'s draws from the stream ``(seed, stream, kind)``."""
    if kind not in RECIPES:
        raise ValueError(f"kind must be one of {list(RECIPES)}, got {kind!r}")
    if stream not in _STREAMS:
        raise ValueError(f"stream must be one of {list(_STREAMS)}, got {stream!r}")
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    recipe = RECIPES[kind]
    rng = np.random.default_rng(
        np.random.SeedSequence([int(seed), _STREAMS[stream], KINDS.index(kind)])
    )
    for draw in itertools.count():
        site = recipe.templates[int(rng.integers(len(recipe.templates)))]
        template = templates[site]
        eps = _strain(rng, recipe)
        sigma = float(rng.uniform(*recipe.rattle))
        strained = Atoms(template.numbers, template.positions, cell=template.cell, pbc=True)
        strained.set_cell(template.cell.array @ (np.eye(3) + eps), scale_atoms=True)
        for _ in range(max_tries):
            atoms = strained.copy()
            atoms.positions += rng.normal(0.0, sigma, atoms.positions.shape)
            if not _too_close(atoms):
                break
        else:
            raise RuntimeError(
                f"{kind}: {max_tries} rattles of {sigma:.3f} Å all put two atoms closer than "
                f"{MIN_DISTANCE} Å"
            )
        atoms.wrap()
        atoms.info.update(
            config_type=kind,
            seed=int(seed),
            draw=draw,
            rattle=round(sigma, 6),
            strain=np.array([round(float(eps[i, j]), 6) for i, j in _VOIGT]),
            volumetric_strain=round(float(np.linalg.det(np.eye(3) + eps) - 1.0), 6),
        )
        if kind == "interstitial":
            atoms.info["defect_site"] = site
        yield atoms


def sample_structures(
    kind: str,
    count: int,
    seed: int,
    templates: Mapping[str, Atoms],
    stream: str = "train",
) -> list[Atoms]:
    """The first ``count`` unlabelled draws of ``kind`` (:data:`RECIPES`) from the random
    stream ``(seed, stream, kind)``, ``stream`` being ``train`` or ``test``.

    Each draw: a template drawn from the recipe's, strained (atoms move with the cell), then
    rattled; a rattle that brings two atoms closer than :data:`MIN_DISTANCE` is redrawn (100
    times at most, then :class:`RuntimeError`). ``info["draw"]`` numbers the draws from 0.
    """
    return list(itertools.islice(_draws(kind, seed, templates, stream), int(count)))


@dataclass
class LabelStats:
    """What labelling at one level of theory cost: frames labelled, draws refused (an SCF that
    did not converge, or initial guesses that converged apart), single-point calls and their
    seconds (``failed_*``: the calls whose SCF did not converge)."""

    labelled: int = 0
    scf_failed: int = 0
    guesses_disagree: int = 0
    calls: int = 0
    seconds: float = 0.0
    failed_calls: int = 0
    failed_seconds: float = 0.0

    @property
    def seconds_per_converged_call(self) -> float:
        """Mean seconds of one converged single-point calculation (energy, forces, stress)."""
        return (self.seconds - self.failed_seconds) / max(self.calls - self.failed_calls, 1)


def robust_label(atoms: Atoms, method: str, stats: LabelStats | None = None) -> Atoms | None:
    """``atoms`` labelled with ``method`` in eV (:func:`~nequip_mtl.tools.xtb_md.label_frame`),
    or ``None`` when the label is not a property of the geometry alone.

    The SCF is started afresh from each initial guess of :data:`SCF_GUESSES`; the label is kept
    only if every start converges and they agree to :data:`ENERGY_TOLERANCE` and
    :data:`FORCE_TOLERANCE` (small-gap silicon cells at the Γ point can have several
    self-consistent solutions, or none that tblite's mixer reaches). ``stats`` is updated.
    """
    from ase.calculators.calculator import CalculationFailed

    stats = stats if stats is not None else LabelStats()
    labelled = []
    for guess in SCF_GUESSES:
        start = time.perf_counter()
        stats.calls += 1
        try:
            labelled.append(label_frame(atoms, method, "eV", guess=guess))
        except CalculationFailed:
            stats.scf_failed += 1
            stats.failed_calls += 1
            stats.failed_seconds += time.perf_counter() - start
            return None
        finally:
            stats.seconds += time.perf_counter() - start
    first = labelled[0]
    for other in labelled[1:]:
        energy_gap = abs(other.get_potential_energy() - first.get_potential_energy())
        force_gap = np.abs(other.get_forces() - first.get_forces()).max()
        if energy_gap > ENERGY_TOLERANCE or force_gap > FORCE_TOLERANCE:
            stats.guesses_disagree += 1
            return None
    stats.labelled += 1
    return first


def _labelled_kind(
    kind: str,
    count: int,
    seed: int,
    templates: Mapping[str, Atoms],
    stream: str,
    methods: Sequence[str],
    stats: dict[str, LabelStats],
    max_draws: int,
) -> tuple[dict[str, list[Atoms]], int]:
    """``count`` frames of ``kind`` labelled at every level of ``methods`` (a draw refused at
    one level is dropped at all); returns the frames per level and the number of draws."""
    out: dict[str, list[Atoms]] = {m: [] for m in methods}
    prefix = "" if stream == "train" else "test-"
    draws = 0
    for atoms in _draws(kind, seed, templates, stream):
        if len(out[methods[0]]) == count:
            break
        if draws == max_draws:
            raise RuntimeError(
                f"{kind} ({stream}): only {len(out[methods[0]])} of {count} frames labelled "
                f"after {max_draws} draws; the SCF of {', '.join(methods)} failed on the rest"
            )
        draws += 1
        labels = []
        for method in methods:
            labelled = robust_label(atoms, method, stats.setdefault(method, LabelStats()))
            if labelled is None:
                break
            labels.append(labelled)
        else:
            structure_id = f"{prefix}{kind}-{len(out[methods[0]]):04d}"
            for method, labelled in zip(methods, labels):
                labelled.info["structure_id"] = structure_id
                out[method].append(labelled)
    return out, draws


@dataclass
class SiPair:
    """The three labelled sets (``frames``, keyed by :data:`FILE_NAMES`), the draws each
    (set, kind) took (``draws``), the cost per level (``stats``) and the seconds spent on the
    templates (``template_seconds``)."""

    frames: dict[str, list[Atoms]]
    draws: dict[str, dict[str, int]]
    stats: dict[str, LabelStats]
    template_seconds: float = 0.0


def generate_si_pair(
    seed: int = 0,
    num_bulk: int = 100,
    cheap_per_kind: int = 70,
    num_test: int = 100,
    repeat: Sequence[int] = (2, 1, 1),
    relax_steps: int = 20,
    max_draws_per_frame: int = 20,
) -> SiPair:
    """The three labelled sets.

    ``num_bulk`` bulk frames form the expensive pool, labelled with both levels: the same
    geometries open the cheap set. Then ``cheap_per_kind`` frames of each of
    :data:`NEW_KINDS` at the cheap level; the test set has ``num_test`` frames of the new
    kinds at the expensive level, split evenly (the first kinds get one more), drawn from
    other random streams than the cheap set's. A draw that a level cannot label
    (:func:`robust_label`) is dropped and the next one drawn, at most
    ``max_draws_per_frame * count`` draws per (set, kind). ``repeat`` and ``relax_steps`` go
    to :func:`defect_templates`. The result depends only on the arguments (and the versions
    of tblite and ASE).
    """
    for name, value, low in (
        ("num_bulk", num_bulk, 1),
        ("cheap_per_kind", cheap_per_kind, 1),
        ("num_test", num_test, len(NEW_KINDS)),
        ("max_draws_per_frame", max_draws_per_frame, 1),
    ):
        if int(value) < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    start = time.perf_counter()
    templates = defect_templates(repeat, relax_steps)
    template_seconds = time.perf_counter() - start
    stats: dict[str, LabelStats] = {}
    draws: dict[str, dict[str, int]] = {name: {} for name in FILE_NAMES}

    def labelled(kind, count, stream, methods):
        return _labelled_kind(
            kind, count, seed, templates, stream, methods, stats, max_draws_per_frame * count
        )

    both, n = labelled("bulk", int(num_bulk), "train", (EXPENSIVE_METHOD, CHEAP_METHOD))
    draws["si_gfn2_bulk"]["bulk"] = draws["si_gfn1_all"]["bulk"] = n
    cheap = list(both[CHEAP_METHOD])
    for kind in NEW_KINDS:
        frames, draws["si_gfn1_all"][kind] = labelled(
            kind, int(cheap_per_kind), "train", (CHEAP_METHOD,)
        )
        cheap += frames[CHEAP_METHOD]
    test = []
    for kind, count in zip(NEW_KINDS, _split(int(num_test), len(NEW_KINDS))):
        frames, draws["si_gfn2_defects_test"][kind] = labelled(
            kind, count, "test", (EXPENSIVE_METHOD,)
        )
        test += frames[EXPENSIVE_METHOD]
    frames = {
        "si_gfn2_bulk": both[EXPENSIVE_METHOD],
        "si_gfn1_all": cheap,
        "si_gfn2_defects_test": test,
    }
    for name, sset in frames.items():
        check_frames(sset, name)
    return SiPair(frames, draws, stats, template_seconds)


def check_frames(frames: Sequence[Atoms], name: str = "frames") -> None:
    """Raise :class:`ValueError` naming the frame if one has two atoms closer than
    :data:`MIN_DISTANCE`, a non-finite label, or lacks its energy, forces or stress."""
    for k, atoms in enumerate(frames):
        where = f"{name}[{k}] ({atoms.info.get('structure_id', '?')})"
        if _too_close(atoms):
            raise ValueError(f"{where}: two atoms closer than {MIN_DISTANCE} Å")
        results = atoms.calc.results if atoms.calc is not None else {}
        for key in ("energy", "forces", "stress"):
            if key not in results:
                raise ValueError(f"{where}: no {key} label")
            if not np.all(np.isfinite(results[key])):
                raise ValueError(f"{where}: non-finite {key}")


def make_si_pair(directory: str | os.PathLike, **kwargs) -> SiPair:
    """:func:`generate_si_pair` with ``kwargs``, written to ``directory/<name>.xyz`` for each
    name of :data:`FILE_NAMES` (parent directories are created); returns the pair."""
    pair = generate_si_pair(**kwargs)
    for name, frames in pair.frames.items():
        write_frames(frames, os.path.join(os.fspath(directory), f"{name}.xyz"))
    return pair
