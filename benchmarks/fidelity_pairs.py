"""The multi-fidelity benchmark's pairs: an expensive (high-fidelity) and a cheap (low-fidelity)
set of frames, and how the expensive one is split into nested training sets and a test set.

A pair is its files (in ``benchmarks/data/`` or ``--data-dir``) and its energy unit; the
types, whether stress is trained and the split sizes follow from the files. A new pair is
one entry of :data:`PAIRS`, e.g. a periodic pair with a separate test file::

    "si_xtb": Pair(
        "GFN2-xTB Si bulk cells near equilibrium; GFN1-xTB bulk and defects; test: defects",
        high="GFN2", low="GFN1", high_file="si_gfn2_bulk.xyz", low_file="si_gfn1_all.xyz",
        test_file="si_gfn2_defects_test.xyz", energy_unit="eV", low_test=50),

The expensive frames are ordered (``order``), the test set taken from them unless a
``test_file`` holds it, and the ``n`` training frames of a size are the first ``n`` of the
rest (nested: a smaller set is part of every larger one):

- ``random``: a seeded permutation (seed 0); the first ``n_test`` frames are the test set;
- ``energy``: by per-atom energy, lowest first; the ``n_test`` highest are the test set, so
  the training sets are the lowest-energy frames (labels near equilibrium only).

The cheap frames are permuted by the same generator (and, with ``low_config_types``, only
those kinds kept); the first ``low_train`` (default: all but ``low_test``) train, the next
``low_test`` are the pretraining's cheap test frames.

No torch import here (``--help`` and ``--from-json`` read the table).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
#: 1 kcal/mol in meV (as ``benchmarks.protocol.KCAL_MOL_TO_MEV``)
KCAL_MOL_TO_MEV = 43.364
#: meV per energy unit of a pair's files
TO_MEV = {"eV": 1e3, "kcal/mol": KCAL_MOL_TO_MEV}
ORDERS = ("random", "energy")


@dataclasses.dataclass(frozen=True)
class Pair:
    """An expensive and a cheap set of frames (file names in the data folder), their energy
    unit (lengths in Å, stress in energy unit / Å³), how the expensive set is split."""

    description: str
    high: str  # the expensive level's short name in labels ("DFT")
    low: str  # the cheap level's ("xTB")
    high_file: str
    low_file: str
    energy_unit: str
    test_file: str | None = None  # None: the test frames come from ``high_file``
    order: str = "random"
    n_test: int = 20  # test frames taken from ``high_file`` (without ``test_file``)
    low_train: int | None = None  # None: every cheap frame but the ``low_test`` ones
    low_test: int = 100
    #: keep only the cheap frames of these ``config_type`` values (empty: every frame)
    low_config_types: tuple[str, ...] = ()

    def __post_init__(self):
        if self.energy_unit not in TO_MEV:
            raise ValueError(f"energy_unit {self.energy_unit!r}: one of {list(TO_MEV)}")
        if self.order not in ORDERS:
            raise ValueError(f"order {self.order!r}: one of {list(ORDERS)}")

    @property
    def to_mev(self) -> float:
        return TO_MEV[self.energy_unit]

    def files(self, data_dir: Path = DATA) -> dict[str, Path]:
        """The pair's source files: ``high``, ``low`` and, if it has one, ``test``."""
        out = {"high": data_dir / self.high_file, "low": data_dir / self.low_file}
        if self.test_file is not None:
            out["test"] = data_dir / self.test_file
        return out


PAIRS = {
    "ethanol_random": Pair(
        "DFT ethanol (100 frames) split at random; GFN2-xTB ethanol MD at 300-900 K",
        high="DFT", low="xTB", high_file="ethanol_reduced_100.xyz",
        low_file="ethanol_xtb_1200.xyz", energy_unit="kcal/mol", low_train=1000),
    "ethanol_low": Pair(
        "DFT ethanol (100 frames) sorted by energy: the 20 highest the test set, the training "
        "sets the lowest-energy frames; GFN2-xTB ethanol MD at 300-900 K",
        high="DFT", low="xTB", high_file="ethanol_reduced_100.xyz",
        low_file="ethanol_xtb_1200.xyz", energy_unit="kcal/mol", order="energy",
        low_train=1000),
    "si_xtb": Pair(
        "GFN2-xTB Si bulk cells near equilibrium (the training pool); GFN1-xTB Si bulk and "
        "defect cells; the test set GFN2-xTB defect cells only",
        high="GFN2", low="GFN1", high_file="si_gfn2_bulk.xyz", low_file="si_gfn1_all.xyz",
        test_file="si_gfn2_defects_test.xyz", energy_unit="eV", low_test=50),
    "si_bulk": Pair(
        "GFN2-xTB Si bulk cells split at random (the 20 test frames bulk too); GFN1-xTB on "
        "the same 100 bulk geometries only: the cheap data covers nothing the expensive "
        "lacks", high="GFN2", low="GFN1", high_file="si_gfn2_bulk.xyz",
        low_file="si_gfn1_all.xyz", energy_unit="eV", low_test=20,
        low_config_types=("bulk",)),
}  # fmt: skip
#: the pair of a results json written before pairs existed
DEFAULT_PAIR = "ethanol_random"


def digest(paths) -> str:
    """A short digest of the files' contents (the split folder's name: another data folder,
    another split)."""
    h = hashlib.sha1()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()[:10]


def split(pair: Pair, frames: dict[str, list], sizes) -> dict[str, list]:
    """The splits of a pair's frames (``frames``: ASE frames of :meth:`Pair.files`):
    ``high_test``, ``high_train_<n>`` for every size (nested), ``low_train``, ``low_test``."""
    import numpy as np

    rng = np.random.default_rng(0)
    high = list(frames["high"])
    if pair.order == "random":
        high = [high[i] for i in rng.permutation(len(high))]
    else:  # lowest per-atom energy first
        energy = [a.get_potential_energy() / len(a) for a in high]
        high = [high[i] for i in np.argsort(energy, kind="stable")]
    if "test" in frames:
        test, pool = list(frames["test"]), high
    elif pair.order == "energy":  # the highest-energy frames are the test set
        test, pool = high[-pair.n_test :], high[: -pair.n_test]
    else:
        test, pool = high[: pair.n_test], high[pair.n_test :]
    for n in sizes:
        if not 0 < n <= len(pool):
            raise SystemExit(f"--dft-train {n}: must be 1 to {len(pool)} (the training pool)")
    low = [frames["low"][i] for i in rng.permutation(len(frames["low"]))]
    if pair.low_config_types:
        low = [a for a in low if a.info.get("config_type") in pair.low_config_types]
    n_low = pair.low_train if pair.low_train is not None else len(low) - pair.low_test
    if n_low < 1 or n_low + pair.low_test > len(low):
        raise SystemExit(f"{pair.low_file}: {len(low)} frames, too few for {n_low} training "
                         f"and {pair.low_test} test frames")  # fmt: skip
    return {"high_test": test, "low_train": low[:n_low],
            "low_test": low[n_low : n_low + pair.low_test],
            **{f"high_train_{n}": pool[:n] for n in sizes}}  # fmt: skip


def properties(frames: dict[str, list]) -> dict:
    """What the files hold: the sorted species (the model's types) and whether every frame
    has a stress label (then stress is trained and reported)."""
    every = [a for fs in frames.values() for a in fs]
    types = sorted({s for a in every for s in a.get_chemical_symbols()})
    stress = all(a.calc is not None and "stress" in a.calc.results for a in every)
    return {"type_names": types, "stress": stress}
